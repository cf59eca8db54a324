"""Evaluation of a model with the mask head (``config.model.masks``): panoptic quality and COCO segm AP.

``MaskScorer`` runs on each host, batch by batch, beside the box predictions (so no mask leaves
the host that computed it): for every evaluated image

- ``panoptic_segments`` (official PostProcessPanoptic, threshold 0.85) of its queries' mask logits,
  read over the region ``pred_masks_hw`` names (with "exact" padding the image's own; "official"
  reads the whole canvas, as official DETR), at the image's processed size and then its original
  size; its segments get ids 1..n (0 is void, the COCO panoptic convention) and their labels' true
  category ids; PQ statistics against ``source.panoptic_ground_truth`` (``panoptic_quality``);
- ``instance_masks`` (official PostProcessSegm) of the detections kept for the bbox results, RLE-
  encoded as COCO segm results, and the ground truth's thing segments as COCO instances with RLE
  masks (crowd kept as crowd), for pycocotools' segm COCOeval.

``gather`` then brings every host's statistics and entries to every process (same shapes on all
hosts: the statistics are fixed-size arrays; the entries travel as padded JSON bytes).
"""
import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from pycocotools import mask as mask_utils

from detr_jax.evaluation import panoptic_quality as pq
from detr_jax.evaluation.panoptic import coco_panoptic_annotation, instance_masks, resize_bilinear, segments_of

SEGM_THRESHOLD = 0.5  # official PostProcessSegm


def panoptic_prediction(slot: dict, size, orig_size, is_thing, num_classes: int, threshold: float):
    """One image's panoptic result from the predictor's outputs (``inference.MASK_OUTPUT_KEYS``):
    the queries whose best class (``query_classes``) is an object scoring > threshold; their mask
    logits over ``pred_masks_hw``'s region, upsampled (bilinear) to the region's pixels and cropped
    to the image's processed ``size`` (as official PostProcessSegm reads a padded canvas; official
    PostProcessPanoptic would stretch the canvas's masks over the image instead); then the official
    PostProcessPanoptic steps (``segments_of``) at ``size`` and ``orig_size`` -> (ids [H0, W0] int32:
    0 void, segment k has id k + 1; segments [{"id", "label", "isthing", "area"}])."""
    (mh, mw), region = slot["pred_masks_hw"]
    size = tuple(int(s) for s in size)
    keep = np.flatnonzero((slot["query_labels"] < num_classes) & (slot["query_scores"] > threshold))
    masks = resize_bilinear(slot["pred_masks"][keep, :mh, :mw], tuple(int(s) for s in region))[:, :size[0], :size[1]]
    ids, segments = segments_of(masks, slot["query_labels"][keep], size, tuple(int(s) for s in orig_size), is_thing)
    ids = (ids + 1 if segments else np.zeros(tuple(int(s) for s in orig_size))).astype(np.int32)
    return ids, [{"id": s["id"] + 1, "label": s["category_id"], "isthing": s["isthing"], "area": s["area"]}
                 for s in segments]


def categories_of(info) -> list[dict]:
    """The dataset's categories {"id", "name", "isthing"} from its DatasetInfo (labels with an id)."""
    return [{"id": int(cid), "name": name, "isthing": bool(thing)}
            for cid, name, thing in zip(info.label_to_category_id, info.class_names, info.isthing) if cid >= 0]


def rle(binary) -> dict:
    """A COCO RLE (counts as str) of a [H, W] mask."""
    encoded = mask_utils.encode(np.asfortranarray(np.asarray(binary, np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def thing_instances(image_id: int, gt_map, gt_segments, is_thing: dict) -> list[dict]:
    """The ground truth's thing segments as COCO instance annotations with RLE masks (no id yet)."""
    out = []
    for segment in gt_segments:
        if not is_thing.get(int(segment["category_id"]), False):
            continue
        binary = gt_map == segment["id"]
        area = int(binary.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(binary)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        out.append({"image_id": int(image_id), "category_id": int(segment["category_id"]), "segmentation": rle(binary),
                    "area": area, "bbox": bbox, "iscrowd": int(bool(segment.get("iscrowd", 0)))})
    return out


class MaskScorer:
    """Accumulates PQ statistics and segm entries over a host's evaluated images (module docstring).

    num_classes: the model's; threshold: ``panoptic_prediction``'s (config.eval.panoptic_threshold).
    Each image's predicted panoptic PNG and annotation are kept for ``write_pngs`` and ``write_json``.
    """

    def __init__(self, source, *, num_classes: int, threshold: float):
        self.source, self.num_classes, self.threshold = source, num_classes, threshold
        self.categories = categories_of(source.info)
        self.is_thing_label = np.asarray(source.info.isthing, bool)
        self.is_thing = {c["id"]: c["isthing"] for c in self.categories}
        self.stats = pq.empty_stats(self.categories)
        self.segm_results, self.segm_gt, self.images = [], [], []
        self.annotations, self.pngs = [], []  # the predicted panoptic json entries; this host's (name, PNG bytes)

    def add_batch(self, rows, output: dict, sizes) -> None:
        """rows [B] (records rows, -1: filler); output: the predictor's numpy output (MASK_OUTPUT_KEYS,
        and the detections: scores, labels, queries); sizes [B, 2] processed (h, w)."""
        for b, row in enumerate(np.asarray(rows)):
            if row >= 0:
                self.add_image(int(row), {k: v[b] for k, v in output.items() if k != "loss_sums"}, sizes[b])

    def add_image(self, row: int, out: dict, size) -> None:
        records, info = self.source.records, self.source.info
        image_id, orig = int(records.image_id[row]), tuple(int(s) for s in records.orig_size[row])
        (mh, mw), image_hw = out["pred_masks_hw"]
        size = tuple(int(s) for s in size)
        pred_map, segments = panoptic_prediction(out, size, orig, self.is_thing_label, self.num_classes, self.threshold)
        predicted = [{"id": s["id"], "category_id": int(info.category_ids(s["label"])), "isthing": s["isthing"],
                      "area": s["area"]} for s in segments]
        gt_map, gt_segments = self.source.panoptic_ground_truth(row)
        self.stats = pq.accumulate(self.stats, gt_map, gt_segments, pred_map, predicted, self.categories,
                                   image_id=image_id)
        name = f"{image_id:012d}.png"
        png, annotation = coco_panoptic_annotation(pred_map, predicted, image_id, name, category_ids=None)
        self.annotations.append(annotation)
        self.pngs.append((name, png))

        binary = instance_masks(out["pred_masks"][out["queries"], :mh, :mw], size, tuple(int(s) for s in image_hw),
                                orig, SEGM_THRESHOLD)
        categories = info.category_ids(out["labels"])
        for k, (score, category) in enumerate(zip(out["scores"], categories)):
            if category >= 0:
                self.segm_results.append({"image_id": image_id, "category_id": int(category),
                                          "segmentation": rle(binary[k]), "score": float(score)})
        self.segm_gt += thing_instances(image_id, gt_map, gt_segments, self.is_thing)
        self.images.append({"id": image_id, "height": orig[0], "width": orig[1]})

    def gather(self) -> "MaskScorer":
        """Every host's statistics and entries, on every process (all processes call it)."""
        if jax.process_count() == 1:
            return self
        s = self.stats
        packed = np.stack([s.tp, s.fp, s.fn]).astype(np.int64)
        tp, fp, fn = np.asarray(multihost_utils.process_allgather(packed)).sum(0)
        iou = np.asarray(multihost_utils.process_allgather(s.iou)).sum(0)
        self.stats = pq.PQStats(s.category_ids, tp, fp, fn, iou)
        for name in ("segm_results", "segm_gt", "images", "annotations"):
            setattr(self, name, [e for part in gather_json(getattr(self, name)) for e in part])
        return self

    def segm_ground_truth(self) -> dict:
        """The COCO instances dict of the evaluated images' thing segments (ids 1..n)."""
        annotations = [{**a, "id": k + 1} for k, a in enumerate(self.segm_gt)]
        categories = [{"id": c["id"], "name": c["name"]} for c in self.categories if c["isthing"]]
        return {"images": sorted(self.images, key=lambda i: i["id"]), "annotations": annotations,
                "categories": categories}

    def summary(self) -> dict:
        return pq.summarize(self.stats, self.categories)

    def write_pngs(self, directory) -> None:
        """This host's predicted panoptic PNGs into DIRECTORY/panoptic/ (every host calls it: a shared
        workdir then holds them all)."""
        folder = directory / "panoptic"
        folder.mkdir(parents=True, exist_ok=True)
        for name, png in self.pngs:
            (folder / name).write_bytes(png)

    def write_json(self, directory) -> None:
        """The predictions' COCO panoptic json, DIRECTORY/panoptic.json (after ``gather``: every image;
        panopticapi reads the PNGs from DIRECTORY/panoptic/)."""
        dataset = {"annotations": sorted(self.annotations, key=lambda a: a["image_id"]), "categories": self.categories}
        (directory / "panoptic.json").write_text(json.dumps(dataset))


def gather_json(entries) -> list:
    """Every process's JSON-serialisable ``entries``, in process order (all processes call it)."""
    data = np.frombuffer(json.dumps(entries).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    parts = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(part[:n]).decode()) for part, n in zip(parts, lengths)]
