"""Deformable DETR: multi-scale deformable attention checked three ways (a numpy transcription of the
official ``grid_sample`` sampling, float64 finite differences, padding), both sampling paths equal,
the official Deformable DETR (plain, and box refinement + two-stage) against tests/data dumps of the
official PyTorch model, and the model's invariances."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import tiny_config
from detr_jax import build_model
from detr_jax.config import loss_config, model_config
from detr_jax.losses import compute_loss
from detr_jax.models.deformable import MSDA, MSDeformAttn, level_starts
from detr_jax.models.detr import init_inputs

SHAPES = ((6, 7), (3, 4), (2, 2), (1, 1))  # h x w of 4 levels
HEADS, POINTS, HEAD_DIM = 2, 3, 4


def grid_sample_numpy(value, shapes, locations, weights):
    """The official ``ms_deform_attn_core_pytorch`` transcribed loop by loop in float64: per level,
    ``F.grid_sample(value_l, 2 * loc - 1, mode='bilinear', padding_mode='zeros',
    align_corners=False)`` (torch's unnormalisation ((g + 1) * size - 1) / 2, the four corners
    nw / ne / sw / se, each read only when inside the map), weighted by the attention weights.
    value [B, N, H, c], locations [B, Q, H, L, P, 2], weights [B, Q, H, L, P] -> [B, Q, H * c]."""
    b, _, heads, c = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    out = np.zeros((b, q, heads, c))
    for n in range(b):
        for i in range(q):
            for h in range(heads):
                for lvl, ((height, width), start) in enumerate(zip(shapes, level_starts(shapes))):
                    plane = value[n, start:start + height * width, h].reshape(height, width, c)
                    for p in range(points):
                        gx, gy = 2 * locations[n, i, h, lvl, p] - 1
                        ix, iy = ((gx + 1) * width - 1) / 2, ((gy + 1) * height - 1) / 2
                        x0, y0 = math.floor(ix), math.floor(iy)
                        sample = np.zeros(c)
                        for x, y, w in ((x0, y0, (x0 + 1 - ix) * (y0 + 1 - iy)), (x0 + 1, y0, (ix - x0) * (y0 + 1 - iy)),
                                        (x0, y0 + 1, (x0 + 1 - ix) * (iy - y0)), (x0 + 1, y0 + 1, (ix - x0) * (iy - y0))):
                            if 0 <= x < width and 0 <= y < height:
                                sample += w * plane[y, x]
                        out[n, i, h] += weights[n, i, h, lvl, p] * sample
    return out.reshape(b, q, heads * c)


def random_sampling(seed, batch=2, queries=5):
    """value [B, N, H, c], locations [B, Q, H, L, P, 2] in [-0.3, 1.3] with some exactly on cell
    centres, cell edges and the map's borders, softmaxed weights [B, Q, H, L, P]; float64."""
    r = np.random.RandomState(seed)
    n = sum(h * w for h, w in SHAPES)
    value = r.standard_normal((batch, n, HEADS, HEAD_DIM))
    locations = r.uniform(-0.3, 1.3, (batch, queries, HEADS, len(SHAPES), POINTS, 2))
    widths = np.asarray([[w, h] for h, w in SHAPES], np.float64)[None, None, None, :, None, :]
    locations[:, 0] = (np.floor(locations[:, 0] * widths) + 0.5) / widths  # cell centres
    locations[:, 1] = np.round(locations[:, 1] * widths) / widths  # cell edges (corner weights 0.5)
    locations[:, 2, :, :, 0] = 0.0  # the map's top-left border
    locations[:, 2, :, :, 1] = 1.0  # its bottom-right border
    logits = r.standard_normal((batch, queries, HEADS, len(SHAPES) * POINTS))
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return value, locations, weights.reshape(batch, queries, HEADS, len(SHAPES), POINTS)


@pytest.mark.parametrize("impl", sorted(MSDA))
def test_sampling_is_the_official_grid_sample(impl):
    """Both paths against the numpy transcription, with points outside the map (25 % of them), on
    cell centres, edges and the borders; float32 error only."""
    value, locations, weights = random_sampling(0)
    expected = grid_sample_numpy(value, SHAPES, locations, weights)
    ours = MSDA[impl](*(jnp.asarray(x, jnp.float32) for x in (value,)), SHAPES,
                      jnp.asarray(locations, jnp.float32), jnp.asarray(weights, jnp.float32))
    assert ((locations < 0) | (locations > 1)).mean() > 0.1
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("impl", sorted(MSDA))
def test_sampling_gradients_match_finite_differences(impl):
    """d output / d (value, locations, weights) in float64 against central differences (points
    away from cell edges, where bilinear sampling has kinks)."""
    with jax.enable_x64(True):
        value, locations, weights = random_sampling(1, batch=1, queries=3)
        widths = np.asarray([[w, h] for h, w in SHAPES], np.float64)[None, None, None, :, None, :]
        fraction = locations * widths - 0.5 - np.floor(locations * widths - 0.5)
        locations = np.where(np.abs(fraction - 0.5) > 0.45, locations + 0.1 / widths, locations)  # off the kinks
        f = lambda v, loc, w: MSDA[impl](v, SHAPES, loc, w)
        check_grads(f, tuple(jnp.asarray(x) for x in (value, locations, weights)), order=1, modes=["rev"],
                    eps=1e-6, atol=1e-6, rtol=1e-6)


def test_attention_ignores_what_lies_on_padding():
    """MSDeformAttn masks padded values: whatever the padded cells hold (here noise x 1000), the
    output is the same; and it differs when the mask is off (the test can fail)."""
    r = np.random.RandomState(2)
    n, d = sum(h * w for h, w in SHAPES), HEADS * HEAD_DIM
    module = MSDeformAttn(HEADS, len(SHAPES), POINTS)
    query = jnp.asarray(r.standard_normal((2, 5, d)), jnp.float32)
    reference = jnp.asarray(r.uniform(0, 1, (2, 5, len(SHAPES), 2)), jnp.float32)
    value = r.standard_normal((2, n, d)).astype(np.float32)
    mask = np.zeros((2, n), bool)
    for start, (h, w) in zip(level_starts(SHAPES), SHAPES):  # image 1: right half of each level padded
        level = np.zeros((h, w), bool)
        level[:, (w + 1) // 2:] = True
        mask[1, start:start + h * w] = level.reshape(-1)
    variables = module.init(jax.random.PRNGKey(0), query, reference, jnp.asarray(value), SHAPES, jnp.asarray(mask))
    variables = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), variables)
    noisy = np.where(mask[..., None], 1000 * r.standard_normal(value.shape), value).astype(np.float32)
    run = lambda v, m: np.asarray(module.apply(variables, query, reference, jnp.asarray(v), SHAPES, jnp.asarray(m)))
    np.testing.assert_array_equal(run(value, mask), run(noisy, mask))
    assert np.abs(run(value, np.zeros_like(mask)) - run(noisy, np.zeros_like(mask)))[1].max() > 1.0


def tiny_deformable_model(**options):
    """A tiny Deformable DETR with box refinement (and by default two-stage: every path of the
    decoder), its variables perturbed off the official init (zero offsets and weights would hide
    mistakes)."""
    cfg = tiny_config(**{**dict(decoder="deformable", classification="sigmoid_focal", with_box_refine=True,
                                two_stage=True, dropout=0.0, num_queries=12), **options})
    model = build_model(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), *init_inputs(cfg))
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return model, jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                                      for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny_deformable():
    return tiny_deformable_model()


def canvas_batch(images, canvas):
    x, m = np.zeros((len(images), *canvas, 3), np.float32), np.ones((len(images), *canvas), bool)
    for i, image in enumerate(images):
        x[i, :image.shape[0], :image.shape[1]], m[i, :image.shape[0], :image.shape[1]] = image, False
    return jnp.asarray(x), jnp.asarray(m)


def test_exact_padding_makes_every_output_independent_of_canvas_and_batch(tiny_deformable):
    """With padding "exact" each image's detections (two-stage proposals chosen among its own cells,
    refined boxes, every layer) are those of the image alone on its own canvas, whatever the
    shape bucket and batch; the encoder proposals of its valid cells too."""
    model, variables = tiny_deformable
    rng = np.random.RandomState(0)
    images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in ((70, 90), (101, 64))]
    apply = jax.jit(model.apply)
    batched = apply(variables, *canvas_batch(images, (128, 128)))
    assert batched["pred_logits"].shape[-1] == model.num_classes and "enc_outputs" in batched
    for i, image in enumerate(images):
        alone = apply(variables, *canvas_batch([image], image.shape[:2]))
        for key in ("pred_logits", "pred_boxes"):
            np.testing.assert_allclose(batched[key][i], alone[key][0], rtol=0, atol=3e-5)
            for layer in range(len(alone["aux_outputs"])):
                np.testing.assert_allclose(batched["aux_outputs"][layer][key][i], alone["aux_outputs"][layer][key][0],
                                           rtol=0, atol=3e-5)


def test_gather_and_dense_sampling_give_the_same_model(tiny_deformable):
    model, variables = tiny_deformable
    images, mask = canvas_batch([np.random.RandomState(1).standard_normal((96, 80, 3)).astype(np.float32)], (96, 96))
    dense_model = build_model(tiny_config(decoder="deformable", classification="sigmoid_focal", with_box_refine=True,
                                          two_stage=True, dropout=0.0, num_queries=12, msda_impl="dense"))
    a, b = jax.jit(model.apply)(variables, images, mask), jax.jit(dense_model.apply)(variables, images, mask)
    for key in ("pred_logits", "pred_boxes"):
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5)


def test_remat_and_bfloat16_switches():
    """Loss and gradients (refinement, two-stage and their encoder loss) with remat of the
    transformer and backbone equal those without, to float rounding; bfloat16 computation keeps
    float32 gradients close to them (loss within 2 %, gradient cosine > 0.99), measured without
    two-stage (bfloat16 noise may swap proposals across the top-Q boundary, a discrete change)."""
    rng = np.random.RandomState(2)
    images, mask = canvas_batch([rng.standard_normal((96, 80, 3)).astype(np.float32),
                                 rng.standard_normal((64, 96, 3)).astype(np.float32)], (96, 96))
    targets = {"labels": jnp.asarray([[1, 3, 0], [2, 0, 0]], jnp.int32),
               "boxes": jnp.asarray(rng.uniform(0.2, 0.6, (2, 3, 4)), jnp.float32),
               "box_valid": jnp.asarray([[True, True, False], [True, False, False]])}

    def loss_and_grads(**options):  # the same variables whatever remat and dtype
        model, variables = tiny_deformable_model(**options)

        def loss(params):
            out = model.apply({**variables, "params": params}, images, mask, train=True)
            return compute_loss(out, targets, loss_config(cost_class=2.0, ce_weight=2.0), "sigmoid_focal")[0]

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])
    ref_loss, ref_grads = loss_and_grads()
    loss, grads = loss_and_grads(remat="all")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(flat(grads), flat(ref_grads), rtol=0, atol=1e-5 * np.abs(flat(ref_grads)).max())
    ref_loss, ref_grads = loss_and_grads(two_stage=False)
    loss, grads = loss_and_grads(two_stage=False, dtype="bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_allclose(loss, ref_loss, rtol=0.02)
    a, b = flat(grads), flat(ref_grads)
    assert 0.99 < a @ b / np.linalg.norm(a) / np.linalg.norm(b) < 1 - 1e-6  # close, and not float32's
