"""Denoising training (config.loss.denoising, detr_jax.denoising) against the official DN-DAB-DETR
(tests/data/dn_dab_r50.npz, made by tests/data/make_dn_ref.py with the noise fed explicitly): the
noised queries, the attention mask, the matching and denoising outputs of every layer, the matcher,
every loss term and gradients; and the denoising queries by hand."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_official_matching, reference_targets
from detr_jax import build_model, convert, denoising
from detr_jax.config import loss_config, model_config
from detr_jax.losses import compute_loss
from detr_jax.matching import match

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path[:0] = [DATA, os.path.dirname(__file__)]
import make_dn_ref  # noqa: E402
import official_layout  # noqa: E402

SLOTS = 8  # target slots per image (max_boxes): more than the batch's 5, so some DN slots do not exist officially
GROUPS = 5


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def padded(array, fill):
    """[G, B, S, ...] -> [G, B, SLOTS, ...], the extra slots filled with ``fill``."""
    pad = [(0, 0), (0, 0), (0, SLOTS - array.shape[2])] + [(0, 0)] * (array.ndim - 3)
    return np.pad(array, pad, constant_values=fill)


def official_slot(ref) -> np.ndarray:
    """For each official DN slot g S + j (S = the batch's largest count): our slot g SLOTS + j."""
    single = int(ref["dn_single_pad"])
    return np.array([g * SLOTS + j for g in range(GROUPS) for j in range(single)])


@pytest.fixture(scope="module")
def official():
    """(ref, configs, variables, targets, noise, DN inputs, outputs, intermediates, apply) of the
    official DN-DAB-DETR's inputs through our model, training mode (no dropout)."""
    ref = official_layout.load_npz(os.path.join(DATA, "dn_dab_r50.npz"))
    state_dict = make_dn_ref.make_state_dict(int(ref["weights_seed"]))
    images, masks = official_layout.noise_batch(int(ref["image_seed"]), ref["image_sizes"])
    assert official_layout.array_sha256(images) == str(ref["images_sha256"])
    cfg = model_config(padding="official", dropout=0.0, decoder="dab", classification="sigmoid_focal",
                       num_queries=300, activation="prelu", label_embedding=True)
    loss_cfg = loss_config(cost_class=2.0, ce_weight=1.0, giou_eps=1e-6)
    loss_cfg.denoising.groups = GROUPS
    variables = convert.from_official_state_dict(state_dict, cfg)
    targets = {k: jnp.asarray(v) for k, v in reference_targets(ref, SLOTS).items()}
    noise = {"label_u": jnp.asarray(padded(ref["dn_label_u"], 0.5)),
             "new_labels": jnp.asarray(padded(ref["dn_new_labels"], 0).astype(np.int32)),
             "box_u": jnp.asarray(padded(ref["dn_box_u"], 0.5))}
    dn = denoising.model_inputs(targets, noise, loss_cfg.denoising, cfg.num_queries)
    model = build_model(cfg)
    apply = jax.jit(lambda v, i, m, d: model.apply(v, i, m, train=True, denoising=d, mutable=["intermediates"]))
    outputs, state = apply(variables, nhwc(images), jnp.asarray(masks), dn)
    return ref, cfg, loss_cfg, variables, targets, dn, outputs, state["intermediates"], (model, images, masks)


def test_noised_queries_and_attention_mask_are_the_official(official):
    ref, _, _, _, _, dn, _, inter, _ = official
    ours = official_slot(ref)
    single = int(ref["dn_single_pad"])
    known = ref["dn_known_labels_noised"]  # [G, B, S], -1 where the image has fewer targets
    ours_labels = np.asarray(dn["labels"]).reshape(2, GROUPS, SLOTS)[:, :, :single].transpose(1, 0, 2)
    real = known >= 0
    np.testing.assert_array_equal(ours_labels[real], known[real])
    ours_boxes = np.asarray(dn["boxes"]).reshape(2, GROUPS, SLOTS, 4)[:, :, :single].transpose(1, 0, 2, 3)
    np.testing.assert_allclose(ours_boxes[real], ref["dn_known_boxes_noised"][real], rtol=0, atol=1e-7)
    assert not np.asarray(dn["valid"]).reshape(2, GROUPS, SLOTS)[:, :, :single].transpose(1, 0, 2)[~real].any()

    # the mask over the queries that exist in both (our extra slots are blocked as keys everywhere)
    rows = np.concatenate([ours, GROUPS * SLOTS + np.arange(300)])
    mask = np.asarray(dn["mask"])[0]
    np.testing.assert_array_equal(mask[np.ix_(rows, rows)], ref["dn_attn_mask"])
    extra = np.setdiff1d(np.arange(GROUPS * SLOTS), ours)
    assert mask[:, extra].all()

    # the decoder's input: content (label embedding + indicator) and anchors of every query
    content = np.asarray(inter["query_content"][0])[:, rows]
    np.testing.assert_allclose(content, ref["dn_input_query_label"], rtol=0, atol=1e-6)
    anchors = np.asarray(inter["references"][0])[0][:, rows]
    np.testing.assert_allclose(anchors, ref["references"][0], rtol=0, atol=1e-6)


def layers(outputs, key):
    return np.stack([np.asarray(o[key]) for o in outputs["aux_outputs"]] + [np.asarray(outputs[key])])


def test_every_layer_of_both_parts_matches_the_official_model(official):
    """Matching and DN logits and boxes of every stored layer within 4x the official
    float32-vs-float64 gap of the float64 run."""
    ref, *_, outputs, _, _ = official
    dn_slots = official_slot(ref)
    logit_layers = list(ref["aux_logit_layers"]) + [5]
    checks = {
        "matching logits": (layers(outputs, "pred_logits")[logit_layers],
                            np.concatenate([ref["aux_pred_logits"], ref["pred_logits"][None]]),
                            np.concatenate([ref["aux_pred_logits_f64"], ref["pred_logits_f64"][None]])),
        "matching boxes": (layers(outputs, "pred_boxes"),
                           np.concatenate([ref["aux_pred_boxes"], ref["pred_boxes"][None]]),
                           np.concatenate([ref["aux_pred_boxes_f64"], ref["pred_boxes_f64"][None]])),
        "dn logits": (layers(outputs["dn_outputs"], "pred_logits")[:, :, dn_slots], ref["dn_pred_logits"],
                      ref["dn_pred_logits_f64"]),
        "dn boxes": (layers(outputs["dn_outputs"], "pred_boxes")[:, :, dn_slots], ref["dn_pred_boxes"],
                     ref["dn_pred_boxes_f64"]),
    }
    for name, (ours, f32, f64) in checks.items():
        gap = np.abs(f32 - f64).max()
        assert ours.shape == f64.shape, name
        assert np.abs(ours - f64).max() <= 4 * gap, (name, np.abs(ours - f64).max(), gap)


def test_matcher_and_every_loss_term_match_the_official_criterion(official):
    ref, cfg, loss_cfg, _, targets, _, outputs, _, _ = official
    assert_official_matching(np.asarray(match(outputs, targets, loss_cfg, cfg.classification)), ref)
    total, terms = compute_loss(outputs, targets, loss_cfg, cfg.classification)
    renamed = lambda name: re.sub(r"^tgt_(loss_ce|loss_bbox|loss_giou|class_error)(_\d+)?$", r"\1_dn\2", name)
    official_terms = {renamed(k[len("loss/"):]): float(v) for k, v in ref.items() if k.startswith("loss/")
                      and not k.startswith(("loss/loss_xy", "loss/loss_hw"))}  # DAB's logging-only L1 split
    assert set(terms) == set(official_terms)
    assert any(name.endswith("_dn_0") for name in terms)
    for name, value in official_terms.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(total) == pytest.approx(float(ref["loss_total"]), rel=1e-5)


def test_loss_gradients_match_the_official_model(official):
    ref, cfg, loss_cfg, variables, targets, dn, _, _, (model, images, masks) = official

    def loss(params):
        outputs = model.apply({**variables, "params": params}, nhwc(images), jnp.asarray(masks), train=True,
                              denoising=dn)
        return compute_loss(outputs, targets, loss_cfg, cfg.classification)[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    ours = convert.to_official_state_dict({**variables, "params": grads}, cfg)
    keys = [k[len("grad/"):] for k in ref if k.startswith("grad/")]
    assert "label_enc.weight" in keys
    for key in keys:
        expected = ref[f"grad_f64/{key}"]  # the float64 run: float32 is 1e-3 off it for refpoint_embed
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours[key], expected, rtol=0, atol=max(1e-3 * scale, 1e-6), err_msg=key)


def test_matching_queries_do_not_see_the_denoising_queries(official):
    """Inference runs without DN queries; training adds them, and the matching part is the same
    (the mask keeps them out of the matching queries' view), to float32 rounding."""
    _, _, _, variables, _, _, outputs, _, (model, images, masks) = official
    alone = jax.jit(lambda v: model.apply(v, nhwc(images), jnp.asarray(masks), train=True))(variables)
    assert "dn_outputs" not in alone
    np.testing.assert_allclose(alone["pred_logits"], outputs["pred_logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(alone["pred_boxes"], outputs["pred_boxes"], rtol=0, atol=1e-5)


def test_attention_mask_by_hand():
    """2 groups of 3 slots, 2 matching queries; the batch's largest count is 2, so slot 2 of each
    group is blocked everywhere; a DN query sees its group's slots 0-1 and the matching queries."""
    valid = jnp.array([[True, True, False], [True, False, False]])
    mask = np.asarray(denoising.attention_mask(valid, groups=2, num_queries=2))
    x, o = True, False
    expected = np.array([
        # g0s0 g0s1 g0s2 g1s0 g1s1 g1s2 q0 q1
        [o, o, x, x, x, x, o, o],
        [o, o, x, x, x, x, o, o],
        [o, o, x, x, x, x, o, o],
        [x, x, x, o, o, x, o, o],
        [x, x, x, o, o, x, o, o],
        [x, x, x, o, o, x, o, o],
        [x, x, x, x, x, x, o, o],
        [x, x, x, x, x, x, o, o]])
    np.testing.assert_array_equal(mask[0], expected)
    np.testing.assert_array_equal(mask[1], expected)


def test_noise_by_hand():
    """A label flips where its uniform is below label_noise; a box moves by (2u - 1) x box_noise x
    (w/2, h/2, w, h), clipped to [0, 1]; slots come group-major."""
    targets = {"labels": jnp.array([[3, 1]]), "boxes": jnp.array([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]]]),
               "box_valid": jnp.array([[True, False]])}
    noise = {"label_u": jnp.array([[[0.1, 0.9]], [[0.3, 0.1]]]), "new_labels": jnp.array([[[4, 4]], [[2, 2]]]),
             "box_u": jnp.array([[[[1.0, 0.0, 0.5, 0.75], [0.5] * 4]], [[[0.5] * 4, [0.0, 1.0, 0.0, 1.0]]]])}
    out = denoising.noised_queries(targets, noise, label_noise=0.2, box_noise=0.4)
    np.testing.assert_array_equal(out["labels"], [[4, 1, 3, 2]])
    np.testing.assert_array_equal(out["valid"], [[True, False, True, False]])
    np.testing.assert_allclose(out["boxes"][0, 0], [0.5 + 0.04, 0.5 - 0.08, 0.2, 0.4 + 0.08], atol=1e-7)
    np.testing.assert_allclose(out["boxes"][0, 3], [0.1 - 0.04, 0.9 + 0.04, 0.2 - 0.08, 0.2 + 0.08], atol=1e-7)
    np.testing.assert_allclose(out["boxes"][0, 2], [0.5, 0.5, 0.2, 0.4], atol=1e-7)
