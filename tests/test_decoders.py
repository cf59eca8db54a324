"""The decoder extension point (config.model.decoder) and sigmoid-focal classification end to end:
Conditional DETR and DAB-DETR against their official PyTorch models (tests/data/conditional_r50.npz,
dab_r50.npz), the focal PostProcess by hand, invariances, and a tiny run of each decoder through
train, eval and detect."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, assert_official_matching, tiny_config
from detr_jax import build_model, checkpoint, convert
from detr_jax.classification import FOCAL_PRIOR
from detr_jax.config import loss_config, model_config
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.losses import compute_loss
from detr_jax.matching import match

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, os.path.dirname(__file__))
import conditional_layout  # noqa: E402
import dab_layout  # noqa: E402
import official_layout  # noqa: E402

# each official model: the layout module, its dump, config.model and config.loss as its main.py
OFFICIAL = {
    "conditional": (conditional_layout, "conditional_r50.npz",
                    dict(decoder="conditional", classification="sigmoid_focal", num_queries=300),
                    dict(cost_class=2.0, ce_weight=2.0)),
    "dab": (dab_layout, "dab_r50.npz",
            dict(decoder="dab", classification="sigmoid_focal", num_queries=300, activation="prelu"),
            dict(cost_class=2.0, ce_weight=1.0, giou_eps=1e-6)),
}


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def official(request):
    """(reference npz, config.model, config.loss, variables, outputs, apply) of one decoder's
    official model on its dump's inputs (official padded-batch computation, no dropout)."""
    layout, name, model_fields, loss_fields = OFFICIAL[request.param]
    ref = official_layout.load_npz(os.path.join(DATA, name))
    state_dict = layout.make_state_dict(int(ref["weights_seed"]))
    assert official_layout.weights_sha256(state_dict) == str(ref["weights_sha256"])
    images, masks = official_layout.noise_batch(int(ref["image_seed"]), ref["image_sizes"])
    assert official_layout.array_sha256(images) == str(ref["images_sha256"])
    cfg = model_config(padding="official", dropout=0.0, **model_fields)
    variables = convert.from_official_state_dict(state_dict, cfg)
    model = build_model(cfg)
    apply = jax.jit(lambda v, i, m: model.apply(v, i, m))
    outputs = apply(variables, nhwc(images), jnp.asarray(masks))
    return ref, cfg, loss_config(**loss_fields), variables, outputs, (model, images, masks)


def stacked(outputs, key):
    return np.stack([np.asarray(o[key]) for o in outputs["aux_outputs"]] + [np.asarray(outputs[key])])


def reference_targets(ref):
    n = [len(ref[f"tgt{i}_labels"]) for i in range(2)]
    labels, boxes = np.zeros((2, max(n)), np.int32), np.zeros((2, max(n), 4), np.float32)
    valid = np.zeros((2, max(n)), bool)
    for i in range(2):
        labels[i, :n[i]], boxes[i, :n[i]], valid[i, :n[i]] = ref[f"tgt{i}_labels"], ref[f"tgt{i}_boxes"], True
    return {"labels": jnp.asarray(labels), "boxes": jnp.asarray(boxes), "box_valid": jnp.asarray(valid)}


def test_every_layer_matches_the_official_model(official):
    """Logits and boxes of every decoder layer within 4x the official float32-vs-float64 gap of
    the float64 run (the README's yardstick)."""
    ref, *_, outputs, _ = official
    for key in ("pred_logits", "pred_boxes"):
        ours = stacked(outputs, key)
        f64 = np.concatenate([ref[f"aux_{key}_f64"], ref[f"{key}_f64"][None]])
        f32 = np.concatenate([ref[f"aux_{key}"], ref[key][None]])
        gap = np.abs(f32 - f64).max()
        assert ours.shape == f64.shape
        assert np.abs(ours - f64).max() <= 4 * gap, (key, np.abs(ours - f64).max(), gap)


def test_matcher_losses_and_postprocess_match_the_official_code(official):
    ref, cfg, loss_cfg, _, outputs, _ = official
    targets = reference_targets(ref)
    assert_official_matching(np.asarray(match(outputs, targets, loss_cfg, cfg.classification)), ref)
    total, terms = compute_loss(outputs, targets, loss_cfg, cfg.classification)
    official_terms = {k[len("loss/"):]: float(v) for k, v in ref.items() if k.startswith("loss/")
                      and not k.startswith(("loss/loss_xy", "loss/loss_hw"))}  # DAB's logging-only L1 split
    assert set(terms) == set(official_terms)
    for name, value in official_terms.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(total) == pytest.approx(float(ref["loss_total"]), rel=1e-5)

    post = postprocess(outputs["pred_logits"], outputs["pred_boxes"], jnp.asarray(ref["image_sizes"]),
                       cfg.classification, topk=len(ref["post_scores"][0]))
    for i in range(2):  # near-tied scores may swap places: compare as sets keyed by (query, label)
        ours = {(int(q), int(c)): (float(s), np.asarray(b)) for q, c, s, b in
                zip(post["queries"][i], post["labels"][i], post["scores"][i], post["boxes"][i])}
        theirs = {(int(q), int(c)): (float(s), b) for q, c, s, b in
                  zip(ref["post_query_index"][i], ref["post_labels"][i], ref["post_scores"][i], ref["post_boxes"][i])}
        assert ours.keys() == theirs.keys()
        for key, (score, box) in theirs.items():
            assert ours[key][0] == pytest.approx(score, abs=1e-5)
            np.testing.assert_allclose(ours[key][1], box, rtol=0, atol=1e-3)  # pixels


def test_loss_gradients_match_the_official_model(official):
    ref, cfg, loss_cfg, variables, _, (model, images, masks) = official
    targets = reference_targets(ref)

    def loss(params):
        outputs = model.apply({**variables, "params": params}, nhwc(images), jnp.asarray(masks))
        return compute_loss(outputs, targets, loss_cfg, cfg.classification)[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    ours = convert.to_official_state_dict({**variables, "params": grads}, cfg)
    keys = [k[len("grad/"):] for k in ref if k.startswith("grad/")]
    assert keys
    for key in keys:
        expected = ref[f"grad/{key}"]
        got = ours[key][:len(expected)]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=max(1e-3 * scale, 1e-6), err_msg=key)


def test_focal_postprocess_is_the_sigmoid_top_k_over_queries_and_classes():
    """Hand-computed: the best (query, class) pairs of the flat sigmoid list, a query with two
    classes listed twice, each with its query's box; softmax reads the same logits per query."""
    logits = jnp.array([[[3.0, 2.0], [-1.0, -2.0], [0.5, 2.5]]])  # [1 image, 3 queries, 2 classes]
    boxes = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.4, 0.2]]])
    size = jnp.array([[100, 200]])  # (h, w)
    got = postprocess(logits, boxes, size, "sigmoid_focal", topk=3)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    np.testing.assert_array_equal(got["queries"][0], [0, 2, 0])
    np.testing.assert_array_equal(got["labels"][0], [0, 1, 1])
    np.testing.assert_allclose(got["scores"][0], sigmoid(np.array([3.0, 2.5, 2.0])), rtol=1e-6)
    np.testing.assert_allclose(got["boxes"][0, 1], [100, 50, 180, 70], rtol=1e-6)  # query 2 in pixels
    assert postprocess(logits, boxes, size, "sigmoid_focal")["scores"].shape == (1, 6)  # 0: min(100, Q x C)
    softmax = postprocess(logits, boxes, size, "softmax")  # logit 1 would be no-object: one class per query
    np.testing.assert_array_equal(softmax["labels"][0], [0, 0, 0])
    with pytest.raises(ValueError, match="1..6"):
        postprocess(logits, boxes, size, "sigmoid_focal", topk=7)


@pytest.mark.parametrize("decoder", ["conditional", "dab"])
def test_focal_model_head_and_exact_padding(decoder):
    """A focal model has num_classes logits starting at the prior; its outputs (and references) do
    not depend on the canvas or the batch with padding "exact"."""
    extra = dict(activation="prelu") if decoder == "dab" else {}
    model = build_model(tiny_config(decoder=decoder, classification="sigmoid_focal", dropout=0.0, **extra))
    rng = np.random.RandomState(0)
    images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in ((61, 77), (96, 53))]
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    bias = np.asarray(variables["params"]["class_embed"]["bias"])
    np.testing.assert_allclose(bias, np.log(FOCAL_PRIOR / (1 - FOCAL_PRIOR)), rtol=1e-6)
    apply = jax.jit(lambda v, x, m: model.apply(v, x, m, mutable=["intermediates"]))

    def run(batch, canvas):
        x, m = np.zeros((len(batch), *canvas, 3), np.float32), np.ones((len(batch), *canvas), bool)
        for i, image in enumerate(batch):
            x[i, :image.shape[0], :image.shape[1]], m[i, :image.shape[0], :image.shape[1]] = image, False
        out, sown = apply(variables, x, m)
        return out, sown["intermediates"]["references"][0]

    batched, references = run(images, (128, 96))
    assert batched["pred_logits"].shape[-1] == model.num_classes
    assert references.shape[-1] == (2 if decoder == "conditional" else 4)
    for i, image in enumerate(images):
        alone, alone_references = run([image], image.shape[:2])
        for key in ("pred_logits", "pred_boxes"):
            np.testing.assert_allclose(batched[key][i], alone[key][0], rtol=0, atol=2e-5)
        np.testing.assert_allclose(references[:, i], alone_references[:, 0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("decoder", ["dn_dab", "deformable_two_stage"])
def test_a_tiny_focal_run_trains_evaluates_and_detects(decoder, tmp_path):
    """What train.py and detect do, in process (their command lines are tested on the DETR decoder):
    the synthetic :DECODER_tiny config trained 2 steps and evaluated at the end (COCO AP and the val
    loss of the focal model; two-stage Deformable DETR's proposal terms too; DN-DAB-DETR trains its
    denoising terms, which evaluation, without denoising queries, does not have), then its checkpoint
    detects on a val image, with the decoder attention where the model has a dense one (Deformable
    DETR's sampled attention is refused by name before any work)."""
    from configs.synthetic import get_config
    from detr_jax.errors import UsageError
    from detr_jax.training import train_and_evaluate
    from detr_jax.visualize.detect import detect_checkpoint

    config = get_config(f"{decoder}_tiny")
    config.data.data_dir = str(tmp_path / "data")
    config.train.update(num_steps=2, eval_at_end=True)
    train_and_evaluate(config, tmp_path / "run")
    (evaluation,) = [json.loads(line) for line in (tmp_path / "run" / "history" / "eval.jsonl").read_text().splitlines()]
    assert 0 <= evaluation["AP"] <= 1 and evaluation["val_loss_ce"] > 0
    assert ("val_loss_ce_enc" in evaluation) == decoder.endswith("two_stage")
    assert not any("_dn" in key for key in evaluation)
    trained = json.loads((tmp_path / "run" / "history" / "train.jsonl").read_text().splitlines()[-1])
    assert ("loss_ce_dn" in trained and "loss_giou_dn_0" in trained) == decoder.startswith("dn_")
    detect = lambda out, attention: detect_checkpoint(
        None, str(tmp_path / "data" / "val" / "000001.jpg"), tmp_path / out, workdir=tmp_path / "run", threshold=0.0,
        topk=7, decoder_attention=attention, log=lambda _: None)
    dense_attention = decoder == "dn_dab"
    if not dense_attention:
        with pytest.raises(UsageError, match="attention maps need dense attention"):
            detect("refused", True)
        assert not (tmp_path / "refused").exists()
    found = detect("detect", dense_attention)
    (image,) = found["images"]
    scores = [d["score"] for d in image["detections"]]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert (tmp_path / "detect" / "000001_decoder_attention.png").exists() == dense_attention


def test_convert_round_trips_each_official_layout_and_refuses_mismatches(official, tmp_path):
    """The official state_dict -> variables -> state_dict is the identity (DAB's aliased box head
    included); the command line converts it with --source; a config of another decoder, or a DAB
    file whose alias copy differs, is refused."""
    ref, cfg, _, variables, _, _ = official
    layout, _, _, _ = OFFICIAL[cfg.decoder]
    state_dict = layout.make_state_dict(int(ref["weights_seed"]))
    back = convert.to_official_state_dict(variables, cfg)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    source = {"conditional": "conditional_detr", "dab": "dab_detr"}[cfg.decoder]
    np.savez(tmp_path / "official.npz", **state_dict)
    config_file = {"conditional": "configs/conditional_coco.py:r50", "dab": "configs/dab_coco.py:r50"}[cfg.decoder]
    result = subprocess.run([sys.executable, "-m", "detr_jax.convert", f"--config={config_file}", f"--source={source}",
                             f"--input={tmp_path / 'official.npz'}", f"--output={tmp_path / 'converted'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{cfg.decoder} decoder, sigmoid_focal classification, 300 queries" in result.stdout
    saved, saved_config = checkpoint.load_variables(tmp_path / "converted")
    assert saved_config.decoder == cfg.decoder
    for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = "official" if cfg.decoder == "conditional" else "conditional_detr"
    with pytest.raises(convert.CheckpointMismatchError, match=f"--source={other} .* decoder={cfg.decoder!r}"):
        convert.convert_file(tmp_path / "official.npz", tmp_path / "refused", cfg, source=other)
    if cfg.decoder == "dab":
        state_dict["transformer.decoder.bbox_embed.layers.0.bias"] = state_dict["bbox_embed.layers.0.bias"] + 1
        with pytest.raises(convert.CheckpointMismatchError, match="should repeat bbox_embed.layers.0.bias"):
            convert.from_official_state_dict(state_dict, cfg)
