"""DETR's segmentation post-processing in numpy (+ PIL): the official ``PostProcessPanoptic`` and
``PostProcessSegm`` of facebookresearch/detr ``models/segmentation.py``, one image at a time.

``panoptic_segments`` (PostProcessPanoptic), for one image:

1. softmax over the C + 1 logits of each query; a query is kept when its best class is not the
   no-object class (the last) and that probability is > ``threshold`` (0.85);
2. the kept queries' mask logits (1/4 of the padded batch canvas) are resized bilinearly
   (``align_corners=False``, no antialias) straight to ``processed_size``: the official does NOT crop
   the padding first, so an image smaller than the canvas gets its masks stretched;
3. each pixel goes to the kept query of largest softmax (over the kept queries; the first on ties);
   stuff queries (``not is_thing[label]``) of the same class are merged into the first of them;
4. the index map is resized to ``target_size`` with PIL's NEAREST rule; areas are counted there;
5. while some segment has area <= 4, those segments are dropped and steps 3-4 are re-run on the
   remaining queries WITHOUT the stuff merge (the official calls its helper with ``dedup=False``).
   A merged duplicate always has area 0, so a merge never survives: the later stuff queries of a
   class are dropped and their pixels go to whichever remaining query is best there;
6. segment k (k = 0..n-1, the order of the surviving queries) has id k in the map and
   ``{"id": k, "category_id": label, "isthing": bool, "area": pixels}``.

Id convention (the official one, kept): the map holds segment indices, every pixel belongs to a
segment, and segment 0 is id 0, written as RGB (0, 0, 0). panopticapi's ``pq_compute`` treats id 0 as
void only when no segment has id 0, so this is a valid COCO panoptic prediction. Without any kept
query (or when every segment is dropped) the map is all 0 and there are no segments: all void (the
official sets its class list to [1] in that case, but emits no segment, since there is no area).

``instance_masks`` (PostProcessSegm), for one image: the mask logits of every query are resized
bilinearly to the batch canvas (the official's max of the processed sizes), cropped to the image's
processed size, thresholded (sigmoid > 0.5) and resized with torch's ``F.interpolate(mode="nearest")``
rule (source index floor(dst * in / out), unlike PIL's floor((dst + 0.5) * in / out)) to the
original size.

Arithmetic follows torch's formulas in float32 (source index and weights of the resizes, softmax as
exp(x - max) times 1 / sum), but not its kernels' exact operation order: resized values differ from
torch's by an ulp or so, and results agree with the official ones except at pixels where two queries
are within float32 rounding of each other (or a mask logit within rounding of the threshold).
"""
import io

import numpy as np
from PIL import Image

from detr_jax.evaluation.panoptic_quality import id2rgb, rgb2id

# ``build`` in the official models/detr.py: classes 0..200, things are 0..90 (COCO ids; 0 is unused).
COCO_PANOPTIC_IS_THING = np.arange(201) <= 90
MIN_AREA = 4  # segments of area <= MIN_AREA (at the target size) are dropped


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's align_corners=False taps of one axis: (i0 [n_out], i1, w0 float32, w1 float32)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = src.astype(np.int64)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    return i0, np.minimum(i0 + 1, n_in - 1), np.float32(1) - w1, w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialias), float32:
    x [..., h, w] -> [..., H, W]."""
    x = np.asarray(x, np.float32)
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = (_linear_taps(n, m) for n, m in zip(x.shape[-2:], size))
    rows = lambda i: x[..., i, :]
    across = lambda r: r[..., x0] * wx0 + r[..., x1] * wx1  # [..., H, W] from rows [..., H, w]
    return across(rows(y0)) * wy0[:, None] + across(rows(y1)) * wy1[:, None]


def resize_nearest_torch(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch ``F.interpolate(x, size, mode="nearest")``: x [..., h, w] -> [..., H, W], source index
    min(floor(dst * float32(in / out)), in - 1) (float32 arithmetic; dst >> 1 when out = 2 in)."""
    def index(n_in, n_out):
        if n_out == n_in:
            return np.arange(n_out)
        if n_out == 2 * n_in:
            return np.arange(n_out) >> 1
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    rows, cols = (index(n, m) for n, m in zip(np.shape(x)[-2:], size))
    return np.asarray(x)[..., rows[:, None], cols]


def resize_nearest_pil(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL ``Image.resize((W, H), NEAREST)`` of an id map (what the official does to its id2rgb image):
    ids [h, w] (0 <= id < 2^31) -> int32 [H, W]."""
    image = Image.fromarray(np.ascontiguousarray(ids, np.int32))
    return np.asarray(image.resize((size[1], size[0]), resample=Image.NEAREST), np.int32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """float32 softmax as torch computes it: exp(x - max) times 1 / sum."""
    x = np.asarray(x, np.float32)
    e = np.exp(x - x.max(axis, keepdims=True))
    return e * (np.float32(1) / e.sum(axis, keepdims=True))


def kept_queries(logits: np.ndarray, threshold: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """logits [Q, C + 1] -> (indices [K] of the queries whose best class is an object with probability
    > threshold, their labels [K])."""
    prob = softmax(logits)
    labels, scores = prob.argmax(-1), prob.max(-1)
    keep = np.flatnonzero((labels != logits.shape[-1] - 1) & (scores > threshold))
    return keep, labels[keep]


def assign_pixels(masks: np.ndarray, merge: list[list[int]] = ()) -> np.ndarray:
    """masks [K, h, w] mask logits (K >= 0) -> int64 [h, w]: per pixel the index of the largest softmax
    over the K masks (0 when K = 0); the indices of each group in ``merge`` are replaced by its first."""
    if len(masks) == 0:
        return np.zeros(masks.shape[1:], np.int64)
    ids = softmax(masks, axis=0).argmax(0)
    for group in merge:
        ids[np.isin(ids, group)] = group[0]
    return ids


def panoptic_segments(logits: np.ndarray, masks: np.ndarray, processed_size: tuple[int, int],
                      target_size: tuple[int, int], is_thing: np.ndarray = COCO_PANOPTIC_IS_THING,
                      threshold: float = 0.85) -> tuple[np.ndarray, list[dict]]:
    """The official PostProcessPanoptic of one image (module docstring: semantics and ids).

    logits [Q, C + 1], masks [Q, h, w] mask logits, processed_size (h, w) of the image in the batch,
    target_size (H, W), is_thing [>= C] bool (indexed by label: a kept label beyond it raises, as the
    official's dict does) -> (id map int32 [H, W] of segment indices, segments: [{"id", "category_id",
    "isthing", "area"}], segment k has id k).
    """
    keep, labels = kept_queries(logits, threshold)
    return segments_of(masks[keep], labels, processed_size, target_size, is_thing)


def segments_of(masks: np.ndarray, labels: np.ndarray, processed_size: tuple[int, int], target_size: tuple[int, int],
                is_thing: np.ndarray = COCO_PANOPTIC_IS_THING) -> tuple[np.ndarray, list[dict]]:
    """Steps 2-6 of ``panoptic_segments`` on the kept queries: masks [K, h, w] mask logits, labels [K]
    (whatever chose them: ``kept_queries``, or a sigmoid_focal model's scores) -> (id map, segments)."""
    masks = resize_bilinear(masks, processed_size)
    stuff = [np.flatnonzero(labels == c).tolist() for c in dict.fromkeys(labels[~is_thing[labels]].tolist())]

    def segment(masks, merge=()):
        """(id map at the target size, area of each of the K indices)."""
        ids = resize_nearest_pil(assign_pixels(masks, merge), target_size)
        return ids, np.bincount(ids.ravel(), minlength=len(masks))[:len(masks)]

    ids, area = segment(masks, [g for g in stuff if len(g) > 1])
    while (area <= MIN_AREA).any():
        masks, labels = masks[area > MIN_AREA], labels[area > MIN_AREA]
        ids, area = segment(masks)
    segments = [{"id": k, "category_id": int(c), "isthing": bool(is_thing[c]), "area": int(a)}
                for k, (c, a) in enumerate(zip(labels, area))]
    return ids, segments


def instance_masks(masks: np.ndarray, size: tuple[int, int], canvas: tuple[int, int], orig_size: tuple[int, int],
                   threshold: float = 0.5) -> np.ndarray:
    """The official PostProcessSegm of one image: masks [Q, h, w] mask logits of the padded batch,
    size (h, w) of the image in the batch, canvas (H, W) the largest size of the batch (the official's
    max over ``max_target_sizes``), orig_size (H0, W0) -> uint8 [Q, H0, W0] (sigmoid > threshold)."""
    logits = resize_bilinear(masks, canvas)[:, :size[0], :size[1]]
    binary = np.float32(1) / (np.float32(1) + np.exp(-logits)) > threshold
    return resize_nearest_torch(binary, orig_size).astype(np.uint8)


def panoptic_png(ids: np.ndarray) -> bytes:
    """The COCO panoptic PNG of an id map [H, W] (``id2rgb``), as the official's ``png_string``."""
    with io.BytesIO() as out:
        Image.fromarray(id2rgb(ids)).save(out, format="PNG")
        return out.getvalue()


def read_panoptic_png(png: bytes) -> np.ndarray:
    """A COCO panoptic PNG -> int32 id map [H, W] (``rgb2id``)."""
    with Image.open(io.BytesIO(png)) as image:
        return rgb2id(np.asarray(image.convert("RGB")))


def coco_panoptic_annotation(ids: np.ndarray, segments: list[dict], image_id: int, file_name: str,
                             category_ids=None) -> tuple[bytes, dict]:
    """A COCO panoptic prediction of one image: (PNG bytes, {"image_id", "file_name", "segments_info"}).
    category_ids: model label -> COCO category id (a dict or array; None: the label is the id, as with
    DETR's coco_panoptic classes)."""
    info = [{**s, "category_id": int(s["category_id"] if category_ids is None else category_ids[s["category_id"]])}
            for s in segments]
    return panoptic_png(ids), {"image_id": image_id, "file_name": file_name, "segments_info": info}
