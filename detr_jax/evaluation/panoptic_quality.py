"""Panoptic quality (PQ, SQ, RQ) of panoptic segmentations, numpy only, as cocodataset/panopticapi.

Definitions (Kirillov et al., "Panoptic Segmentation", CVPR 2019; panopticapi ``evaluation.py``):

* An image is an id map [H, W] of segment ids (id 0 = VOID, unlabelled) and its ``segments_info``:
  ``{"id", "category_id"}`` per segment, plus ``"iscrowd"`` (0 or 1, default 0) in the ground truth.
  In PNGs, id = R + 256 G + 256^2 B (``rgb2id`` / ``id2rgb``).
* A ground-truth segment g and a predicted segment p of the same category match when IoU(g, p) > 0.5
  (strictly), with IoU = |g n p| / (|g u p| - |p n VOID|): predicted pixels on VOID are not in the union.
  Crowd ground-truth segments never match. Matches are unique because IoU > 0.5.
* Per category c: TP = matched pairs, with their IoUs summed; FN = non-crowd ground-truth segments
  left unmatched (crowd segments are never FN); FP = predicted segments left unmatched, except those
  with more than half of their area on VOID or on crowd ground truth of their own category (ignored).
* PQ_c = sum IoU / (TP + FP/2 + FN/2), SQ_c = sum IoU / TP (0 without TP), RQ_c = TP / (TP + FP/2 + FN/2).
  "All", "Things" (categories with isthing = 1) and "Stuff" (isthing = 0) average PQ_c, SQ_c, RQ_c
  over the categories of the group with TP + FP + FN > 0; N is their number.

Numbers are fractions in [0, 1], as panopticapi's ``pq_compute`` returns them; ``format_table``
prints them x100, as panopticapi prints them.

Reproduced from panopticapi's ``pq_compute_single_core`` / ``PQStat.pq_average``: the union above
(VOID removed, crowd not); the > 0.5 thresholds; FP ignored on VOID + same-category crowd; per-class
entries of 0.0 for categories absent from both; errors for a predicted id in the map missing from
segments_info, a predicted segment missing from the map, and an unknown predicted category; every
ground-truth image needs a prediction, predictions of other images are ignored; the folder of X.json
is X by default. Differences, none of which changes a number on COCO panoptic: ground-truth areas are
counted in the map, not read from the json "area" (they are equal in COCO); an unmatched prediction's
crowd overlap counts every crowd segment of its category, not only the last one listed (COCO has at
most one per category and image); ground-truth ids in the map missing from segments_info, unknown
ground-truth categories, duplicate ids and id 0 in segments_info are errors rather than silently
skipped; a group with N = 0 gives 0.0 rather than ZeroDivisionError.

Statistics are per-category sums (``PQStats``), added across images and hosts with ``+``:

    stats = empty_stats(categories)
    for gt_map, gt_segments, pred_map, pred_segments in images:
        stats = accumulate(stats, gt_map, gt_segments, pred_map, pred_segments, categories)
    results = summarize(stats, categories)   # results["All"]["pq"], ..., results["per_class"][id]
    print(format_table(results))

``evaluate_folders(gt_json, pred_json)`` does the same for COCO panoptic json + PNG folder pairs.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from detr_jax.errors import DataError

OFFSET = 256 ** 3  # ids are < 256^3 (3 bytes of RGB); a (gt, pred) pair is keyed gt * OFFSET + pred
VOID = 0
GROUPS = (("All", None), ("Things", True), ("Stuff", False))


@dataclasses.dataclass(frozen=True, eq=False)
class PQStats:
    """Per-category sums over images: arrays [C] aligned with ``category_ids`` (sorted ascending)."""
    category_ids: tuple
    tp: np.ndarray   # [C] int64, matched pairs
    fp: np.ndarray   # [C] int64, unmatched, not ignored predictions
    fn: np.ndarray   # [C] int64, unmatched non-crowd ground-truth segments
    iou: np.ndarray  # [C] float64, sum of the matched pairs' IoU

    def __add__(self, other: "PQStats") -> "PQStats":
        if self.category_ids != other.category_ids:
            raise ValueError(f"PQStats of different categories cannot be added: {self.category_ids} "
                             f"and {other.category_ids}")
        return PQStats(self.category_ids, self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                       self.iou + other.iou)


def category_table(categories) -> tuple[np.ndarray, np.ndarray]:
    """COCO panoptic categories -> (ids [C] int64 sorted, isthing [C] bool).

    ``categories``: the json's list of ``{"id", "isthing", ...}`` or a mapping id -> ``{"isthing", ...}``.
    """
    items = categories.items() if isinstance(categories, dict) else ((c.get("id"), c) for c in categories)
    table = {}
    for cat_id, info in items:
        if cat_id is None or "isthing" not in info:
            raise DataError(f"category {info!r}: needs 'id' and 'isthing'")
        if int(cat_id) in table:
            raise DataError(f"category id {cat_id} is listed twice")
        table[int(cat_id)] = bool(info["isthing"])
    ids = np.array(sorted(table), dtype=np.int64)
    return ids, np.array([table[i] for i in ids.tolist()], dtype=bool)


def empty_stats(categories) -> PQStats:
    """Zero statistics over ``categories`` (see ``category_table``)."""
    ids, _ = category_table(categories)
    return PQStats(tuple(ids.tolist()), *(np.zeros(len(ids), np.int64) for _ in range(3)),
                   np.zeros(len(ids), np.float64))


def rgb2id(rgb) -> np.ndarray:
    """A panoptic PNG's colours [..., 3] (or [..., 4], alpha ignored) -> segment ids [...] int64."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids) -> np.ndarray:
    """Segment ids [...] in [0, 256^3) -> colours [..., 3] uint8 (inverse of ``rgb2id``)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"segment ids must be in [0, {OFFSET}); got {ids.min()}..{ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_id_map(path) -> np.ndarray:
    """A COCO panoptic PNG (RGB, or RGBA with alpha ignored) -> id map [H, W] int64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: panoptic PNG not found")
    with Image.open(path) as image:
        if image.mode not in ("RGB", "RGBA"):
            raise DataError(f"{path}: a panoptic PNG must be RGB (id = R + 256 G + 256^2 B); its mode is "
                            f"{image.mode}")
        return rgb2id(np.asarray(image)[..., :3])


def write_id_map(path, id_map) -> None:
    """Id map [H, W] -> RGB PNG at ``path`` (the format ``read_id_map`` and panopticapi read)."""
    Image.fromarray(id2rgb(id_map)).save(path)


def _where(image_id) -> str:
    return "an image" if image_id is None else f"image {image_id}"


def _checked_map(id_map, what: str, image_id) -> np.ndarray:
    """An id map [H, W] of integers in [0, 256^3) -> uint64 [H, W]; DataError otherwise."""
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
        raise DataError(f"{_where(image_id)}: the {what} id map must be an integer array [H, W]; got "
                        f"{id_map.dtype} {id_map.shape}")
    if id_map.size and (id_map.min() < 0 or id_map.max() >= OFFSET):
        raise DataError(f"{_where(image_id)}: the {what} id map has ids outside [0, {OFFSET}): "
                        f"{id_map.min()}..{id_map.max()}")
    return id_map.astype(np.uint64)


def _segment_table(segments, category_ids: np.ndarray, what: str, image_id):
    """segments_info -> (ids [S] int64 sorted, category index [S] int64, iscrowd [S] bool)."""
    rows = {}
    for k, seg in enumerate(segments):
        if "id" not in seg or "category_id" not in seg:
            raise DataError(f"{_where(image_id)}: {what} segments_info[{k}] needs 'id' and 'category_id': {seg!r}")
        seg_id = int(seg["id"])
        if not 0 < seg_id < OFFSET:
            raise DataError(f"{_where(image_id)}: {what} segment id {seg_id} must be in [1, {OFFSET}) "
                            f"(0 is VOID)")
        if seg_id in rows:
            raise DataError(f"{_where(image_id)}: {what} segment id {seg_id} is listed twice in segments_info")
        rows[seg_id] = (int(seg["category_id"]), bool(seg.get("iscrowd", 0)))
    ids = np.array(sorted(rows), dtype=np.int64)
    cats = np.array([rows[i][0] for i in ids.tolist()], dtype=np.int64)
    crowd = np.array([rows[i][1] for i in ids.tolist()], dtype=bool)
    cat_index = np.searchsorted(category_ids, cats)
    known = cat_index < len(category_ids)
    known[known] = category_ids[cat_index[known]] == cats[known]
    if not known.all():
        k = int(np.argmin(known))
        raise DataError(f"{_where(image_id)}: {what} segment {ids[k]} has unknown category_id {cats[k]}")
    return ids, cat_index, crowd


def _index_of(pixel_ids: np.ndarray, segment_ids: np.ndarray, what: str, image_id) -> np.ndarray:
    """Ids found in a map [K] -> their rows in the sorted ``segment_ids`` [K], -1 for VOID; DataError
    for an id missing from segments_info."""
    index = np.searchsorted(segment_ids, pixel_ids)
    found = index < len(segment_ids)
    found[found] = segment_ids[index[found]] == pixel_ids[found]
    missing = np.unique(pixel_ids[~found & (pixel_ids != VOID)])
    if missing.size:
        raise DataError(f"{_where(image_id)}: {what} segment ids {missing.tolist()} are in the id map but not "
                        f"in its segments_info")
    return np.where(found, index, -1)


def image_stats(gt_map, gt_segments, pred_map, pred_segments, categories, *, image_id=None) -> PQStats:
    """PQ statistics of one image.

    gt_map, pred_map: [H, W] integer segment ids (0 = VOID). gt_segments: segments_info of the ground
    truth, ``{"id", "category_id", "iscrowd"}``; pred_segments: ``{"id", "category_id"}``. Errors
    (``DataError``) name ``image_id``.
    """
    category_ids, _ = category_table(categories)
    num_categories = len(category_ids)
    gt_map = _checked_map(gt_map, "ground-truth", image_id)
    pred_map = _checked_map(pred_map, "predicted", image_id)
    if gt_map.shape != pred_map.shape:
        raise DataError(f"{_where(image_id)}: ground-truth id map {gt_map.shape} and predicted id map "
                        f"{pred_map.shape} differ in shape")
    gt_ids, gt_cat, gt_crowd = _segment_table(gt_segments, category_ids, "ground-truth", image_id)
    pred_ids, pred_cat, _ = _segment_table(pred_segments, category_ids, "predicted", image_id)

    # every (gt id, pred id) pair present, with its intersection in pixels: [K]
    keys, pair_area = np.unique(gt_map * np.uint64(OFFSET) + pred_map, return_counts=True)
    gi = _index_of((keys // OFFSET).astype(np.int64), gt_ids, "ground-truth", image_id)
    pi = _index_of((keys % OFFSET).astype(np.int64), pred_ids, "predicted", image_id)
    gt_area = np.bincount(gi[gi >= 0], pair_area[gi >= 0], minlength=len(gt_ids))
    pred_area = np.bincount(pi[pi >= 0], pair_area[pi >= 0], minlength=len(pred_ids))
    if (pred_area == 0).any():
        raise DataError(f"{_where(image_id)}: predicted segment ids {pred_ids[pred_area == 0].tolist()} are in "
                        f"segments_info but not in the id map")
    on_void = (gi < 0) & (pi >= 0)
    pred_void = np.bincount(pi[on_void], pair_area[on_void], minlength=len(pred_ids))

    both = (gi >= 0) & (pi >= 0)
    g, p, inter = gi[both], pi[both], pair_area[both]
    same_category = gt_cat[g] == pred_cat[p]
    iou = inter / (pred_area[p] + gt_area[g] - inter - pred_void[p])
    match = same_category & ~gt_crowd[g] & (iou > 0.5)
    gt_matched = np.zeros(len(gt_ids), bool)
    gt_matched[g[match]] = True
    pred_matched = np.zeros(len(pred_ids), bool)
    pred_matched[p[match]] = True

    on_crowd = same_category & gt_crowd[g]
    pred_crowd = np.bincount(p[on_crowd], inter[on_crowd], minlength=len(pred_ids))
    ignored = (pred_void + pred_crowd) / pred_area > 0.5
    return PQStats(
        tuple(category_ids.tolist()),
        tp=np.bincount(gt_cat[g[match]], minlength=num_categories).astype(np.int64),
        fp=np.bincount(pred_cat[~pred_matched & ~ignored], minlength=num_categories).astype(np.int64),
        fn=np.bincount(gt_cat[~gt_matched & ~gt_crowd], minlength=num_categories).astype(np.int64),
        iou=np.bincount(gt_cat[g[match]], iou[match], minlength=num_categories).astype(np.float64))


def accumulate(stats: PQStats, gt_map, gt_segments, pred_map, pred_segments, categories, *,
               image_id=None) -> PQStats:
    """``stats`` plus one image's ``image_stats`` (same arguments)."""
    return stats + image_stats(gt_map, gt_segments, pred_map, pred_segments, categories, image_id=image_id)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise [C], 0.0 where den == 0."""
    return np.divide(num, den, out=np.zeros(len(num), np.float64), where=den > 0)


def summarize(stats: PQStats, categories) -> dict:
    """Statistics -> {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category id:
    {"pq", "sq", "rq", "tp", "fp", "fn"}}}, fractions in [0, 1] (panopticapi's ``pq_average``)."""
    category_ids, isthing = category_table(categories)
    if tuple(category_ids.tolist()) != stats.category_ids:
        raise ValueError(f"the statistics are over categories {stats.category_ids}, not {category_ids.tolist()}")
    weight = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
    per_class = {"pq": _ratio(stats.iou, weight), "sq": _ratio(stats.iou, stats.tp.astype(np.float64)),
                 "rq": _ratio(stats.tp.astype(np.float64), weight)}
    present = weight > 0
    results = {}
    for name, things in GROUPS:
        members = present if things is None else present & (isthing == things)
        n = int(members.sum())
        results[name] = {k: float(v[members].sum() / n) if n else 0.0 for k, v in per_class.items()}
        results[name]["n"] = n
    results["per_class"] = {
        cat_id: {"pq": float(per_class["pq"][c]), "sq": float(per_class["sq"][c]), "rq": float(per_class["rq"][c]),
                 "tp": int(stats.tp[c]), "fp": int(stats.fp[c]), "fn": int(stats.fn[c])}
        for c, cat_id in enumerate(stats.category_ids)}
    return results


def format_table(results: dict) -> str:
    """``summarize``'s groups as panopticapi prints them: PQ, SQ, RQ x100 and N per row."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name, _ in GROUPS:
        row = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * row["pq"], 100 * row["sq"], 100 * row["rq"], row["n"]))
    return "\n".join(lines)


def load_panoptic_json(json_path, folder=None) -> tuple[dict, list | None, Path]:
    """A COCO panoptic json (ground truth or predictions) -> (annotations by image_id, its "categories"
    or None, the PNG folder: ``folder`` or, as panopticapi, the json's path without ".json")."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"{json_path}: panoptic json not found")
    try:
        dataset = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{json_path}: not a COCO panoptic json: not JSON ({error})") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("annotations"), list):
        raise DataError(f"{json_path}: not a COCO panoptic json: no 'annotations' list")
    folder = Path(folder) if folder is not None else json_path.with_suffix("")
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of the PNGs of {json_path} not found")
    annotations = {}
    for k, ann in enumerate(dataset["annotations"]):
        missing = [key for key in ("image_id", "file_name", "segments_info") if key not in ann]
        if missing:
            raise DataError(f"{json_path}: annotations[{k}] has no {', '.join(map(repr, missing))}")
        if ann["image_id"] in annotations:
            raise DataError(f"{json_path}: image_id {ann['image_id']} has two annotations")
        annotations[ann["image_id"]] = ann
    return annotations, dataset.get("categories"), folder


def evaluate_folders(gt_json, pred_json, gt_folder=None, pred_folder=None) -> dict:
    """PQ of saved predictions (panopticapi's ``pq_compute``): COCO panoptic json + PNG folder pairs ->
    ``summarize``'s dict, over the ground truth's images and categories."""
    gt_annotations, categories, gt_folder = load_panoptic_json(gt_json, gt_folder)
    pred_annotations, _, pred_folder = load_panoptic_json(pred_json, pred_folder)
    if categories is None:
        raise DataError(f"{gt_json}: the ground-truth json has no 'categories'")
    stats = empty_stats(categories)
    for image_id, gt_ann in gt_annotations.items():
        if image_id not in pred_annotations:
            raise DataError(f"{pred_json}: no prediction for the image with id {image_id}")
        pred_ann = pred_annotations[image_id]
        stats = accumulate(stats, read_id_map(gt_folder / gt_ann["file_name"]), gt_ann["segments_info"],
                           read_id_map(pred_folder / pred_ann["file_name"]), pred_ann["segments_info"],
                           categories, image_id=image_id)
    return summarize(stats, categories)
