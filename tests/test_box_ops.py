"""Box conversions, IoU and GIoU: hand-computed cases, degenerate boxes, batching."""
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import box_ops


def test_conversions_round_trip():
    boxes = np.array([[0.5, 0.4, 0.2, 0.6], [0.1, 0.9, 0.0, 0.3]], np.float32)
    xyxy = box_ops.cxcywh_to_xyxy(boxes)
    np.testing.assert_allclose(xyxy, [[0.4, 0.1, 0.6, 0.7], [0.1, 0.75, 0.1, 1.05]], atol=1e-7)
    np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), boxes, atol=1e-7)
    np.testing.assert_allclose(box_ops.area(xyxy), [0.12, 0.0], atol=1e-7)


def test_iou_and_giou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0]], np.float32)
    b = np.array([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 2.0]], np.float32)
    # overlap 1, union 7, hull 9; disjoint: iou 0, union 5, hull 10; identical: 1
    np.testing.assert_allclose(box_ops.box_iou(a, b), [[1 / 7, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(box_ops.generalized_box_iou(a, b), [[1 / 7 - 2 / 9, -0.5, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(np.repeat(a, 3, 0), b),
                               [1 / 7 - 2 / 9, -0.5, 1.0], rtol=1e-6)


def test_degenerate_boxes_are_nan_free_with_finite_gradients():
    point = np.array([0.5, 0.5, 0.0, 0.0], np.float32)  # cxcywh, zero width and height
    line = np.array([0.5, 0.5, 0.0, 0.2], np.float32)
    real = np.array([0.5, 0.5, 0.2, 0.2], np.float32)
    pairs = [(point, point), (point, line), (line, line), (point, real), (line, real)]

    def giou(p, t):
        return box_ops.elementwise_generalized_box_iou(box_ops.cxcywh_to_xyxy(p), box_ops.cxcywh_to_xyxy(t))

    for p, t in pairs:
        value = giou(p, t)
        grad = jax.grad(giou)(p, t)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), (p, t, value, grad)
    assert float(giou(point, point)) == 0.0  # empty union and hull: defined as 0
    assert float(giou(point, real)) == 0.0  # inside the box: iou 0, hull = union
    inverted = np.array([[0.6, 0.6, 0.4, 0.4]], np.float32)  # x1 < x0: area 0, not negative
    assert float(box_ops.area(inverted)[0]) == 0.0


def test_batched_equals_per_image():
    rng = np.random.RandomState(0)
    a = box_ops.cxcywh_to_xyxy(jnp.asarray(rng.uniform(0.1, 0.9, (3, 5, 4)), jnp.float32))
    b = box_ops.cxcywh_to_xyxy(jnp.asarray(rng.uniform(0.1, 0.9, (3, 4, 4)), jnp.float32))
    batched = box_ops.generalized_box_iou(a, b)
    assert batched.shape == (3, 5, 4)
    for i in range(3):
        np.testing.assert_allclose(batched[i], box_ops.generalized_box_iou(a[i], b[i]), rtol=1e-6)
    assert np.all(np.asarray(batched) <= 1) and np.all(np.asarray(batched) >= -1)
