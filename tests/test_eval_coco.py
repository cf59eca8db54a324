"""PostProcess parity with the official one, COCO results entries, and COCOeval on hand-built cases
whose AP is known."""
import csv

import numpy as np
import pytest

from detr_jax.evaluation import METRIC_NAMES, detections_to_results, per_class_ap, postprocess, run_cocoeval
from detr_jax.evaluation.coco import coco_from_dict, format_per_class, load_ground_truth_file, stats_dict, \
    write_per_class_csv
from detr_jax.evaluation.evaluator import evaluated_images

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def near(value):
    """pycocotools' precision is tp / (tp + fp + eps): 'exactly 1' reads 1 - 2e-16."""
    return pytest.approx(value, abs=1e-12)


def test_postprocess_matches_official(reference):
    _, ref, _ = reference
    got = postprocess(ref["pred_logits"], ref["pred_boxes"], ref["image_sizes"], "softmax")
    np.testing.assert_allclose(got["scores"], ref["post_scores"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got["labels"], ref["post_labels"])
    np.testing.assert_allclose(got["boxes"], ref["post_boxes"], rtol=1e-6, atol=1e-4)
    assert got["boxes"].shape == (2, 100, 4) and got["labels"].dtype == np.int32


def test_postprocess_topk_keeps_the_best_queries(reference):
    _, ref, _ = reference
    full = postprocess(ref["pred_logits"], ref["pred_boxes"], ref["image_sizes"], "softmax")
    top = postprocess(ref["pred_logits"], ref["pred_boxes"], ref["image_sizes"], "softmax", topk=7)
    for i in range(2):
        best = np.argsort(-np.asarray(full["scores"][i]), kind="stable")[:7]
        np.testing.assert_array_equal(top["scores"][i], np.asarray(full["scores"][i])[best])
        np.testing.assert_array_equal(top["labels"][i], np.asarray(full["labels"][i])[best])
        np.testing.assert_array_equal(top["boxes"][i], np.asarray(full["boxes"][i])[best])
    with pytest.raises(ValueError, match="topk = 101"):
        postprocess(ref["pred_logits"], ref["pred_boxes"], ref["image_sizes"], "softmax", topk=101)


def test_postprocess_excludes_no_object_and_scales_to_the_original_size():
    logits = np.log(np.array([[[0.1, 0.2, 0.7], [0.3, 0.25, 0.45]]], np.float32))  # 2 classes + no-object
    boxes = np.array([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2]]], np.float32)
    got = postprocess(logits, boxes, np.array([[100, 200]]), "softmax")
    np.testing.assert_allclose(got["scores"], [[0.2, 0.3]], rtol=1e-6)
    np.testing.assert_array_equal(got["labels"], [[1, 0]])
    np.testing.assert_allclose(got["boxes"], [[[0, 0, 200, 100], [0, 40, 100, 60]]], atol=1e-4)


def test_results_entries_map_labels_to_true_category_ids():
    table = (-1, 3, -1, 7, 42)  # labels 0 and 2 unused
    scores = np.array([[0.9, 0.8, 0.05, 0.7], [0.6, 0.5, 0.4, 0.3]], np.float32)
    labels = np.array([[1, 0, 3, 4], [4, 2, 9, 3]])  # 9: beyond the table (a model with more classes)
    boxes = np.tile(np.array([10, 20, 40, 60], np.float32), (2, 4, 1))
    results = detections_to_results([5, 2], scores, labels, boxes, table)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(2, 42), (2, 7), (5, 3), (5, 7), (5, 42)]
    assert results[0]["bbox"] == [10.0, 20.0, 30.0, 40.0] and results[0]["score"] == pytest.approx(0.6)
    assert all(isinstance(r["image_id"], int) and isinstance(r["category_id"], int) for r in results)
    kept = detections_to_results([5, 2], scores, labels, boxes, table, score_threshold=0.5)
    assert [(r["image_id"], r["category_id"]) for r in kept] == [(2, 42), (5, 3), (5, 42)]


def box(x, y, w, h, cat, image, ann_id, crowd=0):
    return {"id": ann_id, "image_id": image, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
            "iscrowd": crowd}


def ground_truth(annotations, categories=(1, 2, 3), images=(1, 2, 3, 4)):
    return coco_from_dict({"images": [{"id": i, "file_name": f"{i}.jpg", "height": 400, "width": 500} for i in images],
                           "annotations": annotations,
                           "categories": [{"id": c, "name": f"class{c}"} for c in categories]})


def perfect(annotations, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
            for a in annotations if not a["iscrowd"]]


# one small (< 32^2), one medium and one large object, one per image, so that AR@1 can reach 1 too
OBJECTS = [box(10, 10, 20, 20, 1, 1, 1), box(50, 60, 60, 50, 2, 2, 2), box(100, 100, 200, 150, 3, 3, 3)]


def test_perfect_predictions_give_one_everywhere():
    evaluator, summary = run_cocoeval(ground_truth(OBJECTS), perfect(OBJECTS), [1, 2, 3])
    assert stats_dict(evaluator) == {name: near(1.0) for name in METRIC_NAMES}
    first = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
    assert summary.count("\n") == 12 and summary.startswith(first)
    assert [(r["category_id"], r["name"], r["num_gt"], r["AP"]) for r in per_class_ap(evaluator)] == \
        [(1, "class1", 1, near(1.0)), (2, "class2", 1, near(1.0)), (3, "class3", 1, near(1.0))]


def shifted(iou_target):
    """A 100 x 100 box and the same box shifted right by s, with IoU (100 - s) / (100 + s)."""
    s = 100 * (1 - iou_target) / (1 + iou_target)
    return [box(100, 100, 100, 100, 1, 1, 1)], [{"image_id": 1, "category_id": 1, "bbox": [100 + s, 100, 100, 100],
                                                 "score": 0.9}]


@pytest.mark.parametrize("iou", [0.52, 0.68, 0.81, 0.97])
def test_a_shifted_box_passes_the_thresholds_below_its_iou(iou):
    gt, results = shifted(iou)
    evaluator, _ = run_cocoeval(ground_truth(gt), results, [1])
    passed = (IOU_THRESHOLDS <= iou).sum()
    stats = stats_dict(evaluator)
    assert stats["AP"] == near(passed / 10) and stats["AR100"] == near(passed / 10)
    assert stats["AP50"] == near(1.0) and stats["AP75"] == near(1.0 if iou >= 0.75 else 0.0)
    assert stats["APl"] == stats["AP"] and stats["APs"] == stats["APm"] == -1.0  # a 10000 px^2 box is large


def test_a_missing_class_counts_zero_and_a_class_without_ground_truth_minus_one():
    objects = [box(10, 10, 50, 50, 1, 1, 1), box(100, 100, 80, 60, 2, 2, 2)]
    evaluator, _ = run_cocoeval(ground_truth(objects), perfect(objects[:1]), [1, 2])
    by_id = {r["category_id"]: r for r in per_class_ap(evaluator)}
    assert (by_id[1]["AP"], by_id[2]["AP"], by_id[3]["AP"]) == (near(1.0), 0.0, -1.0)
    assert by_id[3]["num_gt"] == 0 and by_id[3]["AP50"] == -1.0
    assert stats_dict(evaluator)["AP"] == near(0.5)  # the mean over classes with ground truth
    table = format_per_class(per_class_ap(evaluator))
    assert table.splitlines()[3].split() == ["3", "class3", "0", "-1.000", "-1.000", "-1.000"]


def test_only_the_evaluated_images_count():
    objects = OBJECTS + [box(0, 0, 90, 90, 1, 4, 4)]  # image 4 not evaluated (e.g. unreadable)
    evaluator, _ = run_cocoeval(ground_truth(objects), perfect(OBJECTS), [1, 2, 3])
    assert stats_dict(evaluator)["AP"] == near(1.0)
    evaluator, _ = run_cocoeval(ground_truth(objects), perfect(OBJECTS), [1, 2, 3, 4])
    assert stats_dict(evaluator)["AR100"] < 1.0


def test_crowd_regions_neither_count_nor_penalise():
    objects = OBJECTS + [box(300, 200, 150, 150, 1, 3, 5, crowd=1)]
    detections = perfect(OBJECTS) + [{"image_id": 3, "category_id": 1, "bbox": [300, 200, 150, 150], "score": 0.99}]
    evaluator, _ = run_cocoeval(ground_truth(objects), detections, [1, 2, 3])
    assert stats_dict(evaluator)["AP"] == near(1.0) and per_class_ap(evaluator)[0]["num_gt"] == 1


def test_no_detections_at_all():
    evaluator, _ = run_cocoeval(ground_truth(OBJECTS), [], [1, 2, 3])
    assert stats_dict(evaluator) == {name: 0.0 for name in METRIC_NAMES}


def test_lower_scored_false_positives_lower_precision():
    """A false positive ranked above the true one halves the precision at full recall (AP 0.5 on
    the 101-point curve up to recall 1: precision 1/2 everywhere)."""
    gt = [box(100, 100, 100, 100, 1, 1, 1)]
    results = [{"image_id": 1, "category_id": 1, "bbox": [300, 300, 50, 50], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [100, 100, 100, 100], "score": 0.8}]
    evaluator, _ = run_cocoeval(ground_truth(gt), results, [1])
    assert stats_dict(evaluator)["AP"] == near(0.5)
    results[0]["score"] = 0.7  # ranked below: precision 1 up to full recall
    evaluator, _ = run_cocoeval(ground_truth(gt), results, [1])
    assert stats_dict(evaluator)["AP"] == near(1.0)


def test_per_class_csv(tmp_path):
    evaluator, _ = run_cocoeval(ground_truth(OBJECTS), perfect(OBJECTS[:2]), [1, 2, 3])
    write_per_class_csv(tmp_path / "per_class.csv", per_class_ap(evaluator))
    with open(tmp_path / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["category_id"], r["name"], r["num_gt"], float(r["AP"])) for r in rows] == \
        [("1", "class1", "1", near(1.0)), ("2", "class2", "1", near(1.0)), ("3", "class3", "1", 0.0)]


def test_ground_truth_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json: ground-truth annotation file not found"):
        load_ground_truth_file(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="bad.json: not a COCO annotation file: no field 'annotations', 'categories'"):
        load_ground_truth_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="has no images with ids \\[9\\]"):
        run_cocoeval(ground_truth(OBJECTS), [], [1, 9])
    with pytest.raises(ValueError, match="results hold image ids that the ground truth does not have"):
        run_cocoeval(ground_truth(OBJECTS), [{"image_id": 8, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}],
                     [1])


def test_an_image_evaluated_twice_is_an_error():
    class Source:
        records = type("Records", (), {"image_id": np.array([11, 12, 13]), "__len__": lambda self: 3})()

    assert evaluated_images(np.array([2, -1, 0, 1, -1], np.int32), Source).tolist() == [13, 11, 12]
    with pytest.raises(RuntimeError, match="1 images were evaluated more than once, e.g. image ids \\[12\\]"):
        evaluated_images(np.array([1, 0, 1], np.int32), Source)
