"""config.model.padding: "exact" gives every image the outputs of the image alone, unpadded, whatever
its canvas and batch; "official" convolves the canvas whole. The tiny model here; R50 and R101-DC5
against the official PyTorch model in tests/test_padding_official.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from detr_jax import build_model
from detr_jax.models.detr import image_valid_hw
from detr_jax.models.resnet import BACKBONES, ResNet, valid_region, zero_beyond

KEY = jax.random.PRNGKey(0)
SIZES = [(61, 77), (96, 53), (33, 40)]  # odd sizes: ceil(n / 2) differs from n / 2 at several strides


def pad_batch(images, canvas_hw):
    """Images [h, w, 3] -> (batch [B, H, W, 3] zero-padded bottom/right, padding_mask [B, H, W])."""
    batch = np.zeros((len(images), *canvas_hw, 3), np.float32)
    mask = np.ones((len(images), *canvas_hw), bool)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        batch[i, :h, :w], mask[i, :h, :w] = image, False
    return batch, mask


def random_images(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in SIZES]


@pytest.fixture(scope="module", params=["frozen_bn", "group_norm"])
def tiny(request):
    """(variables, apply of the exact model, apply of the official model), resnet_tiny with either norm."""
    exact = build_model(tiny_config(dropout=0.0, backbone_norm=request.param))
    official = build_model(tiny_config(dropout=0.0, backbone_norm=request.param, padding="official"))
    variables = exact.init(KEY, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    return variables, jax.jit(exact.apply), jax.jit(official.apply)


def test_exact_outputs_do_not_depend_on_canvas_or_batch(tiny):
    variables, apply, apply_official = tiny
    images = random_images()
    alone = [apply(variables, *pad_batch([image], image.shape[:2])) for image in images]
    canvas_hw = (128, 160)
    batched = apply(variables, *pad_batch(images, canvas_hw))
    for i, image in enumerate(images):
        single = apply(variables, *pad_batch([image], canvas_hw))
        for out, index in ((batched, i), (single, 0)):
            for a, b in zip(jax.tree_util.tree_leaves(alone[i]), jax.tree_util.tree_leaves(out)):
                np.testing.assert_allclose(np.asarray(b)[index], np.asarray(a)[0], rtol=0, atol=2e-5)
    official = apply_official(variables, *pad_batch(images, canvas_hw))
    moved = [np.abs(np.asarray(official["pred_boxes"][i]) - np.asarray(alone[i]["pred_boxes"][0])).max()
             for i in range(len(images))]
    # unpadded, both modes compute the same; padded, "official" moves the boxes: the check has teeth
    unpadded = apply_official(variables, *pad_batch(images[:1], images[0].shape[:2]))
    np.testing.assert_allclose(unpadded["pred_boxes"], alone[0]["pred_boxes"], rtol=0, atol=1e-6)
    assert min(moved) > 1e-4


def test_valid_size_chain_is_the_unpadded_feature_size():
    """output_valid_hw (ceil(n / 2) per stride-2 layer) = the feature size of the image alone."""
    for name, dilation in (("resnet50", False), ("resnet50", True), ("resnet_tiny", False)):
        backbone = ResNet(BACKBONES[name], dilation=dilation)
        for h, w in ((97, 131), (64, 33), (31, 1)):
            shape = jax.eval_shape(lambda x: backbone.init_with_output(KEY, x)[0], jnp.zeros((1, h, w, 3))).shape
            assert tuple(np.asarray(backbone.output_valid_hw(jnp.array([[h, w]])))[0]) == shape[1:3]


def test_feature_mask_is_beyond_the_valid_size():
    model = build_model(tiny_config())
    images, mask = pad_batch(random_images(), (128, 160))
    variables = model.init(KEY, images[:1], mask[:1])
    _, state = jax.jit(lambda v, x, m: model.apply(v, x, m, mutable=["intermediates"]))(variables, images, mask)
    feature_mask = np.asarray(state["intermediates"]["feature_mask"][0])
    expected = [(-(-h // 32), -(-w // 32)) for h, w in SIZES]  # ceil(ceil(ceil(ceil(ceil(n/2)/2)/2)/2)/2)
    for i, (h, w) in enumerate(expected):
        assert not feature_mask[i, :h, :w].any() and feature_mask[i, h:].all() and feature_mask[i, :, w:].all()


def test_helpers_by_hand():
    mask = np.zeros((2, 5, 7), bool)
    mask[0, 3:] = True
    mask[0, :, 6:] = True
    mask[1, :, 2:] = True
    np.testing.assert_array_equal(image_valid_hw(mask), [[3, 6], [5, 2]])
    region = np.asarray(valid_region(jnp.array([[3, 6], [5, 2]]), (5, 7)))
    np.testing.assert_array_equal(region, ~mask)
    x = jnp.ones((2, 5, 7, 4))
    np.testing.assert_array_equal(zero_beyond(x, jnp.array([[3, 6], [5, 2]])), np.repeat(~mask[..., None], 4, -1))
    assert zero_beyond(x, None) is x


def test_exact_needs_a_named_resnet():
    import flax.linen as nn

    with pytest.raises(ValueError, match="padding = 'exact' needs a named ResNet"):
        build_model(tiny_config(backbone="custom"), backbone=nn.Conv(8, (3, 3)))
    with pytest.raises(ValueError, match="config.model.padding"):
        build_model(tiny_config(padding="same"))
    official = build_model(tiny_config(backbone="custom", padding="official"), backbone=nn.Conv(8, (3, 3)))
    with pytest.raises(ValueError, match="padding = 'exact' needs a named ResNet"):  # evaluation's clone
        official.clone(padding="exact").init(KEY, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32), bool))


def test_evaluation_and_detection_run_exact_whatever_the_model_trained_with():
    """inference.predictor (behind evaluate, the val loss and detect) sets the model's padding:
    config.eval.padding, "exact" by default."""
    from detr_jax.config import eval_config
    from detr_jax.evaluation.inference import predictor

    trained_official = build_model(tiny_config(padding="official"))
    assert eval_config().padding == "exact"
    assert predictor(trained_official, 0).model.padding == "exact"
    assert predictor(trained_official, 0, padding="official").model.padding == "official"
