"""Deformable DETR: multi-scale deformable attention checked three ways (a numpy transcription of the
official ``grid_sample`` sampling, float64 finite differences, padding), both sampling paths equal,
the official Deformable DETR (plain, and box refinement + two-stage) against tests/data dumps of the
official PyTorch model, and the model's invariances."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import REPO, reference_targets, tiny_config
from detr_jax import build_model, checkpoint, convert
from detr_jax.config import loss_config, model_config
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.losses import compute_loss
from detr_jax.matching import index_pairs, match
from detr_jax.models.deformable import MSDA, MSDeformAttn, level_starts
from detr_jax.models.detr import init_inputs

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, os.path.dirname(__file__))
import deformable_layout  # noqa: E402
import official_layout  # noqa: E402

SHAPES = ((6, 7), (3, 4), (2, 2), (1, 1))  # h x w of 4 levels
HEADS, POINTS, HEAD_DIM = 2, 3, 4


def grid_sample_numpy(value, shapes, locations, weights):
    """The official ``ms_deform_attn_core_pytorch`` transcribed loop by loop in float64: per level,
    ``F.grid_sample(value_l, 2 * loc - 1, mode='bilinear', padding_mode='zeros',
    align_corners=False)`` (torch's unnormalisation ((g + 1) * size - 1) / 2, the four corners
    nw / ne / sw / se, each read only when inside the map), weighted by the attention weights.
    value [B, N, H, c], locations [B, Q, H, L, P, 2], weights [B, Q, H, L, P] -> [B, Q, H * c]."""
    b, _, heads, c = value.shape
    q, points = locations.shape[1], locations.shape[4]
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
    rng = np.random.RandomState(1)  # numpy: one jax.random program per leaf shape would cost seconds
    return model, jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)),
                               variables)


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
    """Loss and gradients (box refinement) with remat of the transformer and backbone equal those
    without, to float rounding; bfloat16 computation keeps float32 gradients close to them (loss
    within 2 %, gradient cosine > 0.99). Without two-stage: its proposal selection runs outside the
    remat scopes, and bfloat16 noise may swap proposals across the top-Q boundary (a discrete change)."""
    rng = np.random.RandomState(2)
    images, mask = canvas_batch([rng.standard_normal((96, 80, 3)).astype(np.float32),
                                 rng.standard_normal((64, 96, 3)).astype(np.float32)], (96, 96))
    targets = {"labels": jnp.asarray([[1, 3, 0], [2, 0, 0]], jnp.int32),
               "boxes": jnp.asarray(rng.uniform(0.2, 0.6, (2, 3, 4)), jnp.float32),
               "box_valid": jnp.asarray([[True, True, False], [True, False, False]])}

    def loss_and_grads(**options):  # the same variables whatever remat and dtype
        model, variables = tiny_deformable_model(two_stage=False, **options)

        def loss(params):
            out = model.apply({**variables, "params": params}, images, mask, train=True)
            return compute_loss(out, targets, loss_config(cost_class=2.0, ce_weight=2.0), "sigmoid_focal")[0]

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])
    ref_loss, ref_grads = loss_and_grads()
    loss, grads = loss_and_grads(remat="all")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(flat(grads), flat(ref_grads), rtol=0, atol=1e-5 * np.abs(flat(ref_grads)).max())
    loss, grads = loss_and_grads(dtype="bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_allclose(loss, ref_loss, rtol=0.02)
    a, b = flat(grads), flat(ref_grads)
    assert 0.99 < a @ b / np.linalg.norm(a) / np.linalg.norm(b) < 1 - 1e-6  # close, and not float32's


# the official models of tests/data (tests/data/make_deformable_ref.py): file -> config.model options
OFFICIAL = {"deformable_r50.npz": {}, "deformable_r50_refine_twostage.npz": dict(with_box_refine=True, two_stage=True)}


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def official(request):
    """(reference npz, config.model, variables, outputs, sown intermediates, order, (model, images,
    masks)) of the official model on its dump's inputs (padded-batch computation, no dropout).
    order[i][k]: our query that holds the official query k of image i (two-stage: proposals that
    are tied to float32 noise may be ranked either way; else the identity)."""
    options = OFFICIAL[request.param]
    ref = official_layout.load_npz(os.path.join(DATA, request.param))
    state_dict = deformable_layout.make_state_dict(int(ref["weights_seed"]), **options)
    assert official_layout.weights_sha256(state_dict) == str(ref["weights_sha256"])
    images, masks = official_layout.noise_batch(int(ref["image_seed"]), ref["image_sizes"])
    assert official_layout.array_sha256(images) == str(ref["images_sha256"])
    cfg = model_config(decoder="deformable", classification="sigmoid_focal", num_queries=300, ffn_dim=1024,
                       dropout=0.0, padding="official", **options)
    variables = convert.from_official_state_dict(state_dict, cfg)
    model = build_model(cfg)
    outputs, sown = jax.jit(lambda v, i, m: model.apply(v, i, m, mutable=["intermediates"]))(
        variables, nhwc(images), jnp.asarray(masks))
    sown = sown["intermediates"]
    order = np.tile(np.arange(300), (2, 1))
    if cfg.two_stage:
        ours = np.asarray(sown["transformer"]["topk_proposals"][0])
        assert set(map(tuple, np.sort(ours, 1))) == set(map(tuple, np.sort(ref["enc_topk_proposals"], 1)))
        order = np.stack([[list(ours[i]).index(t) for t in ref["enc_topk_proposals"][i]] for i in range(2)])
    return ref, cfg, variables, outputs, sown, order, (model, images, masks)


def aligned(x, order):
    """x [..., B, Q, ...] with our queries in the official order."""
    return np.stack([np.asarray(x)[..., i, order[i], :] for i in range(order.shape[0])], axis=-3)


def test_every_layer_and_the_proposals_match_the_official_model(official):
    """Logits and boxes of every decoder layer within 4x the official float32-vs-float64 gap of the
    float64 run; the encoder's proposals (two-stage: their scores at every cell, class logits at
    a subset, boxes) within 4x theirs; valid ratios, reference points and the first decoder
    layer's sampling locations and weights as official."""
    ref, cfg, _, outputs, sown, order, _ = official
    for key in ("pred_logits", "pred_boxes"):
        ours = aligned(np.stack([o[key] for o in outputs["aux_outputs"]] + [outputs[key]]), order)
        f64 = np.concatenate([ref[f"aux_{key}_f64"], ref[f"{key}_f64"][None]])
        gap = max(ref[f"yardstick/{key}"], ref[f"yardstick/aux_{key}"])
        assert np.abs(ours - f64).max() <= 4 * gap, (key, np.abs(ours - f64).max(), gap)
    references = sown["references"][0]
    np.testing.assert_allclose(aligned(references[0], order), ref["init_reference"], rtol=0, atol=2e-6)
    for layer in range(1, 6):  # inter_references[l - 1]: what layer l starts from
        np.testing.assert_allclose(aligned(references[layer], order), ref["inter_references"][layer - 1],
                                   rtol=0, atol=2e-6)
    queries = ref["dec0_queries"]
    cross = sown["transformer"]["decoder_layers_0"]["cross_attn"]
    for name, key in (("sampling_locations", "dec0_sampling_locations"), ("sampling_weights", "dec0_attention_weights")):
        ours = np.stack([np.asarray(cross[name][0])[i, order[i][queries]] for i in range(2)])
        np.testing.assert_allclose(ours, ref[key], rtol=0, atol=2e-5)
    if cfg.two_stage:
        proposals = outputs["enc_outputs"]
        gap = ref["yardstick/enc_pred_logits"]
        np.testing.assert_allclose(proposals["pred_logits"][..., 0], ref["enc_pred_logits0"], rtol=0, atol=4 * gap)
        np.testing.assert_allclose(np.asarray(proposals["pred_logits"])[:, ref["memory_token_index"]],
                                   ref["enc_pred_logits"], rtol=0, atol=4 * gap)
        np.testing.assert_allclose(proposals["pred_boxes"], ref["enc_pred_boxes"], rtol=0,
                                   atol=4 * ref["yardstick/enc_pred_boxes"])
    else:
        assert "enc_outputs" not in outputs


def test_matcher_losses_and_postprocess_match_the_official_code(official):
    ref, cfg, _, outputs, _, order, _ = official
    targets = reference_targets(ref)
    loss_cfg = loss_config(cost_class=2.0, ce_weight=2.0)
    matched = np.asarray(match(outputs, targets, loss_cfg, cfg.classification))
    official_query = np.argsort(order, axis=1)  # our query -> the official query it is
    for layer in range(6):
        for i, (src, tgt) in enumerate(index_pairs(matched[layer])):
            src = official_query[i][src]
            np.testing.assert_array_equal(np.sort(src), ref[f"match/L{layer}/img{i}_src"], err_msg=f"L{layer} img{i}")
            np.testing.assert_array_equal(tgt[np.argsort(src)], ref[f"match/L{layer}/img{i}_tgt"])
    if cfg.two_stage:  # the proposals against the targets, every label 0
        binary = {**targets, "labels": np.zeros_like(targets["labels"])}
        for i, (src, tgt) in enumerate(index_pairs(match(outputs["enc_outputs"], binary, loss_cfg,
                                                         cfg.classification)[0])):
            np.testing.assert_array_equal(src, ref[f"match/Lenc/img{i}_src"])
            np.testing.assert_array_equal(tgt, ref[f"match/Lenc/img{i}_tgt"])
    total, terms = compute_loss(outputs, targets, loss_cfg, cfg.classification)
    official_terms = {k[len("loss/"):]: float(v) for k, v in ref.items() if k.startswith("loss/")}
    assert set(terms) == set(official_terms)
    for name, value in official_terms.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(total) == pytest.approx(float(ref["loss_total"]), rel=1e-5)

    post = postprocess(outputs["pred_logits"], outputs["pred_boxes"], jnp.asarray(ref["image_sizes"]),
                       cfg.classification, topk=100)
    for i in range(2):  # near-tied scores may swap places: compare as sets keyed by (query, label)
        ours = {(int(official_query[i][q]), int(c)): (float(s), np.asarray(b)) for q, c, s, b in
                zip(post["queries"][i], post["labels"][i], post["scores"][i], post["boxes"][i])}
        theirs = {(int(q), int(c)): (float(s), b) for q, c, s, b in
                  zip(ref["post_query_index"][i], ref["post_labels"][i], ref["post_scores"][i], ref["post_boxes"][i])}
        assert ours.keys() == theirs.keys()
        for key, (score, box) in theirs.items():
            assert ours[key][0] == pytest.approx(score, abs=1e-5)
            np.testing.assert_allclose(ours[key][1], box, rtol=0, atol=1e-3)  # pixels


@pytest.mark.parametrize("official", ["deformable_r50_refine_twostage.npz"], indirect=True)
def test_loss_gradients_match_the_official_model(official):
    """Through every module of the plain model but its query-embedding reference points (its forward
    pass is compared above), plus refinement and two-stage."""
    ref, cfg, variables, _, _, _, (model, images, masks) = official
    targets = reference_targets(ref)
    loss_cfg = loss_config(cost_class=2.0, ce_weight=2.0)

    def loss(params):
        outputs = model.apply({**variables, "params": params}, nhwc(images), jnp.asarray(masks))
        return compute_loss(outputs, targets, loss_cfg, cfg.classification)[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    ours = convert.to_official_state_dict({**variables, "params": grads}, cfg)
    keys = [k[len("grad/"):] for k in ref if k.startswith("grad/")]
    assert len(keys) >= 8
    for key in keys:
        expected = ref[f"grad/{key}"]
        got = ours[key][:len(expected)]
        atol = max(1e-3 * np.abs(expected).max(), 4 * float(ref[f"grad_gap/{key}"]), 1e-6)
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol, err_msg=key)


def test_convert_round_trips_the_official_layout_and_refuses_a_broken_alias(official, tmp_path):
    """official state_dict -> variables -> state_dict is the identity (shared heads and the
    decoder's references to them under every key); the command line converts the two-stage file
    with --source=deformable_detr; an alias that differs from the module it repeats is refused."""
    ref, cfg, variables, _, _, _, _ = official
    options = OFFICIAL["deformable_r50_refine_twostage.npz" if cfg.two_stage else "deformable_r50.npz"]
    state_dict = deformable_layout.make_state_dict(int(ref["weights_seed"]), **options)
    back = convert.to_official_state_dict(variables, cfg)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    alias = "transformer.decoder.class_embed.3.bias" if cfg.two_stage else "class_embed.3.bias"
    state_dict[alias] = state_dict[alias] + 1
    with pytest.raises(convert.CheckpointMismatchError, match=f"{alias} should repeat"):
        convert.from_official_state_dict(state_dict, cfg)
    if not cfg.two_stage:
        return
    state_dict[alias] = state_dict[alias] - 1
    np.savez(tmp_path / "official.npz", **state_dict)
    result = subprocess.run([sys.executable, "-m", "detr_jax.convert", "--config=configs/deformable_coco.py:two_stage",
                             "--source=deformable_detr", f"--input={tmp_path / 'official.npz'}",
                             f"--output={tmp_path / 'converted'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deformable decoder (box refinement, two-stage), sigmoid_focal classification" in result.stdout
    saved, saved_config = checkpoint.load_variables(tmp_path / "converted")
    assert (saved_config.decoder, saved_config.with_box_refine, saved_config.two_stage) == ("deformable", True, True)
    for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_single_scale_has_the_official_layout_and_runs():
    """num_feature_levels = 1 (official ``--num_feature_levels 1``): C5 alone through input_proj.0
    (1x1 conv + GroupNorm), one level embedding, sampling offsets and weights for one level."""
    cfg = model_config(decoder="deformable", classification="sigmoid_focal", num_queries=300, ffn_dim=1024,
                       num_feature_levels=1)
    shapes = {leaf.key: leaf.shape for leaf in convert.model_leaves(cfg)}  # Flax shapes (HWIO, in x out)
    assert {k: v for k, v in shapes.items() if k.startswith("input_proj.")} == {
        "input_proj.0.0.weight": (1, 1, 2048, 256), "input_proj.0.0.bias": (256,),
        "input_proj.0.1.weight": (256,), "input_proj.0.1.bias": (256,)}
    assert shapes["transformer.level_embed"] == (1, 256)
    assert shapes["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"] == (256, 8 * 1 * 4 * 2)
    assert shapes["transformer.decoder.layers.0.cross_attn.attention_weights.weight"] == (256, 8 * 1 * 4)
    model, variables = tiny_deformable_model(num_feature_levels=1, two_stage=False)
    image, mask = canvas_batch([np.ones((64, 96, 3), np.float32)], (64, 96))
    outputs, state = model.apply(variables, image, mask, mutable=["intermediates"])
    assert outputs["pred_boxes"].shape == (1, 12, 4) and np.isfinite(outputs["pred_logits"]).all()
    (mask,) = state["intermediates"]["feature_mask"]  # one level: sown as an array
    assert mask.shape == (1, 2, 3)  # stride 32
