"""PostProcess with the official semantics of each classification type (``detr_jax.classification``).

softmax (facebookresearch/detr ``models/detr.py``): softmax over all num_classes + 1 logits; score
and label of each query from its best real class (no-object excluded from the max, but part of the
softmax); every query is kept (official), or with ``topk`` the k best-scoring queries of each image.
sigmoid_focal (Conditional / Deformable / DAB-DETR ``PostProcess``): sigmoid scores over queries x
classes, the ``topk`` best of that flat list (0: 100, official), each with its query's box.
Boxes cxcywh -> xyxy, scaled from [0, 1] of the image to its original pixels. A score threshold
is applied later, on the host (``detr_jax.evaluation.coco.detections_to_results``), so that shapes
stay fixed for the compiler.
"""
import jax.numpy as jnp

from detr_jax.box_ops import cxcywh_to_xyxy
from detr_jax.classification import classification as classification_of


def postprocess(pred_logits, pred_boxes, orig_size, classification: str, *, topk: int = 0) -> dict:
    """Model outputs -> detections in original-image pixels.

    pred_logits [B, Q, C'] (softmax: C + 1, the last no-object; sigmoid_focal: C); pred_boxes
    [B, Q, 4] (cx, cy, w, h) in [0, 1] of the unpadded image; orig_size [B, 2] (h, w) of the
    original images; classification: the model's (``config.model.classification``). topk: softmax:
    0 keeps all Q queries in query order, k in 1..Q each image's k best (by score, descending; ties:
    lower query); sigmoid_focal: the k best (query, class) pairs, 1..Q x C (0: 100).

    Returns {"scores" [B, K] float32, "labels" [B, K] int32 (class index 0..C-1),
    "boxes" [B, K, 4] float32 (x0, y0, x1, y1) pixels, "queries" [B, K] int32 (the query of each
    detection)}.
    """
    kind = classification_of(classification)
    (_, num_queries, num_logits) = pred_logits.shape
    most = kind.max_topk(num_queries, kind.num_classes(num_logits))
    if not 0 <= topk <= most:
        raise ValueError(f"topk = {topk}: expected 0 (official) or 1..{most} (for a {classification} model "
                         f"with {num_queries} queries)")
    scores, labels, queries = kind.detections(pred_logits, topk)
    h, w = (orig_size[:, i].astype(jnp.float32) for i in (0, 1))
    scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
    boxes = cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)) * scale
    boxes = jnp.take_along_axis(boxes, queries[..., None], axis=1)
    return {"scores": scores, "labels": labels, "boxes": boxes, "queries": queries}
