"""Hungarian matching of predictions to padded targets, on the host (scipy) or on the device.

Cost, as official (facebookresearch/detr ``models/matcher.py``), for query q and target t:
``cost_class * -prob[q, label_t] + cost_bbox * L1(box_q, box_t) + cost_giou * -GIoU(box_q, box_t)``
with boxes in normalised cxcywh for L1 and xyxy for GIoU. With ``classification='sigmoid_focal'``
the class cost is the focal one of Deformable, Conditional and DAB-DETR (``detr_jax.classification``).
Targets are padded to ``M = max_boxes`` columns
with ``box_valid``; padded columns are never matched.

Assignments are returned as ``matched_query`` int32 [L, B, M]: for decoder layer l (L - 1 = final),
image b and target t, the query matched to t, or -1 for a padded target. ``index_pairs`` turns one
layer into the official per-image (query indices, target indices) pairs.

The host matcher runs scipy's ``linear_sum_assignment`` in one ``jax.pure_callback`` per call that
covers every layer and image; the device matcher is an exact shortest-augmenting-path Hungarian
algorithm (Jonker-Volgenant potentials) in ``lax`` loops, with no host round-trip.
"""
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from detr_jax import box_ops
from detr_jax.classification import classification as classification_of

METHODS = ("host", "device")
# Finite stand-in for non-finite costs (a diverged model must not crash scipy).
_BIG = 1e8


def stack_layers(outputs, with_aux: bool):
    """(pred_logits [L, B, Q, C'], pred_boxes [L, B, Q, 4]), auxiliary layers first, final last."""
    layers = (list(outputs.get("aux_outputs", [])) if with_aux else []) + [outputs]
    return (jnp.stack([o["pred_logits"] for o in layers]), jnp.stack([o["pred_boxes"] for o in layers]))


def cost_matrix(pred_logits, pred_boxes, targets, loss_config, classification: str):
    """Matching cost [..., B, Q, M] for predictions [..., B, Q, *] against padded targets [B, M, *];
    the class term of the model's classification type (``detr_jax.classification``)."""
    boxes = targets["boxes"]
    l1 = jnp.abs(pred_boxes[..., :, None, :] - boxes[:, None, :, :]).sum(-1)
    giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(boxes),
                                       loss_config.giou_eps)
    class_cost = classification_of(classification).match_cost(pred_logits, targets["labels"], loss_config)
    cost = loss_config.cost_bbox * l1 + loss_config.cost_class * class_cost - loss_config.cost_giou * giou
    return jnp.nan_to_num(cost.astype(jnp.float32), nan=_BIG, posinf=_BIG, neginf=-_BIG)


def scipy_assign(cost, valid) -> np.ndarray:
    """Host assignment: cost [..., Q, M], valid [..., M] (broadcastable) -> matched_query [..., M]."""
    cost, valid = np.asarray(cost), np.asarray(valid)
    valid = np.broadcast_to(valid, (*cost.shape[:-2], cost.shape[-1]))
    flat_cost, flat_valid = cost.reshape(-1, *cost.shape[-2:]), valid.reshape(-1, cost.shape[-1])
    matched = np.full(flat_valid.shape, -1, np.int32)
    for k, (c, v) in enumerate(zip(flat_cost, flat_valid)):
        columns = np.flatnonzero(v)
        if columns.size:
            queries, targets = linear_sum_assignment(c[:, columns])
            matched[k, columns[targets]] = queries
    return matched.reshape(valid.shape)


def _host_assign(cost, valid):
    out = jax.ShapeDtypeStruct((*cost.shape[:-2], cost.shape[-1]), jnp.int32)
    return jax.pure_callback(scipy_assign, out, cost, valid, vmap_method="expand_dims")


def device_assign(cost, valid):
    """Exact minimum-cost assignment on device: cost [Q, M] float, valid [M] bool -> [M] int32.

    Every valid target gets a distinct query (needs valid count <= Q); padded targets get -1.
    Shortest augmenting paths with row/column potentials, one target at a time (O(M^2 Q)); the
    loops run only over the valid targets, so padding to a large max_boxes costs little.
    """
    num_queries, num_targets = cost.shape
    if num_targets > num_queries:
        raise ValueError(f"device matcher: max_boxes ({num_targets}) must not exceed num_queries ({num_queries})")
    order = jnp.argsort(~valid, stable=True)  # valid targets first
    rows = jnp.concatenate([jnp.zeros((1, num_queries + 1), cost.dtype),
                            jnp.pad(cost.T[order], ((0, 0), (1, 0)))])  # [M+1, Q+1], index 0 = dummy
    n_valid = valid.sum()
    inf = jnp.asarray(jnp.inf, cost.dtype)
    column_ids = jnp.arange(num_queries + 1)

    def add_row(state):
        i, u, v, owner, way = state  # owner[j]: row (1-based) holding column j, 0 = free
        owner = owner.at[0].set(i + 1)

        def search(s):
            j0, u, v, way, minv, used = s
            used = used.at[j0].set(True)
            i0 = owner[j0]
            reduced = rows[i0] - u[i0] - v
            better = ~used & (reduced < minv)
            minv = jnp.where(better, reduced, minv)
            way = jnp.where(better, j0, way)
            candidates = jnp.where(used | (column_ids == 0), inf, minv)
            j1 = jnp.argmin(candidates)
            delta = candidates[j1]
            u = u.at[owner].add(jnp.where(used, delta, 0))
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return j1, u, v, way, minv, used

        start = (jnp.asarray(0), u, v, way, jnp.full(num_queries + 1, inf), jnp.zeros(num_queries + 1, bool))
        j0, u, v, way, _, _ = jax.lax.while_loop(lambda s: owner[s[0]] != 0, search, start)

        def augment(s):
            j0, owner = s
            j1 = way[j0]
            return j1, owner.at[j0].set(owner[j1])

        _, owner = jax.lax.while_loop(lambda s: s[0] != 0, augment, (j0, owner))
        return i + 1, u, v, owner, way

    zeros_f = jnp.zeros(num_targets + 1, cost.dtype)
    init = (jnp.asarray(0), zeros_f, jnp.zeros(num_queries + 1, cost.dtype),
            jnp.zeros(num_queries + 1, jnp.int32), jnp.zeros(num_queries + 1, jnp.int32))
    _, _, _, owner, _ = jax.lax.while_loop(lambda s: s[0] < n_valid, add_row, init)
    by_row = jnp.full(num_targets + 1, -1, jnp.int32).at[owner[1:]].set(jnp.arange(num_queries, dtype=jnp.int32))
    matched_sorted = by_row[1:]  # row k of the sorted order
    matched = jnp.full(num_targets, -1, jnp.int32).at[order].set(matched_sorted)
    return jnp.where(valid, matched, -1)


def match(outputs, targets, loss_config, classification: str, method: str | None = None):
    """Match every decoder layer's predictions to the targets in one go.

    outputs: the model's dict; targets: {"labels" [B, M] int32, "boxes" [B, M, 4] cxcywh,
    "box_valid" [B, M] bool}; classification: the model's (``config.model.classification``);
    method: "host" or "device" (default ``loss_config.matcher``).
    Returns matched_query int32 [L, B, M] (L = 1 + auxiliary layers when ``loss_config.aux_loss``,
    the final layer last); -1 for padded targets. No gradient flows through it.
    """
    method = method or loss_config.matcher
    if method not in METHODS:
        raise ValueError(f"config.loss.matcher = {method!r}; expected one of {', '.join(METHODS)}")
    logits, boxes = stack_layers(outputs, loss_config.aux_loss)
    cost = jax.lax.stop_gradient(cost_matrix(logits, boxes, targets, loss_config, classification))  # [L, B, Q, M]
    valid = targets["box_valid"]
    if method == "host":
        return _host_assign(cost, valid)
    per_image = jax.vmap(device_assign)
    return jax.vmap(per_image, in_axes=(0, None))(cost, valid)


def index_pairs(matched_query) -> list[tuple[np.ndarray, np.ndarray]]:
    """One layer's matched_query [B, M] -> per image (query indices, target indices), sorted by
    query as the official matcher returns them."""
    pairs = []
    for row in np.asarray(matched_query):
        targets = np.flatnonzero(row >= 0)
        order = np.argsort(row[targets])
        pairs.append((row[targets][order].astype(np.int64), targets[order].astype(np.int64)))
    return pairs
