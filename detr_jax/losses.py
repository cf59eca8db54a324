"""DETR's set-prediction loss (SetCriterion), with the official terms, names and weights.

``compute_loss(outputs, targets, config.loss)`` returns ``(total, terms)``:

- ``loss_ce``: cross-entropy over all queries, matched ones against their target's label and the
  rest against no-object, the no-object class weighted by ``eos_coef`` (weighted mean, as torch's
  ``F.cross_entropy(weight=...)``); with ``classification='sigmoid_focal'`` the focal loss over the
  real classes, summed and divided by the number of target boxes (Deformable DETR).
- ``loss_bbox``: L1 between matched (cx, cy, w, h) boxes; ``loss_giou``: 1 - GIoU; both summed and
  divided by the number of target boxes (at least 1).
- ``cardinality_error``: mean |#predicted objects - #targets| per image; ``class_error``: 100 -
  top-1 accuracy (%) of matched queries, final layer only. Both are metrics, without gradient.
- the same terms for each auxiliary decoder layer l, suffixed ``_l`` (``loss_ce_0`` ...).

``total = sum(ce_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou)`` over layers.

Data parallelism: inside ``jax.pmap`` pass ``axis_name``. Every normaliser (target boxes, CE
weights, images) is then summed over the devices, and each device returns its *share*: the psum of
the shares (terms, total and gradients) is exactly the loss of the global batch on one device.
"""
import jax
import jax.numpy as jnp

from detr_jax import box_ops
from detr_jax.matching import match, stack_layers


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _matched_classes(matched, labels, num_queries, no_object):
    """matched [B, M], labels [B, M] -> target class of every query [B, Q] (no-object if unmatched)."""
    batch = jnp.arange(matched.shape[0])[:, None]
    index = jnp.where(matched >= 0, matched, num_queries)  # out of range: dropped
    classes = jnp.full((matched.shape[0], num_queries), no_object, jnp.int32)
    return classes.at[batch, index].set(labels, mode="drop")


def _layer_terms(logits, boxes, matched, targets, cfg, num_boxes, norm):
    """Loss terms of one decoder layer: logits [B, Q, C+1], boxes [B, Q, 4], matched [B, M]."""
    b, q, c1 = logits.shape
    valid = matched >= 0
    target_classes = _matched_classes(matched, targets["labels"], q, c1 - 1)
    if cfg.classification == "sigmoid_focal":
        onehot = jax.nn.one_hot(target_classes, c1)[..., :-1]
        x = logits[..., :-1]
        p = jax.nn.sigmoid(x)
        ce = jnp.maximum(x, 0) - x * onehot + jnp.log1p(jnp.exp(-jnp.abs(x)))
        p_t = p * onehot + (1 - p) * (1 - onehot)
        alpha_t = cfg.focal_alpha * onehot + (1 - cfg.focal_alpha) * (1 - onehot)
        loss_ce = (alpha_t * ce * (1 - p_t) ** cfg.focal_gamma).sum() / num_boxes
    else:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
        weight = jnp.where(target_classes == c1 - 1, cfg.eos_coef, 1.0)
        loss_ce = (weight * nll).sum() / norm(weight.sum())

    src = jnp.take_along_axis(boxes, jnp.maximum(matched, 0)[..., None], axis=1)  # [B, M, 4]
    l1 = jnp.abs(src - targets["boxes"]).sum(-1)
    giou = box_ops.elementwise_generalized_box_iou(box_ops.cxcywh_to_xyxy(src), box_ops.cxcywh_to_xyxy(targets["boxes"]))
    loss_bbox = jnp.where(valid, l1, 0).sum() / num_boxes
    loss_giou = jnp.where(valid, 1 - giou, 0).sum() / num_boxes

    logits = jax.lax.stop_gradient(logits)
    predicted = (logits.argmax(-1) != c1 - 1).sum(-1)
    cardinality = jnp.abs(predicted - targets["box_valid"].sum(-1)).sum() / norm(jnp.asarray(b, jnp.float32))
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou,
            "cardinality_error": cardinality.astype(jnp.float32)}


def _class_error(logits, matched, labels, norm):
    """100 - top-1 accuracy (%) of the matched queries; 100 when nothing is matched (official)."""
    valid = matched >= 0
    top1 = jnp.take_along_axis(jax.lax.stop_gradient(logits).argmax(-1), jnp.maximum(matched, 0), axis=1)
    wrong = jnp.where(valid, top1 != labels, False).sum()
    total = norm(valid.sum().astype(jnp.float32))
    share_of_devices = 1.0 / norm(jnp.asarray(1.0))
    return jnp.where(total > 0, 100.0 * wrong / jnp.maximum(total, 1.0), 100.0 * share_of_devices)


def compute_loss(outputs, targets, loss_config, *, axis_name=None, method=None):
    """(total, terms) of the set-prediction loss; see the module docstring.

    outputs: the model's dict; targets: {"labels" [B, M] int32, "boxes" [B, M, 4] (cxcywh,
    normalised), "box_valid" [B, M] bool}; method: matcher override ("host" / "device").
    """
    cfg = loss_config
    norm = lambda x: _psum(x, axis_name)
    matched = match(outputs, targets, cfg, method)  # [L, B, M]
    logits, boxes = stack_layers(outputs, cfg.aux_loss)
    num_boxes = jnp.maximum(norm(targets["box_valid"].sum().astype(jnp.float32)), 1.0)
    num_layers = logits.shape[0]
    terms, total = {}, 0.0
    for layer in range(num_layers):
        layer_terms = _layer_terms(logits[layer], boxes[layer], matched[layer], targets, cfg, num_boxes, norm)
        total = total + (cfg.ce_weight * layer_terms["loss_ce"] + cfg.bbox_weight * layer_terms["loss_bbox"]
                         + cfg.giou_weight * layer_terms["loss_giou"])
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        terms.update({name + suffix: value for name, value in layer_terms.items()})
    terms["class_error"] = _class_error(logits[-1], matched[-1], targets["labels"], norm)
    return total, terms
