"""The DETR module on a tiny config: shapes, invariances, options, building blocks, errors."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from detr_jax import build_model
from detr_jax.models.position import LearnedPositionEmbedding, SinePositionEmbedding, downsample_mask, nearest_indices
from detr_jax.models.resnet import FrozenBatchNorm

KEY = jax.random.PRNGKey(0)


def init(model, h=64, w=64, b=1):
    return model.init(KEY, jnp.zeros((b, h, w, 3)), jnp.zeros((b, h, w), bool))


def canvas(images_hw, canvas_hw, seed=0):
    """Images of the given valid sizes, zero-padded bottom/right to one canvas (official layout)."""
    rng = np.random.RandomState(seed)
    images = np.zeros((len(images_hw), *canvas_hw, 3), np.float32)
    mask = np.ones((len(images_hw), *canvas_hw), bool)
    for i, (h, w) in enumerate(images_hw):
        images[i, :h, :w] = rng.standard_normal((h, w, 3))
        mask[i, :h, :w] = False
    return images, mask


@pytest.fixture(scope="module")
def tiny():
    model = build_model(tiny_config())
    return model, init(model), jax.jit(model.apply)


def test_output_format(tiny):
    model, variables, apply = tiny
    images, mask = canvas([(64, 96), (96, 64)], (96, 96))
    out = apply(variables, images, mask)
    assert out["pred_logits"].shape == (2, 10, 6) and out["pred_logits"].dtype == jnp.float32
    assert out["pred_boxes"].shape == (2, 10, 4)
    assert np.all((np.asarray(out["pred_boxes"]) > 0) & (np.asarray(out["pred_boxes"]) < 1))
    assert len(out["aux_outputs"]) == 2  # 3 decoder layers: every one but the last
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 10, 6) and aux["pred_boxes"].shape == (2, 10, 4)
    assert set(variables) == {"params", "buffers"}


def test_jit_matches_eager(tiny):
    model, variables, apply = tiny
    images, mask = canvas([(64, 80)], (64, 96))
    eager = model.apply(variables, images, mask)
    jitted = apply(variables, images, mask)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_extra_padding_does_not_change_an_images_outputs(tiny):
    """The same 64x64 image alone on a 320x320 canvas, and batched with a larger image on a
    384x448 canvas. Padding is zero like official, and stays beyond the backbone's receptive
    field (~200 px for resnet_tiny) of the image's features, so outputs must agree to float
    rounding: this checks the feature mask, the position embedding's normalisation over the
    unpadded region and the key-padding masks of every attention."""
    _, variables, apply = tiny
    alone_images, alone_mask = canvas([(64, 64)], (320, 320))
    batch_images, batch_mask = canvas([(64, 64), (300, 380)], (384, 448))
    batch_images[0, :64, :64] = alone_images[0, :64, :64]
    alone = apply(variables, alone_images, alone_mask)
    batched = apply(variables, batch_images, batch_mask)
    for a, b in zip(jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(batched)):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=1e-4, atol=2e-5)
    # the same image with padding ignored by the masks would differ: the check has teeth
    unmasked = apply(variables, batch_images, np.zeros_like(batch_mask))
    assert np.abs(np.asarray(unmasked["pred_logits"][0]) - np.asarray(alone["pred_logits"][0])).max() > 1e-3


def test_batch_elements_are_independent(tiny):
    _, variables, apply = tiny
    images, mask = canvas([(64, 96), (96, 96), (32, 48)], (96, 96), seed=3)
    batched = apply(variables, images, mask)
    for i in range(3):
        single = apply(variables, images[i:i + 1], mask[i:i + 1])
        np.testing.assert_allclose(batched["pred_logits"][i], single["pred_logits"][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched["pred_boxes"][i], single["pred_boxes"][0], rtol=1e-5, atol=1e-6)


def test_dropout_only_when_training(tiny):
    model, variables, apply = tiny
    images, mask = canvas([(64, 64)], (64, 64))
    train = jax.jit(lambda v, x, m, r: model.apply(v, x, m, train=True, rngs={"dropout": r}))
    a = train(variables, images, mask, jax.random.PRNGKey(1))["pred_logits"]
    b = train(variables, images, mask, jax.random.PRNGKey(2))["pred_logits"]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    no_dropout = build_model(tiny_config(dropout=0.0))
    c = no_dropout.apply(variables, images, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_allclose(c["pred_logits"], apply(variables, images, mask)["pred_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(activation="gelu", norm="rms_norm"),
    dict(activation="swish", ffn_type="swiglu", pre_norm=True),
    dict(activation="mish", ffn_type="geglu", position_embedding="learned"),
    dict(ffn_type="glu", norm="rms_norm", pre_norm=True, position_embedding="learned"),
    dict(dtype="bfloat16"),
])
def test_architecture_options(options):
    model = build_model(tiny_config(**options))
    variables = init(model)
    params = variables["params"]
    images, mask = canvas([(64, 48)], (64, 64))
    out = jax.jit(model.apply)(variables, images, mask)
    assert out["pred_logits"].shape == (1, 10, 6) and out["pred_logits"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out["pred_logits"]))) and np.all(np.isfinite(np.asarray(out["pred_boxes"])))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))  # float32 parameters
    transformer = params["transformer"]
    assert ("encoder_norm" in transformer) == options.get("pre_norm", False)
    assert ("gate" in transformer["encoder_layers_0"]["ffn"]) == (options.get("ffn_type", "mlp") != "mlp")
    norm_params = set(transformer["decoder_norm"])
    assert norm_params == ({"scale"} if options.get("norm") == "rms_norm" else {"scale", "bias"})
    assert ("position_embedding" in params) == (options.get("position_embedding") == "learned")


def test_custom_backbone():
    class TwoConvs(nn.Module):
        @nn.compact
        def __call__(self, x):  # stride 16, 24 channels
            x = nn.relu(nn.Conv(12, (3, 3), (4, 4))(x))
            return nn.Conv(24, (3, 3), (4, 4))(x)

    from detr_jax.models import count_trainable

    config = tiny_config(backbone="custom", padding="official")
    model = build_model(config, backbone=TwoConvs())
    variables = init(model)
    out, state = model.apply(variables, *canvas([(64, 32)], (64, 64)), mutable=["intermediates"])
    assert state["intermediates"]["backbone_features"][0].shape == (1, 4, 4, 24)
    assert out["pred_boxes"].shape == (1, 10, 4)
    n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    assert count_trainable(variables["params"], config) == n  # a custom backbone is trained whole
    with pytest.raises(ValueError, match="custom"):
        build_model(tiny_config(padding="official"), backbone=TwoConvs())
    with pytest.raises(ValueError, match="custom"):
        build_model(config)


@pytest.mark.parametrize("images, mask, message", [
    (np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), bool), "images must be float \\[B, H, W, 3\\]"),
    (np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 3, 64), bool), "NCHW"),
    (np.zeros((1, 64, 64, 4), np.float32), np.zeros((1, 64, 64), bool), "got shape \\(1, 64, 64, 4\\)"),
    (np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 64, 64), bool), "float array"),
    (np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 64, 32), bool), "padding_mask must be bool \\[B, H, W\\]"),
    (np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 64, 64), np.float32), "True = padding"),
])
def test_bad_inputs_get_clear_errors(tiny, images, mask, message):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.apply(variables, images, mask)


@pytest.mark.parametrize("field, value", [("activation", "tanh"), ("norm", "batch_norm"), ("ffn_type", "moe"),
                                          ("position_embedding", "rope"), ("dtype", "float16"),
                                          ("backbone", "vit"), ("num_heads", 5)])
def test_bad_config_gets_clear_errors(field, value):
    """The validator (run by every entry point) names the field; build_model trusts a valid config."""
    from detr_jax.errors import ConfigError
    from detr_jax.validation import validate

    with pytest.raises(ConfigError, match=f"config.model.{field if field != 'num_heads' else 'hidden_dim'} = "):
        validate({"model": tiny_config(**{field: value})})


def test_dc5_halves_the_stride():
    from configs.detr_coco import get_config

    def feature_shape(variant):
        model = build_model(get_config(variant).model)
        x, m = jnp.zeros((1, 128, 96, 3)), jnp.zeros((1, 128, 96), bool)
        shapes = jax.eval_shape(lambda: model.init_with_output(KEY, x, m, mutable=["params", "buffers", "intermediates"]))
        return shapes[1]["intermediates"]["backbone_features"][0].shape

    assert feature_shape("r50") == (1, 4, 3, 2048)
    assert feature_shape("r50_dc5") == (1, 8, 6, 2048)
    with pytest.raises(ValueError, match="DC5"):
        init(build_model(tiny_config(dilation=True)))


def test_nearest_mask_downsampling_as_torch():
    assert nearest_indices(10, 4).tolist() == [0, 2, 5, 7]  # floor(i * 2.5)
    assert nearest_indices(320, 10).tolist() == list(range(0, 320, 32))
    assert nearest_indices(241, 8).tolist() == [math.floor(i * np.float32(241 / 8)) for i in range(8)]
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 5:, :] = True
    mask[0, :, 6:] = True
    small = np.asarray(downsample_mask(jnp.asarray(mask), (4, 4)))
    expected = np.zeros((4, 4), bool)
    expected[3, :] = True  # rows 0,2,4,6 sampled: only row 6 is padding
    expected[:, 3] = True  # column 6 is padding
    np.testing.assert_array_equal(small[0], expected)


def test_sine_embedding_by_hand():
    mask = np.zeros((1, 3, 4), bool)
    mask[0, :, 3] = True  # last column padding
    mask[0, 2, :] = True  # last row padding
    pos = np.asarray(SinePositionEmbedding(4).apply({}, jnp.asarray(mask)))
    assert pos.shape == (1, 3, 4, 8)
    # cell (row 1, col 2): y = 2/2 * 2pi, x = 3/3 * 2pi; dims (sin, cos) at temperature^(0), ^(2/4)
    y, x = 2 * math.pi * 2 / (2 + 1e-6), 2 * math.pi * 3 / (3 + 1e-6)
    want = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
            math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    np.testing.assert_allclose(pos[0, 1, 2], want, atol=1e-6)
    # more padding leaves the unpadded region's embedding unchanged
    bigger = np.ones((1, 5, 7), bool)
    bigger[0, :3, :4] = mask[0]
    pos_big = np.asarray(SinePositionEmbedding(4).apply({}, jnp.asarray(bigger)))
    np.testing.assert_allclose(pos_big[0, :2, :3], pos[0, :2, :3], atol=1e-6)


def test_learned_embedding_layout_and_limit():
    module = LearnedPositionEmbedding(3)
    variables = module.init(KEY, jnp.zeros((2, 4, 5), bool))
    pos = np.asarray(module.apply(variables, jnp.zeros((2, 4, 5), bool)))
    row, col = np.asarray(variables["params"]["row_embed"]), np.asarray(variables["params"]["col_embed"])
    np.testing.assert_array_equal(pos[1, 2, 3], np.concatenate([col[3], row[2]]))  # x half first, as official
    with pytest.raises(ValueError, match="50 x 50"):
        module.apply(variables, jnp.zeros((1, 51, 4), bool))


def test_frozen_batch_norm_by_hand():
    x = np.array([[[[1.0, -2.0]]]], np.float32)
    buffers = {"weight": np.array([2.0, 0.5]), "bias": np.array([0.1, -0.1]),
               "running_mean": np.array([0.5, 1.0]), "running_var": np.array([4.0, 0.25])}
    y = np.asarray(FrozenBatchNorm().apply({"buffers": buffers}, x))
    want = [(1 - 0.5) / math.sqrt(4 + 1e-5) * 2 + 0.1, (-2 - 1) / math.sqrt(0.25 + 1e-5) * 0.5 - 0.1]
    np.testing.assert_allclose(y[0, 0, 0], want, rtol=1e-6)
