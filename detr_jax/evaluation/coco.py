"""COCO results and pycocotools evaluation: results json entries, COCOeval bbox, per-class AP.

Everything here is numpy and pycocotools on the host (process 0); nothing knows about models.
The numbers are pycocotools' own: ``COCOeval(gt, dt, "bbox")`` with default parameters, only
``params.imgIds`` restricted to the images that were evaluated.
"""
import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.data.records import category_ids_of

# the 12 numbers of COCOeval.stats, in order
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def quietly(fn, *args, **kwargs):
    """fn(*args, **kwargs) with pycocotools' progress prints swallowed -> (result, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO index over a COCO instances dict (e.g. ``Source.ground_truth()``)."""
    coco = COCO()
    coco.dataset = dataset
    quietly(coco.createIndex)
    return coco


def load_ground_truth_file(path) -> COCO:
    """A COCO instances json (e.g. the official ``instances_val2017.json``) -> COCO index.

    Errors name the file: missing, not json, or without 'images' / 'annotations' / 'categories'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth annotation file not found")
    try:
        dataset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a COCO annotation file: not JSON ({error})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(dataset, dict) or k not in dataset]
    if missing:
        raise ValueError(f"{path}: not a COCO annotation file: no field {', '.join(repr(k) for k in missing)}")
    return coco_from_dict(dataset)


def detections_to_results(image_ids, scores, labels, boxes_xyxy, label_to_category_id, *,
                          score_threshold: float = 0.0) -> list[dict]:
    """Detections of N images -> COCO results entries (the results json format).

    image_ids [N] int; scores [N, K] float; labels [N, K] int (class indices); boxes_xyxy [N, K, 4]
    (x0, y0, x1, y1) original pixels. Each entry: {"image_id", "category_id" (the true id), "bbox"
    [x, y, w, h] original pixels, "score"}. Left out: detections whose label has no category (-1 in
    label_to_category_id, or beyond it: pycocotools would ignore them anyway, since it evaluates the
    ground truth's categories only) and, when score_threshold > 0, scores below it. Entries are
    ordered by image id, then by detection (query) order, so the list does not depend on batching.
    """
    image_ids = np.asarray(image_ids, np.int64)
    scores, boxes = np.asarray(scores, np.float32), np.asarray(boxes_xyxy, np.float32)
    categories = category_ids_of(labels, label_to_category_id)
    order = np.argsort(image_ids, kind="stable")
    keep = (categories >= 0) & (scores >= np.float32(score_threshold))
    xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
    rows, cols = np.nonzero(keep[order])
    rows = order[rows]
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(image_ids[rows].tolist(), categories[rows, cols].tolist(),
                                  xywh[rows, cols].tolist(), scores[rows, cols].tolist())]


def load_results(gt: COCO, results: list[dict]) -> COCO:
    """``gt.loadRes`` on a copy of ``results`` (loadRes edits its entries), also for no results
    (where loadRes fails); result image ids outside the ground truth are an error."""
    unknown = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"results hold image ids that the ground truth does not have, e.g. {sorted(unknown)[:5]}; "
                         "the ground truth must describe the evaluated split")
    if results:
        return quietly(gt.loadRes, [dict(r) for r in results])[0]
    return coco_from_dict({"images": list(gt.dataset["images"]), "annotations": [],
                           "categories": list(gt.dataset["categories"])})


def run_cocoeval(gt: COCO, results: list[dict], image_ids, iou_type: str = "bbox") -> tuple[COCOeval, str]:
    """COCOeval ``iou_type`` ("bbox", or "segm" for results with RLE masks) over ``image_ids`` (the
    evaluated images) -> (the evaluator, after evaluate, accumulate and summarize, and the text
    summarize() printed: pycocotools' standard layout)."""
    image_ids = sorted(int(i) for i in image_ids)
    missing = set(image_ids) - set(gt.getImgIds())
    if missing:
        raise ValueError(f"the ground truth has no images with ids {sorted(missing)[:5]} (of {len(missing)} "
                         "evaluated images it lacks); it must describe the evaluated split")
    evaluator = COCOeval(gt, load_results(gt, results), iou_type)
    evaluator.params.imgIds = image_ids
    quietly(evaluator.evaluate)
    quietly(evaluator.accumulate)
    _, summary = quietly(evaluator.summarize)
    return evaluator, summary


def stats_dict(evaluator: COCOeval) -> dict[str, float]:
    """The 12 COCOeval.stats under METRIC_NAMES, as Python floats (-1 where pycocotools gives -1)."""
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def _mean_valid(precision) -> float:
    """pycocotools' average: the mean of entries > -1, or -1 when there are none."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class_ap(evaluator: COCOeval) -> list[dict]:
    """Per-category AP of an accumulated COCOeval, pycocotools' way (area 'all', 100 detections).

    -> [{"category_id", "name", "num_gt" (non-crowd objects on the evaluated images), "AP" (IoU
    0.50:0.95), "AP50", "AP75"}] in category id order. AP is -1 for a category without ground
    truth on the evaluated images, 0 for one never detected.
    """
    params = evaluator.params
    precision = evaluator.eval["precision"]  # [T iou, R recall, K category, A area, M maxDets]
    area, dets = params.areaRngLbl.index("all"), len(params.maxDets) - 1
    iou50, iou75 = (int(np.argmin(np.abs(params.iouThrs - t))) for t in (0.5, 0.75))
    num_gt = {c: 0 for c in params.catIds}
    for (_, cat), anns in evaluator._gts.items():
        num_gt[cat] += sum(1 for a in anns if not a.get("iscrowd", 0))
    rows = []
    for k, cat in enumerate(params.catIds):
        p = precision[:, :, k, area, dets]
        rows.append({"category_id": int(cat), "name": str(evaluator.cocoGt.cats[cat].get("name", "")),
                     "num_gt": num_gt[cat], "AP": _mean_valid(p), "AP50": _mean_valid(p[iou50]),
                     "AP75": _mean_valid(p[iou75])})
    return rows


PER_CLASS_COLUMNS = ("category_id", "name", "num_gt", "AP", "AP50", "AP75")


def format_per_class(rows: list[dict]) -> str:
    """The per-class table as text: one line per category, AP columns with 3 decimals."""
    width = max([len("name")] + [len(r["name"]) for r in rows])
    lines = [f"{'id':>5}  {'name':<{width}}  {'num_gt':>7}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}"]
    lines += [f"{r['category_id']:>5}  {r['name']:<{width}}  {r['num_gt']:>7}  {r['AP']:>6.3f}  {r['AP50']:>6.3f}  "
              f"{r['AP75']:>6.3f}" for r in rows]
    return "\n".join(lines)


def write_per_class_csv(path, rows: list[dict]) -> None:
    """The per-class table as csv (PER_CLASS_COLUMNS; AP values at full precision)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PER_CLASS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
