"""The panoptic mask head (config.model.masks): torch's resize rules by hand, exact padding's
invariance, the mask losses by hand, the frozen detector, and starting from a detector's weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.config import loss_config, model_config
from detr_jax.losses import compute_loss, mask_focal_dice
from detr_jax.models.detr import MASK_HEAD_MODULES, build_model, init_inputs, trainable_mask
from detr_jax.models.segmentation import resize


def tiny_masks_config(**overrides):
    return model_config(**{**dict(backbone="resnet_tiny", backbone_norm="group_norm", frozen_stages=-1, num_classes=7,
                                  num_queries=5, hidden_dim=128, num_heads=8, num_encoder_layers=1,
                                  num_decoder_layers=2, ffn_dim=64, dropout=0.0, masks=True), **overrides})


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_masks_config()
    model = build_model(cfg)
    return cfg, model, jax.jit(model.init)(jax.random.PRNGKey(0), *init_inputs(cfg))


def test_resize_follows_torch_interpolate_by_hand():
    x = jnp.asarray([0.0, 1.0, 2.0])[None, :, None, None] * jnp.ones((1, 3, 2, 1))  # [1, H=3, W=2, 1]
    hw = lambda h, w: jnp.asarray([[h, w]])
    # bilinear, align_corners=False, 3 -> 6: source rows max(0.5 (d + 0.5) - 0.5, 0) = 0, .25, .75, 1.25, 1.75, 2.25
    up = resize(x, hw(3, 2), hw(6, 2), (6, 2), "bilinear")[0, :, 0, 0]
    np.testing.assert_allclose(up, [0.0, 0.25, 0.75, 1.25, 1.75, 2.0], atol=1e-7)
    # nearest 3 -> 5: floor(d * 0.6) = 0, 0, 1, 1, 2
    near = resize(x, hw(3, 2), hw(5, 2), (5, 2), "nearest")[0, :, 0, 0]
    np.testing.assert_array_equal(near, [0.0, 0.0, 1.0, 1.0, 2.0])
    # each image its own sizes: image 1 reads only its top 2 rows (values 0, 1) and stretches them to 4
    both = resize(jnp.concatenate([x, x]), jnp.asarray([[3, 2], [2, 2]]), jnp.asarray([[6, 2], [4, 2]]), (6, 2),
                  "bilinear")[:, :, 0, 0]
    np.testing.assert_allclose(both[1, :4], [0.0, 0.25, 0.75, 1.0], atol=1e-7)


def test_mask_losses_by_hand():
    logits = jnp.asarray([[0.0, 2.0], [-1.0, 0.0]])
    target = jnp.asarray([[True, False], [False, False]])
    valid = jnp.asarray([[True, True], [True, False]])  # the last pixel does not count
    focal, dice = mask_focal_dice(logits, target, valid)
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
    t = np.array([1.0, 0.0, 0.0])
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    expected_focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).mean()
    expected_dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    np.testing.assert_allclose(focal, expected_focal, rtol=1e-6)
    np.testing.assert_allclose(dice, expected_dice, rtol=1e-6)


def _targets(segments, ids, valid):
    m = ids.shape[1]
    return dict(labels=jnp.ones(ids.shape, jnp.int32), boxes=jnp.tile(jnp.asarray([0.4, 0.4, 0.3, 0.3]), (1, m, 1)),
                box_valid=jnp.asarray(valid), segments=jnp.asarray(segments, jnp.int32),
                segment_ids=jnp.asarray(ids, jnp.int32))


def test_exact_padding_gives_each_image_its_own_masks_and_losses(tiny):
    """An image of 70 x 90 alone (canvas 70 x 90) and at the top left of a 96 x 128 canvas beside
    another image: the same mask logits on its valid C2 region, and the same mask losses."""
    _, model, variables = tiny
    rng = np.random.RandomState(0)
    image = rng.standard_normal((70, 90, 3)).astype(np.float32)
    segments = np.zeros((70, 90), np.int32)
    segments[5:40, 10:50], segments[30:66, 45:88] = 4, 9
    apply = jax.jit(model.apply)
    alone = apply(variables, image[None], np.zeros((1, 70, 90), bool))

    canvas = np.zeros((2, 96, 128, 3), np.float32)
    canvas[0, :70, :90], canvas[1] = image, rng.standard_normal((96, 128, 3))
    padding = np.ones((2, 96, 128), bool)
    padding[0, :70, :90], padding[1] = False, False
    padded = apply(variables, canvas, padding)
    hw = np.asarray(alone["pred_masks_hw"][0])
    np.testing.assert_array_equal(hw, [[18, 23], [70, 90]])
    np.testing.assert_array_equal(padded["pred_masks_hw"][0], hw)
    np.testing.assert_allclose(padded["pred_masks"][0, :, :18, :23], alone["pred_masks"][0], atol=2e-4)
    assert np.abs(np.asarray(alone["pred_masks"])).max() > 1e-2  # not trivially zero

    big_segments = np.zeros((2, 96, 128), np.int32)
    big_segments[0, :70, :90] = segments
    big_segments[1, 10:50, 10:60] = 4  # another image, the same id: must not leak into image 0's masks
    ids, valid = np.array([[4, 9]]), np.array([[True, True]])
    terms_of = jax.jit(lambda out, targets: compute_loss(out, targets, loss_config(), "softmax")[1])
    terms_alone = terms_of(alone, _targets(segments[None], ids, valid))
    other = np.array([[0, 0]]), np.array([[False, False]])  # image 1 without targets: the same number of boxes
    terms_padded = terms_of(padded, _targets(big_segments, np.concatenate([ids, other[0]]),
                                             np.concatenate([valid, other[1]])))
    for name in ("loss_mask", "loss_dice"):
        np.testing.assert_allclose(terms_padded[name], terms_alone[name], rtol=2e-5)
        assert float(terms_alone[name]) > 0


def test_frozen_detector_trains_the_mask_head_alone(tiny):
    cfg, _, variables = tiny
    frozen = trainable_mask(variables["params"], tiny_masks_config(freeze_detector=True))
    trained = {k for k, v in frozen.items() if any(jax.tree.leaves(v))}
    assert trained == set(MASK_HEAD_MODULES)
    assert all(jax.tree.leaves(frozen["mask_head"])) and all(jax.tree.leaves(frozen["bbox_attention"]))
    # without freezing the detector trains too (the from-scratch backbone whole)
    assert all(jax.tree.leaves(trainable_mask(variables["params"], cfg)))


def test_panoptic_prediction_reads_the_image_region_of_a_padded_canvas():
    """A 16 x 16 image at the top left of a 32 x 32 canvas (mask logits 8 x 8 at stride 4): query 0
    wins the grid's top-left 2 x 2 cells (pixels 0..7), query 1 the rest. Cropping the image's
    region gives query 0 the image's top-left 8 x 8 pixels (a quarter of it); official
    PostProcessPanoptic's stretch of the whole canvas over the image would give it 4 x 4."""
    from detr_jax.evaluation.masks import panoptic_prediction

    grid = np.full((2, 8, 8), -5.0, np.float32)
    grid[0, :2, :2], grid[1] = 5.0, 0.0
    slot = {"pred_masks": grid, "pred_masks_hw": np.array([[8, 8], [32, 32]]),
            "query_scores": np.array([0.9, 0.9]), "query_labels": np.array([1, 2])}
    ids, segments = panoptic_prediction(slot, (16, 16), (16, 16), np.array([True, True, False]), 3, 0.5)
    assert [s["label"] for s in segments] == [1, 2]
    first = ids == segments[0]["id"]
    assert first[:7, :7].all() and not first[9:].any() and not first[:, 9:].any()
    assert 49 <= segments[0]["area"] <= 81
    # the queries below the threshold, or predicting no object, make no segment: all void
    quiet = {**slot, "query_scores": np.array([0.4, 0.9]), "query_labels": np.array([1, 3])}
    ids, segments = panoptic_prediction(quiet, (16, 16), (16, 16), np.array([True, True, False]), 3, 0.5)
    assert segments == [] and not ids.any()


def test_a_detector_checkpoint_starts_the_mask_model(tiny, tmp_path):
    """The official recipe's second stage: a detector's official state_dict (no "detr." prefix, no
    mask head) into the mask model: the detector's weights kept, the mask head fresh (bias 0, as
    official), under DETRsegm's keys."""
    from detr_jax.config import init_config
    from detr_jax.convert import to_official_state_dict
    from detr_jax.training import initial_variables

    cfg, model, _ = tiny
    detector_config = tiny_masks_config(masks=False)
    detector = jax.jit(build_model(detector_config).init)(jax.random.PRNGKey(1), *init_inputs(detector_config))
    state_dict = to_official_state_dict(detector, detector_config)
    np.savez(tmp_path / "detector.npz", **state_dict)
    run = type("Run", (), {})()  # only .model and .init are read
    run.model, run.init = cfg, init_config(checkpoint=str(tmp_path / "detector.npz"))
    loaded = to_official_state_dict(initial_variables(run, model, jax.random.PRNGKey(3)), cfg)
    assert set(loaded) == {"detr." + k for k in state_dict} | {k for k in loaded if k.startswith(MASK_HEAD_MODULES)}
    for key, value in state_dict.items():
        np.testing.assert_array_equal(loaded["detr." + key], value, err_msg=key)
    np.testing.assert_array_equal(loaded["mask_head.lay1.bias"], 0.0)
    assert np.abs(loaded["mask_head.lay1.weight"]).max() > 0
