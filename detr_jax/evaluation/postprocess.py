"""PostProcess with the official DETR semantics (facebookresearch/detr ``models/detr.py``).

softmax over all num_classes + 1 logits; score and label of each query from its best real class
(no-object excluded from the max, but part of the softmax); boxes cxcywh -> xyxy, scaled from
[0, 1] of the image to its original pixels. Every query is kept (official); ``topk`` keeps the k
best-scoring queries of each image instead. A score threshold is applied later, on the host
(``detr_jax.evaluation.coco.detections_to_results``), so that shapes stay fixed for the compiler.
"""
import jax
import jax.numpy as jnp

from detr_jax.box_ops import cxcywh_to_xyxy


def postprocess(pred_logits, pred_boxes, orig_size, *, topk: int = 0) -> dict:
    """Model outputs -> detections in original-image pixels.

    pred_logits [B, Q, C + 1] (last = no-object); pred_boxes [B, Q, 4] (cx, cy, w, h) in [0, 1] of
    the unpadded image; orig_size [B, 2] (h, w) of the original images. topk: 0 keeps all Q queries
    in query order; k in 1..Q keeps each image's k best (by score, descending; ties: lower query).

    Returns {"scores" [B, K] float32, "labels" [B, K] int32 (class index 0..C-1),
    "boxes" [B, K, 4] float32 (x0, y0, x1, y1) pixels, "queries" [B, K] int32 (the query of each
    detection)}, K = Q or topk.
    """
    num_queries = pred_logits.shape[1]
    if not 0 <= topk <= num_queries:
        raise ValueError(f"topk = {topk}: expected 0 (keep all queries) or 1..{num_queries} (the model's num_queries)")
    prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
    scores = prob.max(axis=-1)
    labels = prob.argmax(axis=-1).astype(jnp.int32)
    h, w = (orig_size[:, i].astype(jnp.float32) for i in (0, 1))
    scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
    boxes = cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)) * scale
    queries = jnp.broadcast_to(jnp.arange(num_queries, dtype=jnp.int32), scores.shape)
    if topk:
        scores, queries = jax.lax.top_k(scores, topk)
        labels = jnp.take_along_axis(labels, queries, axis=1)
        boxes = jnp.take_along_axis(boxes, queries[..., None], axis=1)
    return {"scores": scores, "labels": labels, "boxes": boxes, "queries": queries.astype(jnp.int32)}
