"""DETR-R50 against the official PyTorch model's outputs on a padded batch (tests/data/official_r50*.npz,
made by tests/data/make_official_ref.py from tests/official_layout.py's weights)."""
import jax
import numpy as np
import pytest

from configs.detr_coco import get_config
from detr_jax import build_model
from detr_jax.convert import from_official_state_dict

# Official float32 vs float64 on this batch: 3.4e-5 (logits), 3.1e-6 (boxes) (make_official_ref.py prints them).
LOGITS_ATOL, BOXES_ATOL = 1e-3, 1e-4
# bfloat16 computation vs float32, measured on these weights (logits span +-9; the queries' sharp
# cross-attention magnifies rounding): |d logits| max 0.56 / mean 0.10, |d boxes| max 0.044 /
# mean 0.0077, |d softmax| max 0.058.
BF16_LOGITS_ATOL, BF16_BOXES_ATOL, BF16_PROB_ATOL = 0.75, 0.07, 0.15


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def official_config():
    """DETR-R50 with padding="official": the reference batch is a padded batch, computed the official way."""
    config = get_config("r50").model
    config.padding = "official"
    return config


@pytest.fixture(scope="module")
def official(reference):
    _, ref, state_dict = reference
    config = official_config()
    variables = from_official_state_dict(state_dict, config)
    images, masks = nhwc(ref["images"]), ref["masks"]
    apply = jax.jit(lambda v, x, m: build_model(config).apply(v, x, m, mutable=["intermediates"]))
    outputs, state = apply(variables, images, masks)
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    return ref, variables, outputs, inter


def test_final_outputs_match_official(official):
    ref, _, out, _ = official
    np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"], rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes"], rtol=0, atol=BOXES_ATOL)
    # as close to the float64 run as official float32 is (a small multiple of its own gap)
    np.testing.assert_allclose(out["pred_logits"], ref["pred_logits_f64"], rtol=0, atol=2e-4)
    np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes_f64"], rtol=0, atol=1e-5)


def test_aux_outputs_match_official(official):
    ref, _, out, _ = official
    assert len(out["aux_outputs"]) == 5
    for layer, aux in enumerate(out["aux_outputs"]):
        np.testing.assert_allclose(aux["pred_logits"], ref["aux_pred_logits"][layer], rtol=0, atol=LOGITS_ATOL)
        np.testing.assert_allclose(aux["pred_boxes"], ref["aux_pred_boxes"][layer], rtol=0, atol=BOXES_ATOL)


def test_intermediates_match_official(official):
    ref, _, _, inter = official
    np.testing.assert_array_equal(inter["feature_mask"], ref["feat_mask"])
    feat = nhwc(ref["feat_src"])  # layer4 outputs reach ~50: relative tolerance
    np.testing.assert_allclose(inter["backbone_features"], feat, rtol=0, atol=1e-5 * np.abs(feat).max() * 10)
    np.testing.assert_allclose(inter["pos"], nhwc(ref["pos"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(inter["proj_src"], nhwc(ref["proj_src"]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(inter["memory"], nhwc(ref["memory"]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(inter["hs"][ref["hs_layers"]], ref["hs"], rtol=0, atol=1e-4)


def test_bfloat16_compute_stays_close_to_float32(official):
    ref, variables, out, _ = official
    config = official_config()
    config.dtype = "bfloat16"
    out16 = jax.jit(build_model(config).apply)(variables, nhwc(ref["images"]), ref["masks"])
    assert out16["pred_logits"].dtype == np.float32  # outputs stay float32
    d_logits = np.abs(np.asarray(out16["pred_logits"]) - np.asarray(out["pred_logits"]))
    d_boxes = np.abs(np.asarray(out16["pred_boxes"]) - np.asarray(out["pred_boxes"]))
    d_prob = np.abs(jax.nn.softmax(out16["pred_logits"]) - jax.nn.softmax(out["pred_logits"]))
    print(f"bf16 vs f32: logits max {d_logits.max():.3f} mean {d_logits.mean():.4f}; "
          f"boxes max {d_boxes.max():.4f} mean {d_boxes.mean():.5f}; probs max {d_prob.max():.3f}")
    assert d_logits.max() < BF16_LOGITS_ATOL and d_logits.mean() < 0.15
    assert d_boxes.max() < BF16_BOXES_ATOL and d_boxes.mean() < 0.012
    assert d_prob.max() < BF16_PROB_ATOL
    # and it is bfloat16 for real: not bit-identical to float32
    assert d_logits.max() > 1e-3


def test_loss_gradients_through_the_model_match_official(official):
    """d loss_total / d parameter, model + matcher + SetCriterion, for the 11 parameters the
    reference records (from the class head down to the strided conv of layer3 of the backbone)."""
    from conftest import reference_targets
    from detr_jax.config import loss_config
    from detr_jax.convert import to_official_state_dict
    from detr_jax.losses import compute_loss

    ref, variables, _, _ = official
    config = official_config()
    model = build_model(config)

    def loss(params):
        outputs = model.apply({"params": params, "buffers": variables["buffers"]}, nhwc(ref["images"]), ref["masks"])
        return compute_loss(outputs, reference_targets(ref), loss_config(), "softmax")[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    official_grads = to_official_state_dict({"params": grads, "buffers": variables["buffers"]}, config)
    recorded = [k for k in ref if k.startswith("grad/")]
    assert len(recorded) == 11
    for key in recorded:
        want = ref[key]  # of a large parameter, its first output channels
        # float32 noise accumulates through the encoder and the backbone's ReLUs: 1e-3 of the scale there
        np.testing.assert_allclose(official_grads[key[len("grad/"):]][:len(want)], want, rtol=0,
                                   atol=2.5e-3 * np.abs(want).max(), err_msg=key)
