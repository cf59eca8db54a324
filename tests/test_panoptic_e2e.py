"""The panoptic recipe end to end, at tiny scale: ``python -m detr_jax.demo --panoptic`` trains a
detector on the synthetic shapes over stuff, then the mask head on the frozen detector, evaluates PQ
and segm AP, and draws; ``detect --masks`` writes the panoptic files (its flags: tests/test_visualize.py)."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from detr_jax.checkpoint import latest_train_variables
from detr_jax.evaluation.panoptic_quality import read_id_map
from detr_jax.models.detr import MASK_HEAD_MODULES
from detr_jax.visualize.detect import detect_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from detr_jax.demo import run_panoptic_demo

    workdir = tmp_path_factory.mktemp("panoptic_demo")
    lines = []
    metrics = run_panoptic_demo(workdir, scale="tiny", num_images=2, log=lines.append)
    return workdir, metrics, "\n".join(str(line) for line in lines)


def test_the_demo_evaluates_panoptic_quality_and_segm(demo):
    workdir, metrics, log = demo
    for name in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "segm_AP", "AP"):
        assert 0.0 <= metrics[name] <= 1.0 or metrics[name] == -1.0, name
    assert "panoptic demo finished in" in log and "PQ " in log
    (step_dir,) = sorted((workdir / "masks" / "eval").glob("step_*"))
    saved = json.loads((step_dir / "metrics.json").read_text())
    assert {"PQ", "segm_AP", "per_class_pq"} <= saved.keys()
    panoptic = json.loads((step_dir / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 4 and {c["isthing"] for c in panoptic["categories"]} == {True, False}
    for annotation in panoptic["annotations"]:  # the COCO panoptic files agree with each other
        ids = read_id_map(step_dir / "panoptic" / annotation["file_name"])
        listed = {s["id"] for s in annotation["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed
        assert all(s["area"] == int((ids == s["id"]).sum()) for s in annotation["segments_info"])
    assert isinstance(json.loads((step_dir / "segm_results.json").read_text()), list)


def test_the_frozen_detector_is_the_trained_one(demo):
    """Stage 2 starts from stage 1's checkpoint and trains the mask head alone (official --frozen_weights)."""
    workdir, _, _ = demo
    _, detector, _, _ = latest_train_variables(workdir / "detector")
    _, masks, _, _ = latest_train_variables(workdir / "masks")
    assert set(masks["params"]) - set(detector["params"]) == set(MASK_HEAD_MODULES)
    for name, tree in detector["params"].items():
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(masks["params"][name])):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_detect_masks_writes_the_panoptic_files(demo, tmp_path):
    workdir, _, _ = demo
    drawn_by_demo = workdir / "panoptic"
    detections = json.loads((drawn_by_demo / "detections.json").read_text())
    assert len(detections["images"]) == 2
    for image in detections["images"]:
        name = image["file"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        ids = read_id_map(drawn_by_demo / f"{name}_panoptic_ids.png")
        assert ids.shape == (image["height"], image["width"])
        assert {s["id"] for s in image["panoptic"]} == set(np.unique(ids).tolist()) - {0}
        assert Image.open(drawn_by_demo / f"{name}_panoptic.png").size == (image["width"], image["height"])
    # every query's segment kept (threshold 0): the --masks path of the command line's function
    out = tmp_path / "out"
    detect_checkpoint(None, [detections["images"][0]["file"]], out, workdir=str(workdir / "masks"), masks=True,
                      panoptic_threshold=0.0, threshold=0.5, topk=0, batch_size=2, draw_boxes=False,
                      decoder_attention=False, log=lambda *a: None)
    (entry,) = json.loads((out / "detections.json").read_text())["images"]
    assert entry["panoptic"] and (out / f"{entry['file'].rsplit('/', 1)[-1].rsplit('.', 1)[0]}_panoptic.png").exists()


def test_demo_help_lists_the_panoptic_flags():
    result = subprocess.run([sys.executable, "-m", "detr_jax.demo", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]  # absl's --help convention
    for flag in ("--[no]panoptic", "--panoptic_scale"):
        assert f"  {flag}:" in result.stdout, flag
