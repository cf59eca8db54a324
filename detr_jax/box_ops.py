"""Box conversions, IoU and generalised IoU: batched, NaN-free, gradient-safe.

Boxes are arrays [..., 4]; pairwise functions map [..., N, 4] x [..., M, 4] -> [..., N, M] and
elementwise ones [..., 4] x [..., 4] -> [...]. Unlike the official code, which asserts on degenerate
boxes, zero-width or zero-height boxes are allowed: areas are clipped at 0 and an IoU whose union is
0 (or a GIoU whose enclosing box is empty) is defined as 0, with gradients that stay finite.
"""
import jax.numpy as jnp


def cxcywh_to_xyxy(boxes):
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area(boxes_xyxy):
    """[..., 4] -> [...]; inverted sides count as 0."""
    wh = jnp.clip(boxes_xyxy[..., 2:] - boxes_xyxy[..., :2], 0)
    return wh[..., 0] * wh[..., 1]


def _safe_div(num, den):
    """num / den where den > 0, else 0, without NaN in either value or gradient."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def _iou_parts(a, b, eps: float = 0.0):
    """Broadcasting a, b [..., 4] xyxy -> (iou, union, enclosing area); eps added to the union."""
    inter_wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area(a) + area(b) - inter
    hull_wh = jnp.clip(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0)
    return _safe_div(inter, union + eps), union, hull_wh[..., 0] * hull_wh[..., 1]


def _giou(a, b, eps: float = 0.0):
    iou, union, hull = _iou_parts(a, b, eps)
    return iou - _safe_div(hull - union, hull + eps)


def _pairwise(a, b):
    return a[..., :, None, :], b[..., None, :, :]


def box_iou(boxes1_xyxy, boxes2_xyxy):
    """Pairwise IoU: [..., N, 4], [..., M, 4] -> [..., N, M]."""
    return _iou_parts(*_pairwise(boxes1_xyxy, boxes2_xyxy))[0]


def generalized_box_iou(boxes1_xyxy, boxes2_xyxy, eps: float = 0.0):
    """Pairwise GIoU (Rezatofighi et al. 2019): [..., N, 4], [..., M, 4] -> [..., N, M] in [-1, 1].
    eps: added to the union and the enclosing area before dividing (0 official DETR, 1e-6 DAB-DETR)."""
    return _giou(*_pairwise(boxes1_xyxy, boxes2_xyxy), eps)


def elementwise_generalized_box_iou(boxes1_xyxy, boxes2_xyxy, eps: float = 0.0):
    """GIoU of corresponding boxes: [..., 4], [..., 4] -> [...] (the diagonal of the pairwise one)."""
    return _giou(boxes1_xyxy, boxes2_xyxy, eps)
