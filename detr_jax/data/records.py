"""The format every source reads into: images with their raw COCO annotations, as numpy arrays.

``Records`` keeps what the annotation file says (for the ground truth of evaluation);
``clean_targets`` derives the training targets from it (crowd, degenerate, outside and surplus boxes
left out, boxes clipped, each counted in the ``Report``; panoptic sources keep crowd segments and
take boxes in ``masks_to_boxes``' convention, as official ``CocoPanoptic``); ``DatasetInfo`` maps
labels (what the model predicts) to category ids (what COCO evaluation expects) and says which are
things.
"""
import dataclasses

import numpy as np

from detr_jax.data.report import Report
from detr_jax.errors import DataError

LABEL_MAPPINGS = ("category_id", "contiguous")
MAX_BOXES_POLICIES = ("keep_largest", "error")
IMAGE_FIELDS = ("image_id", "file_name", "path", "orig_size", "panoptic_path")  # [N, ...] fields of Records
ANN_FIELDS = ("ann_id", "bbox", "category_id", "iscrowd", "area", "segment_id")  # [A, ...] fields of Records


@dataclasses.dataclass
class Records:
    """N images and A annotations, in the source's canonical order.

    image_id [N] int64; file_name [N] str (as annotated, for messages and the ground truth);
    path [N] str (the file to read; '' where the source streams the bytes, as tfds does);
    orig_size [N, 2] int64 (h, w) as annotated; panoptic_path [N] str (the image's panoptic PNG; ''
    where the source has none or streams it, as tfds does).
    Annotations of image i are rows ann_splits[i]:ann_splits[i + 1] of ann_id [A] int64 (unique),
    bbox [A, 4] float64 (x, y, w, h) pixels, category_id [A] int64, iscrowd [A] bool, area [A] float64,
    segment_id [A] int64 (the annotation's id in the panoptic PNG, R + 256 G + 256^2 B; 0 without one).
    """
    image_id: np.ndarray
    file_name: np.ndarray
    path: np.ndarray
    orig_size: np.ndarray
    ann_splits: np.ndarray
    ann_id: np.ndarray
    bbox: np.ndarray
    category_id: np.ndarray
    iscrowd: np.ndarray
    area: np.ndarray
    panoptic_path: np.ndarray
    segment_id: np.ndarray

    def __len__(self) -> int:
        return len(self.image_id)

    def ann_owner(self) -> np.ndarray:
        """[A] int64: the image (row) of each annotation."""
        return np.repeat(np.arange(len(self)), np.diff(self.ann_splits))

    def describe(self, ann: int) -> str:
        """'file_name (image id I) annotation id J' for annotation row ``ann``, for messages."""
        i = int(self.ann_owner()[ann]) if len(self) else 0
        segment = f" (segment id {self.segment_id[ann]})" if self.segment_id[ann] else ""
        return f"{self.file_name[i]} (image id {self.image_id[i]}) annotation id {self.ann_id[ann]}{segment}"

    def select_images(self, keep) -> "Records":
        """The records of the images where keep [N] bool is True (their annotations with them)."""
        keep = np.asarray(keep, bool)
        ann_keep = keep[self.ann_owner()]
        counts = np.diff(self.ann_splits)[keep]
        return dataclasses.replace(
            self, ann_splits=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            **{f: getattr(self, f)[keep] for f in IMAGE_FIELDS}, **{f: getattr(self, f)[ann_keep] for f in ANN_FIELDS})

    def select_annotations(self, keep) -> "Records":
        """The records without the annotations where keep [A] bool is False."""
        keep = np.asarray(keep, bool)
        counts = np.bincount(self.ann_owner()[keep], minlength=len(self))
        return dataclasses.replace(
            self, ann_splits=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            **{f: getattr(self, f)[keep] for f in ANN_FIELDS})


def build_records(images, annotations) -> Records:
    """images: list of (image_id, file_name, path, h, w[, panoptic_path]); annotations: list of
    (image_row, ann_id, (x, y, w, h), category_id, iscrowd, area[, segment_id]), image_row indexing
    ``images``; the optional last fields default to '' and 0 (no panoptic annotation)."""
    annotations = sorted(annotations, key=lambda a: a[0])  # stable: file order within an image
    owner = np.asarray([a[0] for a in annotations], np.int64)
    return Records(
        image_id=np.asarray([im[0] for im in images], np.int64),
        file_name=np.asarray([im[1] for im in images], object),
        path=np.asarray([im[2] for im in images], object),
        orig_size=np.asarray([(im[3], im[4]) for im in images], np.int64).reshape(-1, 2),
        ann_splits=np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(images)))]).astype(np.int64),
        ann_id=np.asarray([a[1] for a in annotations], np.int64),
        bbox=np.asarray([a[2] for a in annotations], np.float64).reshape(-1, 4),
        category_id=np.asarray([a[3] for a in annotations], np.int64),
        iscrowd=np.asarray([a[4] for a in annotations], bool),
        area=np.asarray([a[5] for a in annotations], np.float64),
        panoptic_path=np.asarray([im[5] if len(im) > 5 else "" for im in images], object),
        segment_id=np.asarray([a[6] if len(a) > 6 else 0 for a in annotations], np.int64))


def category_ids_of(labels, label_to_category_id) -> np.ndarray:
    """labels (int array, any shape) -> category ids, -1 for labels the dataset does not use (those
    mapped to -1 in ``DatasetInfo.label_to_category_id``, and labels beyond it: a model with more
    classes than the dataset)."""
    table = np.append(np.asarray(label_to_category_id, np.int64), -1)  # the last entry: no category
    labels = np.asarray(labels, np.int64)
    return table[np.where((labels >= 0) & (labels < len(table) - 1), labels, len(table) - 1)]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about a dataset.

    num_classes: the model's class count (it has num_classes + 1 logits, the last no-object).
    label_to_category_id: [num_classes] category id of each label, -1 where a label is unused
      (label_mapping 'category_id' leaves the ids missing from 'categories' unused).
    class_names: [num_classes] name of each label (things and stuff), '' where unused.
    isthing: [num_classes] bool, False for the stuff categories of a panoptic dataset (True for
      every label of a detection dataset, and for unused ones).
    num_images: images in the split (all hosts together).
    """
    num_classes: int
    label_to_category_id: tuple
    class_names: tuple
    isthing: tuple
    num_images: int

    def category_ids(self, labels) -> np.ndarray:
        """labels (any int array) -> the true category ids (``category_ids_of``)."""
        return category_ids_of(labels, self.label_to_category_id)

    def labels(self, category_ids) -> np.ndarray:
        """category ids (any int array) -> labels; an id without a label is an error."""
        table = {c: label for label, c in enumerate(self.label_to_category_id) if c >= 0}
        ids = np.asarray(category_ids, np.int64)
        unknown = set(ids.ravel().tolist()) - table.keys()
        if unknown:
            raise ValueError(f"category ids {sorted(unknown)} have no label; known ids: {sorted(table)}")
        return np.asarray([table[c] for c in ids.ravel().tolist()], np.int64).reshape(ids.shape)


def make_info(categories, label_mapping: str, num_images: int) -> DatasetInfo:
    """categories: (id, name) or (id, name, isthing) tuples (isthing defaults to True) -> DatasetInfo.

    'category_id': label = category id, num_classes = max id + 1 (COCO: 91, as official DETR, so
    official checkpoints fit; COCO panoptic: 201, which the official 250-class models cover).
    'contiguous': label = index in the sorted ids, num_classes = count.
    """
    categories = sorted((int(c[0]), str(c[1]), bool(c[2]) if len(c) > 2 else True) for c in categories)
    if label_mapping == "contiguous":
        ids, names, things = ([c[k] for c in categories] for k in range(3))
    else:
        num = max((c[0] for c in categories), default=-1) + 1
        ids, names, things = [-1] * num, [""] * num, [True] * num
        for cid, name, thing in categories:
            ids[cid], names[cid], things[cid] = cid, name, thing
    return DatasetInfo(num_classes=len(ids), label_to_category_id=tuple(ids), class_names=tuple(names),
                       isthing=tuple(things), num_images=int(num_images))


@dataclasses.dataclass
class Targets:
    """Training targets per image: rows splits[i]:splits[i + 1] of boxes [T, 4] float64 (x1, y1, x2,
    y2) pixels inside the image, labels [T] int64 and segment_ids [T] int64 (the target's id in the
    panoptic PNG; 0 for detection sources)."""
    boxes: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    splits: np.ndarray


def box_checks(records: Records, crowd_exempt: bool = True) -> dict:
    """Per annotation [A]: "crowd", "degenerate" (width or height <= 0, or not finite), "clipped"
    (reaching outside the image; not degenerate), "outside" (entirely outside) bool masks, and
    "boxes" [A, 4] (x0, y0, x1, y1) clipped to the image. crowd_exempt: crowd annotations are never
    degenerate, clipped or outside (they are not targets); False checks them like the others."""
    owner = records.ann_owner()
    x, y, w, h = records.bbox.T
    h_img, w_img = (records.orig_size[owner, i].astype(np.float64) for i in (0, 1))
    crowd = records.iscrowd & crowd_exempt
    degenerate = ~crowd & ~(np.isfinite(records.bbox).all(1) & (w > 0) & (h > 0))
    with np.errstate(invalid="ignore"):
        xyxy = np.stack([x, y, x + w, y + h], 1)
        clipped = np.clip(xyxy, 0.0, np.stack([w_img, h_img, w_img, h_img], 1))
        moved = ~crowd & ~degenerate & (clipped != xyxy).any(1)
        outside = moved & ~((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    return {"crowd": records.iscrowd, "degenerate": degenerate, "clipped": moved & ~outside, "outside": outside,
            "boxes": clipped}


def clean_targets(records: Records, info: DatasetInfo, max_boxes: int, policy: str, report: Report,
                  panoptic: bool = False) -> Targets:
    """The training targets of ``records``, as official DETR prepares them, every change counted.

    Left out: crowd annotations, boxes with width or height <= 0 or not finite, boxes entirely outside
    the image; clipped: boxes reaching outside; beyond ``max_boxes`` per image: the smallest boxes
    (policy 'keep_largest') or an error naming the images (policy 'error').
    panoptic (official ``CocoPanoptic``): every segment is a target, crowd ones too (counted as
    crowd_kept), and its box is official ``masks_to_boxes`` of its mask: (min column, min row, MAX
    column, MAX row), so from the annotated (x, y, w, h): (x, y, x + w - 1, y + h - 1) (a segment
    one pixel wide has a box of width 0, kept as official keeps it).
    """
    owner = records.ann_owner()
    checks = box_checks(records, crowd_exempt=not panoptic)
    clipped = checks["boxes"]
    if panoptic:
        clipped = np.concatenate([clipped[:, :2], np.maximum(clipped[:, 2:] - 1, clipped[:, :2])], 1)
    keep = (panoptic | ~checks["crowd"]) & ~checks["degenerate"] & ~checks["outside"]
    for kind, mask in (("crowd_kept" if panoptic else "crowd_excluded", "crowd"), ("degenerate_box", "degenerate"),
                       ("clipped_box", "clipped"), ("outside_box", "outside")):
        rows = np.flatnonzero(checks[mask])
        report.add(kind, len(rows), [records.describe(a) for a in rows[:5]])

    keep = _limit_boxes(records, owner, keep, clipped, max_boxes, policy, report)
    counts = np.bincount(owner[keep], minlength=len(records))
    empty = np.flatnonzero(counts == 0)
    report.add("empty_image", len(empty),
               [f"{records.file_name[i]} (image id {records.image_id[i]})" for i in empty[:5]])
    return Targets(boxes=clipped[keep], labels=info.labels(records.category_id[keep]),
                   segment_ids=records.segment_id[keep], splits=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def _limit_boxes(records, owner, keep, boxes, max_boxes, policy, report):
    """keep [A] with at most max_boxes True per image: the largest boxes stay (file order among ties)."""
    counts = np.bincount(owner[keep], minlength=len(records))
    over = np.flatnonzero(counts > max_boxes)
    if not len(over):
        return keep
    named = [f"{records.file_name[i]} (image id {records.image_id[i]}): {counts[i]} boxes" for i in over[:5]]
    if policy == "error":
        raise DataError(f"{len(over)} images have more than max_boxes = {max_boxes} objects, e.g. "
                         f"{'; '.join(named)}; raise data_config.max_boxes or set max_boxes_policy='keep_largest'")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rows = np.flatnonzero(keep)
    by_size = rows[np.lexsort((-area[rows], owner[rows]))]  # per image, largest first
    first = np.searchsorted(owner[by_size], owner[by_size])
    surplus = by_size[np.arange(len(by_size)) - first >= max_boxes]
    report.add("over_max_boxes", len(surplus), named)
    keep = keep.copy()
    keep[surplus] = False
    return keep


def coco_ground_truth(records: Records, info: DatasetInfo) -> dict:
    """A COCO instances dict (images, annotations with crowd, categories with true ids) for
    pycocotools. The annotations training leaves out as unusable (degenerate or entirely outside
    boxes, counted in the source's report) are left out here too: pycocotools would match a NaN
    box. Boxes reaching outside the image are kept as given, as official evaluation reads them."""
    owner = records.ann_owner()
    checks = box_checks(records)
    usable = ~checks["degenerate"] & ~checks["outside"]
    categories = [{"id": int(c), "name": n} for c, n in zip(info.label_to_category_id, info.class_names) if c >= 0]
    return {
        "images": [{"id": int(i), "file_name": str(f), "height": int(s[0]), "width": int(s[1])}
                   for i, f, s in zip(records.image_id, records.file_name, records.orig_size)],
        "annotations": [{"id": int(a), "image_id": int(records.image_id[o]), "category_id": int(c),
                         "bbox": [float(v) for v in b], "area": float(ar), "iscrowd": int(cr)}
                        for a, o, c, b, ar, cr, u in zip(records.ann_id, owner, records.category_id, records.bbox,
                                                         records.area, records.iscrowd, usable) if u],
        "categories": categories,
    }
