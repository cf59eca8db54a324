"""``evaluate`` on tfds COCO (``tfds.testing.mock_data``, the data tests' mock): ground truth from the
tfds records, or an official-style instances json when given."""
import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from detr_jax import build_model
from detr_jax.data import load_dataset
from detr_jax.data.tfds_coco import COCO_CATEGORIES
from detr_jax.evaluation import METRIC_NAMES, evaluate, run_cocoeval
from detr_jax.evaluation.evaluator import ground_truth_coco
from test_data_tfds import EXAMPLES, mocked_coco, tfds_config  # noqa: F401 (mocked_coco: autouse fixture)
from test_eval_pipeline import numpy_variables


def official_json(path):
    """The mock's val split written as COCO's instances_val2017.json would hold it (pixels, true ids)."""
    images, annotations = [], []
    for ex in EXAMPLES["validation"]:
        h, w = (int(v) for v in tf.image.extract_jpeg_shape(ex["image"]).numpy()[:2])
        images.append({"id": ex["image/id"], "file_name": ex["image/filename"], "height": h, "width": w})
        objects = ex["objects"]
        for k, (ymin, xmin, ymax, xmax) in enumerate(objects["bbox"].astype(np.float64)):
            annotations.append({"id": int(objects["id"][k]), "image_id": ex["image/id"],
                                "category_id": COCO_CATEGORIES[int(objects["label"][k])][0],
                                "bbox": [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h],
                                "area": int(objects["area"][k]), "iscrowd": int(objects["is_crowd"][k])})
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in COCO_CATEGORIES]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_tfds_coco_with_records_or_official_ground_truth(tmp_path):
    cfg = tfds_config(buckets=((160, 160),))
    source = load_dataset(cfg, "val", process_index=0, process_count=1)
    model = build_model(tiny_config(num_classes=91, num_queries=10))
    variables = numpy_variables(model)
    result = evaluate(model, variables, cfg, batch_size=4, source=source, workdir=tmp_path, name="tfds", log=None)
    assert result["num_images"] == 9
    detections = json.loads((tmp_path / "eval" / "tfds" / "coco_results.json").read_text())
    assert {d["image_id"] for d in detections} == {ex["image/id"] for ex in EXAMPLES["validation"]}
    assert {d["category_id"] for d in detections} <= {i for i, _ in COCO_CATEGORIES}  # true ids, never 12, 26, ...
    gt_file = official_json(tmp_path / "instances_val2017.json")
    with_file = evaluate(model, variables, cfg, batch_size=4, source=source, ground_truth=str(gt_file), log=None)
    assert {k: with_file[k] for k in METRIC_NAMES} == {k: result[k] for k in METRIC_NAMES}
    # the official json's objects, as detections, are perfect for the ground truth built from the records
    official = json.loads(gt_file.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in official["annotations"] if not a["iscrowd"]]
    ids = [ex["image/id"] for ex in EXAMPLES["validation"]]
    for gt in (ground_truth_coco(source), ground_truth_coco(source, str(gt_file))):
        evaluator, _ = run_cocoeval(gt, perfect, ids)
        assert evaluator.stats[0] == pytest.approx(1.0, abs=1e-6)
