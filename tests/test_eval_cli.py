"""eval.py as a user runs it: --help, the latest training checkpoint of a workdir, converted official
DETR-R50 weights on synthetic images; and what each kind of --checkpoint loads."""
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO, tiny_config
from detr_jax import build_model
from detr_jax.checkpoint import TrainCheckpoints, save_variables
from detr_jax.config import data_config, loss_config
from detr_jax.convert import to_official_state_dict
from detr_jax.data.synthetic import Spec, generate
from detr_jax.evaluation import eval_settings, load_for_eval
from detr_jax.evaluation.checkpoints import Loaded, loss_config_for
from detr_jax.evaluation.coco import METRIC_NAMES
from test_eval_pipeline import numpy_variables

SUMMARY_FIRST_LINE = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = "


def run_eval(*args, timeout=600):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def small_synthetic(root, num_val, **sizes):
    """A synthetic dataset of num_val small val images and its data config (one canvas)."""
    generate(str(root), Spec(num_train=2, num_val=num_val, seed=1, min_size=48, max_size=96))
    return data_config(source="synthetic", data_dir=str(root), synthetic_num_train=2, synthetic_num_val=num_val,
                       synthetic_seed=1,
                       train_scales=(64,), max_boxes=12, **sizes)


SAVED_NAMES = ("class 0", "red", "blue", "green", "cyan", "pink")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A workdir with two training checkpoints (steps 5 and 9) of the tiny model, as training writes
    them; their class names (SAVED_NAMES) are not the synthetic dataset's."""
    workdir = tmp_path_factory.mktemp("run")
    config = ml_collections.ConfigDict()
    config.model = tiny_config(num_classes=6)
    config.data = small_synthetic(workdir / "data", 6, eval_size=64, eval_max_size=96, train_max_size=96,
                                  buckets=((96, 96),))
    config.eval = ml_collections.ConfigDict({"batch_size": 4})
    variables = numpy_variables(build_model(config.model), seed=1)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=3)
    for step in (5, 9):
        state = {"step": np.int32(step), "params": variables["params"], "buffers": variables["buffers"],
                 "opt_state": {"count": np.int32(step)}, "skipped": np.int32(0)}
        checkpoints.save(step, state, {"step": step, "config": config.to_json(), "class_names": list(SAVED_NAMES)})
    checkpoints.close()
    return workdir, config, variables


def test_help():
    result = run_eval("--help")
    assert result.returncode == 1 and not result.stderr, result.stderr  # absl's --help convention
    for flag in ("--config", "--workdir", "--checkpoint", "--step", "--batch_size", "--score_threshold", "--topk",
                 "--ground_truth"):
        assert f"  {flag}:" in result.stdout, flag


def test_evaluates_the_latest_training_checkpoint(tiny_run):
    workdir, _, _ = tiny_run
    result = run_eval(f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "6 of 6 val images evaluated" in out and "batch 4" in out  # the run's config.eval.batch_size
    summary = [line for line in out.splitlines() if line.startswith(" Average ")]
    assert len(summary) == 12 and summary[0].startswith(SUMMARY_FIRST_LINE)
    assert "circle" in out and "ring" in out  # the per-class table
    metrics = json.loads((workdir / "eval" / "step_000009" / "metrics.json").read_text())
    assert metrics["step"] == 9 and metrics["num_images"] == 6 and set(METRIC_NAMES) <= set(metrics)
    assert "val split of" in out  # the data report


def test_official_weights_end_to_end(reference, tmp_path):
    """The reference's generated DETR-R50 weights (official layout) converted on the fly by eval.py
    and evaluated on synthetic images (the AP of random weights is meaningless: it runs, that is all)."""
    _, _, state_dict = reference
    weights = tmp_path / "detr-r50-generated.npz"
    np.savez(weights, **state_dict)
    config_file = tmp_path / "r50_synthetic.py"
    data = dict(source="synthetic", data_dir=str(tmp_path / "data"), synthetic_num_train=2, synthetic_seed=1,
                synthetic_num_val=5, eval_size=64, eval_max_size=96, train_scales=(64,), train_max_size=96,
                buckets=((96, 96),), max_boxes=12)
    config_file.write_text(
        "import ml_collections\n"
        "from detr_jax.config import data_config, model_config\n\n\n"
        "def get_config():\n"
        "    config = ml_collections.ConfigDict()\n"
        "    config.model = model_config(num_classes=91)\n"
        f"    config.data = data_config(**{data!r})\n"
        "    return config\n")
    generate(str(tmp_path / "data"), Spec(num_train=2, num_val=5, seed=1, min_size=48, max_size=96))
    workdir = tmp_path / "work"
    result = run_eval(f"--config={config_file}", f"--workdir={workdir}", f"--checkpoint={weights}", "--batch_size=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backbone resnet50, 91 classes" in result.stdout and "5 of 5 val images evaluated" in result.stdout
    directory = workdir / "eval" / "detr-r50-generated"
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["num_images"] == 5 and metrics["name"] == "detr-r50-generated"
    detections = json.loads((directory / "coco_results.json").read_text())
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 4, 5}  # labels 0 and 6..90: no category here


def test_what_each_checkpoint_kind_loads(tiny_run, tmp_path):
    workdir, config, variables = tiny_run
    latest = load_for_eval("", workdir=workdir)
    assert latest.step == 9 and latest.model_config.num_classes == 6 and latest.run_config.eval.batch_size == 4
    assert load_for_eval("", workdir=workdir, step=5).step == 5
    save_variables(tmp_path / "converted", variables, config.model)
    converted = load_for_eval(str(tmp_path / "converted"), workdir=workdir)
    assert converted.name == "converted" and converted.step is None and converted.model_config.backbone == "resnet_tiny"
    np.savez(tmp_path / "tiny.npz", **to_official_state_dict(variables, config.model))
    official = load_for_eval(str(tmp_path / "tiny.npz"), workdir=workdir, model_config=config.model)
    for loaded in (latest, converted, official):
        for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(variables)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="tiny.npz: converting an official checkpoint needs config.model"):
        load_for_eval(str(tmp_path / "tiny.npz"), workdir=workdir)
    with pytest.raises(ValueError, match="--step selects a training checkpoint"):
        load_for_eval(str(tmp_path / "converted"), workdir=workdir, step=5)
    with pytest.raises(FileNotFoundError, match="notes.txt: expected a variables directory"):
        load_for_eval(str(tmp_path / "notes.txt"), workdir=workdir)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to evaluate"):
        load_for_eval("", workdir=tmp_path / "empty")


def test_settings_precedence():
    config = ml_collections.ConfigDict({"eval": {"batch_size": 16}})
    assert eval_settings(config).batch_size == 16 and eval_settings(None).batch_size == 8
    config.eval = ml_collections.ConfigDict({"batch_size": 32, "topk": 50})
    settings = eval_settings(config, batch_size=2, topk=None, ground_truth="gt.json")
    assert (settings.batch_size, settings.topk, settings.ground_truth, settings.score_threshold) == \
        (2, 50, "gt.json", 0.0)
    config.eval.iou = 0.5
    with pytest.raises(ValueError, match="config.eval has unknown fields \\['iou'\\]"):
        eval_settings(config)


def test_loss_config_of_the_val_loss():
    """--config's loss, else the training run's, else the official default."""
    run = ml_collections.ConfigDict({"loss": loss_config(eos_coef=0.2)})
    training = Loaded({}, tiny_config(), 5, "step 5", run)
    official = Loaded({}, tiny_config(), None, "detr-r50", None)
    assert loss_config_for(None, training).eos_coef == 0.2
    assert loss_config_for(ml_collections.ConfigDict({"loss": loss_config(eos_coef=0.3)}), training).eos_coef == 0.3
    assert loss_config_for(None, official).to_dict() == loss_config().to_dict()
    assert loss_config_for(ml_collections.ConfigDict({"data": data_config()}), official).eos_coef == 0.1
