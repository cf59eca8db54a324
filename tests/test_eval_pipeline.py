"""``evaluate`` end to end: the tiny DETR on a small synthetic val split at batch sizes 1, 3 and 8
(same 12 numbers, every image once, one compilation per shape), the val loss (that of the whole
split in one batch), hosts and devices, output files, and an oracle model on a custom dataset with
non-contiguous category ids (AP exactly known)."""
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, devices_env, tiny_config
from detr_jax import build_model
from detr_jax.config import data_config, loss_config
from detr_jax.data import eval_batches, load_dataset
from detr_jax.data.synthetic import Spec, generate
from detr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_jax.evaluation import METRIC_NAMES, evaluate, inference
from detr_jax.evaluation.evaluator import ground_truth_coco, score_predictions, val_loss_terms
from detr_jax.losses import compute_loss
from detr_jax.parallel import local_mesh

NUM_VAL = 20
BATCH_SIZES = (1, 3, 8)
# two canvases (landscape, portrait): the eval pass has two batch shapes per batch size
SMALL = dict(eval_size=96, eval_max_size=160, train_scales=(96,), train_max_size=160, max_boxes=16,
             buckets=((96, 160), (160, 96)))


def synthetic_config(root):
    """The data config of the small synthetic dataset in root (generated there if absent): 20 val
    images of 64..128 px with 1..3 large objects, so that the tiny model's boxes overlap some."""
    if not os.path.exists(root):
        generate(root, Spec(num_train=2, num_val=NUM_VAL, seed=0, min_size=64, max_size=128,
                            object_scale=(0.45, 0.9), max_objects=3))
    return data_config(source="synthetic", data_dir=str(root), synthetic_num_train=2, synthetic_num_val=NUM_VAL,
                       synthetic_max_objects=3, synthetic_object_scale=(0.45, 0.9), **SMALL)


def numpy_variables(model, seed: int = 0) -> dict:
    """Deterministic variables of ``model`` without compiling its init (which takes seconds): kernels
    uniform in +-1/sqrt(fan_in) (torch's default scale), embeddings N(0, 1), biases 0, norms and
    FrozenBatchNorm the identity."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32), bool))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "weight", "running_var"):
            return np.ones(leaf.shape, np.float32)
        if name == "kernel":
            return (rng.uniform(-1, 1, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        if name in ("query_embed", "row_embed", "col_embed"):
            return rng.standard_normal(leaf.shape).astype(np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_model_and_variables():
    """The tiny DETR (6 labels = 5 shapes + the unused 0) and a fixed init whose AP is not 0 (0.026):
    ``numpy_variables`` (seed 4) with sharper queries, larger boxes and spread class scores."""
    model = build_model(tiny_config(num_classes=6, num_queries=30))
    variables = numpy_variables(model, seed=4)
    params = variables["params"]
    params["query_embed"] = params["query_embed"] * 10
    params["bbox_embed"]["layers_2"]["kernel"] = params["bbox_embed"]["layers_2"]["kernel"] * 5
    params["bbox_embed"]["layers_2"]["bias"] = np.array([0.0, -0.5, 1.2, 0.6], np.float32)
    params["class_embed"]["kernel"] = params["class_embed"]["kernel"] * 30
    return model, variables


def eval_predictor(model):
    """The Predictor ``evaluate`` uses (default loss config)."""
    return inference.predictor(model, 0, loss_config=loss_config())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = synthetic_config(str(tmp_path_factory.mktemp("eval") / "shapes"))
    model, variables = tiny_model_and_variables()
    return cfg, model, variables, load_dataset(cfg, "val", process_index=0, process_count=1)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """evaluate at each batch size -> {batch size: (result, traces added by it)}, and the workdir."""
    cfg, model, variables, source = setup
    workdir = tmp_path_factory.mktemp("workdir")
    inference._predictor.cache_clear()
    out, logs = {}, []
    for batch_size in BATCH_SIZES:
        before = eval_predictor(model).traces
        result = evaluate(model, variables, cfg, batch_size=batch_size, workdir=workdir, step=batch_size,
                          source=source, log=logs.append)
        out[batch_size] = (result, eval_predictor(model).traces - before)
    return out, workdir, logs


def batch_shapes(cfg, source, batch_size):
    """(number of batches, distinct batch shapes) of the eval pass."""
    shapes = [b["image"].shape for b in eval_batches(cfg, batch_size, source=source)]
    return len(shapes), set(shapes)


def test_metrics_do_not_depend_on_the_batch_size(runs):
    out, _, _ = runs
    reference = out[1][0]
    assert reference["AP"] > 0.01 and reference["AP50"] > 0.05  # the fixed init detects some objects
    for batch_size in BATCH_SIZES:
        result = out[batch_size][0]
        assert {k: result[k] for k in METRIC_NAMES} == {k: reference[k] for k in METRIC_NAMES}, batch_size
        assert result["per_class"] == reference["per_class"]
        assert result["num_images"] == NUM_VAL and result["num_detections"] == reference["num_detections"]


def test_every_image_is_evaluated_exactly_once(runs, setup):
    out, workdir, _ = runs
    cfg, _, _, source = setup
    for batch_size in BATCH_SIZES:
        with open(workdir / "eval" / f"step_{batch_size:06d}" / "coco_results.json") as f:
            results = json.load(f)
        per_image = np.bincount([r["image_id"] for r in results], minlength=NUM_VAL + 1)
        # 30 queries each; the detections of label 0 (no category in this dataset) are left out
        assert per_image[0] == 0 and (per_image[1:] > 0).all() and (per_image <= 30).all()
        valid = sum(int(b["example_valid"].sum()) for b in eval_batches(cfg, batch_size, source=source))
        assert valid == out[batch_size][0]["num_images"] == NUM_VAL


def test_detections_agree_across_batch_sizes(runs):
    """Per image the same detections; scores and boxes equal up to float32 rounding (XLA's CPU kernels
    may block reductions differently for another batch size)."""
    _, workdir, _ = runs
    loaded = {}
    for batch_size in BATCH_SIZES:
        with open(workdir / "eval" / f"step_{batch_size:06d}" / "coco_results.json") as f:
            loaded[batch_size] = json.load(f)
    for batch_size in BATCH_SIZES[1:]:
        a, b = loaded[1], loaded[batch_size]
        assert [(r["image_id"], r["category_id"]) for r in a] == [(r["image_id"], r["category_id"]) for r in b]
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)
        np.testing.assert_allclose([r["bbox"] for r in a], [r["bbox"] for r in b], atol=1e-3)


def test_compiles_once_per_batch_shape(runs, setup):
    out, _, _ = runs
    cfg, model, _, source = setup
    for batch_size in BATCH_SIZES:
        num_batches, shapes = batch_shapes(cfg, source, batch_size)
        assert out[batch_size][1] == len(shapes) == 2 and num_batches > len(shapes)
    assert eval_predictor(model)._jitted._cache_size() == 2 * len(BATCH_SIZES)


def test_output_files(runs):
    out, workdir, logs = runs
    result = out[3][0]
    directory = workdir / "eval" / "step_000003"
    assert result["eval_dir"] == str(directory)
    assert sorted(os.listdir(directory)) == ["coco_results.json", "metrics.json", "per_class_ap.csv", "summary.txt"]
    metrics = json.loads((directory / "metrics.json").read_text())
    assert {k: metrics[k] for k in METRIC_NAMES} == {k: result[k] for k in METRIC_NAMES}
    assert metrics["num_images"] == NUM_VAL and metrics["step"] == 3 and metrics["batch_size"] == 3
    assert [c["name"] for c in metrics["per_class"]] == ["circle", "square", "triangle", "cross", "ring"]
    entry = json.loads((directory / "coco_results.json").read_text())[0]
    assert sorted(entry) == ["bbox", "category_id", "image_id", "score"] and len(entry["bbox"]) == 4
    assert 1 <= entry["category_id"] <= 5 and 0 < entry["score"] <= 1
    csv_lines = (directory / "per_class_ap.csv").read_text().splitlines()
    assert csv_lines[0] == "category_id,name,num_gt,AP,AP50,AP75" and len(csv_lines) == 6
    summary = (directory / "summary.txt").read_text()
    assert summary.startswith(result["summary"]) and " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all " \
        "| maxDets=100 ] = " in summary
    printed = "\n".join(logs)
    assert f"{NUM_VAL} of {NUM_VAL} val images evaluated" in printed and result["summary"].rstrip() in printed
    val_names = ["val_loss", "val_loss_ce", "val_loss_bbox", "val_loss_giou", "val_cardinality_error",
                 "val_class_error"]
    assert {k: metrics[k] for k in val_names} == {k: result[k] for k in val_names}
    assert f"val loss: loss {result['val_loss']:.4f} ce {result['val_loss_ce']:.3f}" in printed


def whole_split_loss(cfg, model, variables, source) -> dict:
    """``compute_loss`` (default config) of the model's outputs on every val image, each image's
    forward pass alone, all of them stacked into one batch -> {"val_" + term, "val_loss"}."""
    apply = jax.jit(lambda image, mask: model.apply(variables, image, mask, train=False))
    outputs, targets = [], []
    for batch in eval_batches(cfg, 1, source=source):
        outputs.append(apply(batch["image"], batch["padding_mask"]))
        targets.append({k: batch[k] for k in ("labels", "boxes", "box_valid")})
    stack = lambda *xs: np.concatenate(xs)
    loss = jax.jit(lambda outputs, targets: compute_loss(outputs, targets, loss_config(), "softmax"))  # jit: faster than eager
    total, terms = loss(jax.tree.map(stack, *outputs), jax.tree.map(stack, *targets))
    return {"val_loss": float(total), **{f"val_{k}": float(v) for k, v in terms.items()}}


def test_val_loss_is_the_loss_of_the_whole_split_in_one_batch(runs, setup):
    """At batch sizes 1, 3 and 8 (3 and 8 with fillers) the val loss terms are those of all val
    images in one batch: per-batch terms aggregated by their normalisers, fillers left out."""
    out, _, _ = runs
    cfg, model, variables, source = setup
    expected = whole_split_loss(cfg, model, variables, source)
    assert len(expected) == 1 + 4 * 3 + 1  # total; 4 terms x (final + 2 aux layers); class_error
    assert expected["val_loss_bbox"] > 0.05 and 0 < expected["val_class_error"] < 100
    for batch_size in BATCH_SIZES:
        fillers = sum(int((~b["example_valid"]).sum()) for b in eval_batches(cfg, batch_size, source=source))
        assert (fillers > 0) == (batch_size > 1), batch_size
        got = {k: out[batch_size][0][k] for k in expected}
        assert got == pytest.approx(expected, rel=2e-5, abs=1e-6), batch_size


def test_hosts_evaluate_disjoint_shares_that_gather_to_the_same_metrics(runs, setup):
    """Two hosts simulated: each host's predictions, concatenated as ``gather_hosts`` does, score
    exactly as the single-host evaluation."""
    out, _, _ = runs
    cfg, model, variables, _ = setup
    shares = []
    for host in (0, 1):
        source = load_dataset(cfg, "val", process_index=host, process_count=2)
        batches = eval_batches(cfg, 3, process_index=host, process_count=2, source=source)
        shares.append(inference.predict_batches(eval_predictor(model), variables, batches,
                                                source.records.image_id, local_mesh()))
    assert shares[0]["record"].shape == shares[1]["record"].shape  # equal shapes: process_allgather works
    hosts = [set(s["record"][s["record"] >= 0].tolist()) for s in shares]
    assert not hosts[0] & hosts[1] and len(hosts[0] | hosts[1]) == NUM_VAL
    gathered = jax.tree.map(lambda *s: np.concatenate(s), *shares)
    scored = score_predictions(gathered, source, ground_truth_coco(source))  # every host holds all val records
    assert {k: scored[k] for k in METRIC_NAMES} == {k: out[1][0][k] for k in METRIC_NAMES}
    val_loss = val_loss_terms(gathered["loss_sums"], loss_config())
    assert val_loss == pytest.approx({k: out[1][0][k] for k in val_loss}, rel=2e-5, abs=1e-6)


def evaluation_script(cfg, prelude: str = "") -> str:
    """A Python program that evaluates the fixed-init tiny model at global batch size 4 and prints
    some of the result as json on its last line."""
    return (
        "import json, sys, jax\n" + prelude +
        "sys.path.insert(0, 'tests')\n"
        "from test_eval_pipeline import synthetic_config, tiny_model_and_variables\n"
        "from detr_jax.config import loss_config\n"
        "from detr_jax.evaluation import evaluate, inference\n"
        f"cfg = synthetic_config({cfg.data_dir!r})\n"
        "model, variables = tiny_model_and_variables()\n"
        "r = evaluate(model, variables, cfg, batch_size=4, log=None)\n"
        "print(json.dumps({**{k: r[k] for k in ('AP', 'AP50', 'AR100', 'ARl', 'num_images', 'val_loss')},\n"
        "                  'per_class': len(r['per_class']),\n"
        "                  'traces': inference.predictor(model, 0, loss_config=loss_config()).traces,\n"
        "                  'devices': [jax.process_count(), jax.local_device_count()]}))\n")


def last_json_line(process) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_processes_with_two_devices_each(runs, setup):
    """Two JAX processes (CPU, gloo collectives) as two hosts with two devices each: global batch 4 is
    2 images per host, 1 per device; each host evaluates its share, the predictions are gathered,
    process 0 runs COCOeval and both return its numbers: those of the single-device runs."""
    out, _, _ = runs
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    prelude = ("jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
               f"jax.distributed.initialize('localhost:{port}', num_processes=2, process_id=int(sys.argv[1]))\n")
    env = devices_env(2, JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen([sys.executable, "-c", evaluation_script(setup[0], prelude), str(p)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    got = [last_json_line(p) for p in processes]
    for printed in got:  # the loss summed over hosts and devices: that of one device up to rounding
        assert printed.pop("val_loss") == pytest.approx(out[1][0]["val_loss"], rel=2e-5)
    expected = {**{k: out[1][0][k] for k in ("AP", "AP50", "AR100", "ARl", "num_images")}, "traces": 2,
                "devices": [2, 2]}
    assert got == [{**expected, "per_class": 5}, {**expected, "per_class": 0}]  # per_class: process 0 only


def test_topk_and_score_threshold(runs, setup):
    out, _, _ = runs
    cfg, model, variables, source = setup
    _, workdir, _ = runs
    result = evaluate(model, variables, cfg, batch_size=8, source=source, topk=5, score_threshold=0.3,
                      workdir=workdir, name="top5", log=None)
    assert result["num_images"] == NUM_VAL and result["eval_dir"] == str(workdir / "eval" / "top5")
    kept = json.loads((workdir / "eval" / "top5" / "coco_results.json").read_text())
    everything = json.loads((workdir / "eval" / "step_000008" / "coco_results.json").read_text())
    assert 0 < len(kept) == result["num_detections"] < len(everything)
    assert np.bincount([r["image_id"] for r in kept]).max() <= 5 and min(r["score"] for r in kept) >= 0.3
    for image_id in {r["image_id"] for r in kept}:  # each image's best 5 (of those with a category) above 0.3
        scores = sorted((r["score"] for r in everything if r["image_id"] == image_id), reverse=True)
        got = sorted((r["score"] for r in kept if r["image_id"] == image_id), reverse=True)
        assert got == [s for s in scores[:len(got)] if s >= 0.3]
    with pytest.raises(ValueError, match="topk = 31; expected 0 .* or 1..30"):
        evaluate(model, variables, cfg, batch_size=8, source=source, topk=31)
    with pytest.raises(ValueError, match="score_threshold = 1.5"):
        evaluate(model, variables, cfg, batch_size=8, source=source, score_threshold=1.5)


def test_the_annotation_file_as_ground_truth_gives_the_same_numbers(runs, setup):
    out, _, _ = runs
    cfg, model, variables, source = setup
    annotations = os.path.join(cfg.data_dir, "annotations", "instances_val.json")
    result = evaluate(model, variables, cfg, batch_size=8, source=source, ground_truth=annotations, log=None)
    assert {k: result[k] for k in METRIC_NAMES} == {k: out[8][0][k] for k in METRIC_NAMES}


# ---- an oracle model on a custom dataset: AP known exactly ----

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
CATEGORY_IDS = {"red": 3, "green": 7, "blue": 42}


class Oracle(nn.Module):
    """Reads each image's one coloured rectangle on black: its box from the bright pixels, its label
    from the dominant channel (labels: the label of red, green and blue). Query 0 is the detection,
    query 1 predicts no-object in a corner."""
    labels: tuple
    num_classes: int
    num_queries: int = 2
    padding: str = "exact"  # DETR's field, which evaluation sets; each image is read alone either way
    classification: str = "softmax"  # DETR's field: the postprocess and val loss follow it

    @nn.compact
    def __call__(self, images, padding_mask, train=False):
        pixels = images * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)
        bright = (pixels.max(-1) > 0.5) & ~padding_mask
        rows, cols = bright.any(2), bright.any(1)
        height = jnp.maximum((~padding_mask[:, :, 0]).sum(1), 1)
        width = jnp.maximum((~padding_mask[:, 0, :]).sum(1), 1)
        y0, y1 = rows.argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)
        x0, x1 = cols.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1)
        box = jnp.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], -1)
        label = jnp.asarray(self.labels)[(pixels * bright[..., None]).sum((1, 2)).argmax(-1)]
        batch = images.shape[0]
        logits = jnp.full((batch, 2, self.num_classes + 1), -10.0)
        logits = logits.at[jnp.arange(batch), 0, label].set(10.0).at[:, 1, self.num_classes].set(10.0)
        corner = jnp.full_like(box, 0.02)  # query 1's box: a speck in the corner, matching nothing
        return {"pred_logits": logits, "pred_boxes": jnp.stack([box, corner], 1), "aux_outputs": []}


def write_custom_dataset(root, unreadable=False):
    """Images with one coloured rectangle each; categories 42, 3, 7 (listed out of order). Sizes are
    96 x 128 (kept by the eval resize) and 192 x 256 (halved: even box edges stay on pixel edges)."""
    os.makedirs(os.path.join(root, "val"))
    os.makedirs(os.path.join(root, "annotations"))
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, colour in enumerate(["red", "green", "blue", "red", "blue", "green", "blue"]):
        scale = 1 + i % 2
        h, w = 96 * scale, 128 * scale
        x, y = (int(v) * 2 * scale for v in rng.integers(2, 20, 2))
        bw, bh = int(rng.integers(20, 30)) * 2 * scale, int(rng.integers(15, 22)) * 2 * scale
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[y:y + bh, x:x + bw] = COLOURS[colour]
        tf.io.write_file(os.path.join(root, "val", f"{i}.png"), tf.io.encode_png(pixels))
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": 100 + i, "category_id": CATEGORY_IDS[colour],
                            "bbox": [x, y, bw, bh]})  # no 'area' or 'iscrowd': optional in the loader
    if unreadable:  # an image file that cannot be decoded: a filler, not evaluated
        with open(os.path.join(root, "val", "broken.png"), "wb") as f:
            f.write(b"not a png")
        images.append({"id": 200, "file_name": "broken.png", "height": 96, "width": 128})
        annotations.append({"id": 99, "image_id": 200, "category_id": 3, "bbox": [10, 10, 40, 30]})
    categories = [{"id": CATEGORY_IDS[c], "name": c} for c in ("blue", "red", "green")]
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return data_config(source="coco_json", val_annotations=os.path.join(root, "annotations", "instances_val.json"),
                       val_images=os.path.join(root, "val"), buckets=((96, 128),), **{k: v for k, v in SMALL.items()
                                                                                     if k != "buckets"})


@pytest.mark.parametrize("mapping", ["contiguous", "category_id"])
def test_non_contiguous_category_ids_round_trip(tmp_path, mapping):
    cfg = write_custom_dataset(str(tmp_path / "custom"), unreadable=True)
    cfg.label_mapping = mapping
    source = load_dataset(cfg, "val", process_index=0, process_count=1)
    info = source.info
    labels = tuple(int(info.labels([CATEGORY_IDS[c]])[0]) for c in ("red", "green", "blue"))
    assert labels == ((0, 1, 2) if mapping == "contiguous" else (3, 7, 42))
    logs = []
    result = evaluate(Oracle(labels, info.num_classes), {}, cfg, batch_size=3, source=source, workdir=tmp_path,
                      name="oracle", log=logs.append)
    # query 1 (no-object) still has a best real class, label 0 at a score of ~2e-9: category 3 with
    # contiguous labels (a false positive ranked below every true detection: AP stays 1), unused with
    # category_id labels (left out of the results)
    assert result["num_images"] == 7 and result["num_detections"] == (14 if mapping == "contiguous" else 7)
    assert source.report.counts["unreadable_image"] == 1
    assert "7 of 8 val images evaluated (1 unreadable, left out: see the data report)" in "\n".join(logs)
    for name in ("AP", "AP50", "AP75", "AR1", "AR100"):
        assert result[name] == pytest.approx(1.0, abs=1e-12), name
    assert [(c["category_id"], c["name"], c["num_gt"]) for c in result["per_class"]] == \
        [(3, "red", 2), (7, "green", 2), (42, "blue", 3)]
    assert all(c["AP"] == pytest.approx(1.0, abs=1e-12) for c in result["per_class"])
    with open(tmp_path / "eval" / "oracle" / "coco_results.json") as f:
        results = json.load(f)
    assert sorted({r["category_id"] for r in results}) == [3, 7, 42]
    # the wrong classes give AP 0: the mapping matters
    swapped = evaluate(Oracle(labels[1:] + labels[:1], info.num_classes), {}, cfg, batch_size=3, source=source,
                       log=None)
    assert swapped["AP"] == 0.0


def test_val_loss_with_the_device_matcher_is_the_host_matchers(setup):
    """The val loss matches inside shard_map: the device matcher's lax loops compile there (they once
    failed shard_map's type check) and give the host matcher's sums."""
    cfg, model, variables, source = setup
    first = next(iter(eval_batches(cfg, 4, source=source)))
    sums = {}
    for matcher in ("host", "device"):
        predict = inference.predictor(model, 0, loss_config=loss_config(matcher=matcher))
        (_, output), = inference.run_batches(predict, variables, [first], local_mesh())
        sums[matcher] = jax.tree.map(np.asarray, output["loss_sums"])
    assert sums["host"]["loss_bbox"][1] > 0  # boxes were matched
    for name, value in sums["host"].items():
        np.testing.assert_allclose(sums["device"][name], value, rtol=1e-5, err_msg=name)
