"""DETR's panoptic model (DETR-R50 + the mask head, 250 classes) against the official DETRsegm run
on a padded batch (tests/data/detr_panoptic_r50.npz, made by tests/data/make_panoptic_ref.py from
tests/panoptic_layout.py's weights): mask logits, attention maps, matching, the mask losses and their
gradients; and the conversion of the official panoptic layout both ways."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from configs.detr_panoptic_coco import get_config
from conftest import DATA, assert_official_matching
from detr_jax import build_model
from detr_jax.config import loss_config
from detr_jax.convert import from_official_state_dict, official_shapes, to_official_state_dict
from detr_jax.losses import compute_loss
from detr_jax.matching import match

MAX_BOXES = 6  # more slots than the reference's 5 + 3 targets: the empty slots are exercised too


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def panoptic():
    import official_layout
    import panoptic_layout

    ref = official_layout.load_npz(DATA / "detr_panoptic_r50.npz")
    images, masks = official_layout.noise_batch(int(ref["image_seed"]), ref["image_sizes"])
    assert official_layout.array_sha256(images) == str(ref["images_sha256"])
    state_dict = panoptic_layout.make_state_dict(int(ref["weights_seed"]))
    assert official_layout.weights_sha256(state_dict) == str(ref["weights_sha256"])
    config = get_config("r50").model
    config.padding = "official"  # the reference batch is padded the official way
    variables = from_official_state_dict(state_dict, config)
    model = build_model(config)
    targets = reference_targets(ref)

    def loss(params):  # one compiled program gives the outputs and the gradients
        out, state = model.apply({**variables, "params": params}, nhwc(images), masks, mutable=["intermediates"])
        total, _ = compute_loss(out, targets, loss_config(), config.classification, method="host")
        return total, (out, state["intermediates"])

    (_, (outputs, inter)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return SimpleNamespace(ref=ref, config=config, variables=variables, state_dict=state_dict, targets=targets,
                           outputs=outputs, inter=inter, grads=grads)


def reference_targets(ref):
    """The 5 + 3 reference targets padded to MAX_BOXES slots, their masks as a segment map per image
    (segment k + 1 is target k; the maps are padded with 0 to the canvas)."""
    b, (h, w) = 2, ref["pred_masks"].shape[2:]
    canvas = (ref["image_sizes"][:, 0].max(), ref["image_sizes"][:, 1].max())
    labels, valid = np.zeros((b, MAX_BOXES), np.int32), np.zeros((b, MAX_BOXES), bool)
    boxes, ids = np.zeros((b, MAX_BOXES, 4), np.float32), np.zeros((b, MAX_BOXES), np.int32)
    segments = np.zeros((b, *canvas), np.int32)
    for i in range(b):
        target_masks = ref[f"tgt{i}_masks"]
        n, mh, mw = target_masks.shape
        assert (target_masks.sum(0) == 1).all()  # non-overlapping, covering the image
        labels[i, :n], boxes[i, :n], valid[i, :n], ids[i, :n] = ref[f"tgt{i}_labels"], ref[f"tgt{i}_boxes"], True, \
            np.arange(1, n + 1)
        segments[i, :mh, :mw] = (target_masks * np.arange(1, n + 1)[:, None, None]).sum(0)
    return {"labels": labels, "boxes": boxes, "box_valid": valid, "segments": segments, "segment_ids": ids}


def test_mask_logits_and_attention_maps_match_the_official_model(panoptic):
    ref, out, inter = panoptic.ref, panoptic.outputs, panoptic.inter
    assert out["pred_masks"].shape == ref["pred_masks"].shape  # [2, 100, 35, 42]: C2 of the 139 x 166 canvas
    np.testing.assert_array_equal(out["pred_masks_hw"][:, 0], [[35, 42]] * 2)
    np.testing.assert_array_equal(out["pred_masks_hw"][:, 1], [[139, 166]] * 2)  # official: the whole canvas
    # within a small multiple of the official float32-vs-float64 gap, from the float64 run
    for name, ours in (("pred_masks", out["pred_masks"]), ("bbox_mask", inter["bbox_mask"][0]),
                       ("pred_logits", out["pred_logits"]), ("pred_boxes", out["pred_boxes"])):
        gap = float(ref[f"yardstick/{name}"])
        error = float(np.abs(np.asarray(ours) - ref[f"{name}_f64"]).max())
        print(f"{name}: max |ours - official f64| {error:.2e}, official f32 gap {gap:.2e}")
        assert error <= 4 * gap + 1e-7, name
    assert np.abs(ref["pred_masks"]).max() > 1.0  # the logits are not trivially small


def test_matching_and_mask_losses_match_the_official_criterion(panoptic):
    ref, config, out, targets = panoptic.ref, panoptic.config, panoptic.outputs, panoptic.targets
    matched = match(out, targets, loss_config(), "softmax", "host")
    assert_official_matching(np.asarray(matched), ref)
    _, terms = compute_loss(out, targets, loss_config(), config.classification)
    for name in ("loss_mask", "loss_dice", "loss_ce", "loss_bbox", "loss_giou"):
        np.testing.assert_allclose(float(terms[name]), ref[f"loss/{name}"], rtol=1e-5, err_msg=name)
    total, _ = compute_loss(out, targets, loss_config(), config.classification)
    np.testing.assert_allclose(float(total), ref["loss_total"], rtol=1e-5)


def test_mask_head_gradients_match_the_official_model(panoptic):
    ref, variables = panoptic.ref, panoptic.variables
    ours = to_official_state_dict({"params": panoptic.grads, "buffers": variables["buffers"]}, panoptic.config)
    keys = [k[len("grad_f64/"):] for k in ref if k.startswith("grad_f64/")]
    assert len(keys) == 8
    for key in keys:
        expected = ref[f"grad_f64/{key}"]
        got = ours[key][:len(expected)]
        scale = np.abs(expected).max()
        error = np.abs(got - expected).max()
        print(f"{key}: max |d| {error:.2e} of scale {scale:.2e} (official f32 {ref[f'yardstick/grad/{key}']:.2e})")
        assert error <= 1e-3 * scale + 2 * float(ref[f"yardstick/grad/{key}"]), key


def test_the_official_panoptic_layout_converts_both_ways(panoptic):
    ref, config, variables, state_dict = panoptic.ref, panoptic.config, panoptic.variables, panoptic.state_dict
    assert len(official_shapes(config)) == int(ref["num_keys"]) == len(state_dict)  # 490 keys
    assert {k: tuple(np.shape(v)) for k, v in state_dict.items()} == official_shapes(config)
    back = to_official_state_dict(variables, config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
