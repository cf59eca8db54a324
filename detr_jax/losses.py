"""DETR's set-prediction loss (SetCriterion), with the official terms, names and weights.

``compute_loss(outputs, targets, config.loss, config.model.classification)`` returns ``(total, terms)``:

- ``loss_ce``: the model's classification type (``detr_jax.classification``): softmax:
  cross-entropy over all queries, matched ones against their target's label and the rest against
  no-object, the no-object class weighted by ``eos_coef`` (weighted mean, as torch's
  ``F.cross_entropy(weight=...)``); sigmoid_focal: the focal loss over queries x classes, summed
  and divided by the number of target boxes (Deformable, Conditional and DAB-DETR).
- ``loss_bbox``: L1 between matched (cx, cy, w, h) boxes; ``loss_giou``: 1 - GIoU; both summed and
  divided by the number of target boxes (at least 1).
- ``cardinality_error``: mean |#predicted objects - #targets| per image (official: a query
  predicts an object when its best logit is not the last); ``class_error``: 100 -
  top-1 accuracy (%) of matched queries, final layer only. Both are metrics, without gradient.
- the same terms for each auxiliary decoder layer l, suffixed ``_l`` (``loss_ce_0`` ...).
- two-stage models (outputs with ``enc_outputs``): the same terms for the encoder's proposals,
  matched against the targets with every label 0 (class-agnostic), suffixed ``_enc``, as official.
- denoising (outputs with ``dn_outputs``, ``detr_jax.denoising``): loss_ce, loss_bbox and loss_giou
  of every real DN slot against its own original target, without matching, divided by the number
  of real slots, and their class_error, suffixed ``_dn`` (``_dn_l`` for auxiliary layers; official
  ``tgt_loss_*``, ``tgt_class_error``).

- masks (outputs with ``pred_masks``, ``config.model.masks``): ``loss_mask`` (sigmoid focal loss,
  alpha 0.25, gamma 2, averaged over each mask's pixels) and ``loss_dice`` (1 - (2 |p t| + 1) /
  (|p| + |t| + 1)) of each matched query's mask logits, bilinearly upsampled (torch's
  ``interpolate``, align_corners False) to the image's resolution, against its target's mask
  (``segments == segment_ids``), summed and divided by the number of target boxes; last decoder
  layer only, as official. The pixels read are those ``pred_masks_hw`` names: with "exact" padding
  the image's own, so the terms are those of the image alone; with "official" padding the whole
  canvas, as official DETR pads the target masks to the batch's largest image.

``total = sum(ce_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou)`` over layers
(and the proposals), plus mask_weight * loss_mask + dice_weight * loss_dice.

Every term is a numerator over a denominator (``loss_sums``), divided by ``normalise``: summing
both over batches, devices or hosts before dividing gives the loss of their union (evaluation's
val loss over the whole split).

Data parallelism: inside ``jax.pmap`` pass ``axis_name``. Every normaliser (target boxes, CE
weights, images) is then summed over the devices, and each device returns its *share*: the psum of
the shares (terms, total and gradients) is exactly the loss of the global batch on one device.
"""
import jax
import jax.numpy as jnp

from detr_jax import box_ops
from detr_jax.classification import classification as classification_of
from detr_jax.denoising import dn_targets
from detr_jax.matching import match, stack_layers
from detr_jax.models.resnet import valid_region
from detr_jax.models.segmentation import resize

MASK_FOCAL_ALPHA, MASK_FOCAL_GAMMA = 0.25, 2.0  # official sigmoid_focal_loss defaults, fixed in loss_masks


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _matched_classes(matched, labels, num_queries, no_object):
    """matched [B, M], labels [B, M] -> target class of every query [B, Q] (no_object = num_classes
    if unmatched)."""
    batch = jnp.arange(matched.shape[0])[:, None]
    index = jnp.where(matched >= 0, matched, num_queries)  # out of range: dropped
    classes = jnp.full((matched.shape[0], num_queries), no_object, jnp.int32)
    return classes.at[batch, index].set(labels, mode="drop")


def _layer_sums(logits, boxes, matched, targets, cfg, classification, example_valid):
    """(numerator, denominator) of each loss term of one decoder layer, summed over the batch:
    logits [B, Q, C'] (C' = C + 1 softmax, C focal), boxes [B, Q, 4], matched [B, M], example_valid
    [B] bool (fillers: False)."""
    q = logits.shape[1]
    valid = matched >= 0
    num_boxes = targets["box_valid"].sum().astype(jnp.float32)
    target_classes = _matched_classes(matched, targets["labels"], q, classification.num_classes(logits.shape[-1]))
    query_valid = jnp.broadcast_to(example_valid[:, None], logits.shape[:2])
    loss_ce = classification.loss_sums(logits, target_classes, query_valid, num_boxes, cfg)

    src = jnp.take_along_axis(boxes, jnp.maximum(matched, 0)[..., None], axis=1)  # [B, M, 4]
    l1 = jnp.abs(src - targets["boxes"]).sum(-1)
    giou = box_ops.elementwise_generalized_box_iou(box_ops.cxcywh_to_xyxy(src),
                                                   box_ops.cxcywh_to_xyxy(targets["boxes"]), cfg.giou_eps)

    # official for both types: queries whose best logit is not the last one (for focal models that
    # is class num_classes - 1, not no-object, so the count is near Q)
    predicted = (jax.lax.stop_gradient(logits).argmax(-1) != logits.shape[-1] - 1).sum(-1)
    cardinality = jnp.where(example_valid, jnp.abs(predicted - targets["box_valid"].sum(-1)), 0)
    return {"loss_ce": loss_ce, "loss_bbox": (jnp.where(valid, l1, 0).sum(), num_boxes),
            "loss_giou": (jnp.where(valid, 1 - giou, 0).sum(), num_boxes),
            "cardinality_error": (cardinality.sum().astype(jnp.float32), example_valid.sum().astype(jnp.float32))}


def _denoising_layer_sums(logits, boxes, targets, cfg, classification):
    """(numerator, denominator) of the DN terms of one decoder layer: logits [B, P, C'], boxes
    [B, P, 4] of the DN slots, targets their own (``denoising.dn_targets``): every real slot is
    trained towards its original label and box; the three loss terms divided by the number of real
    slots, and class_error (top-1 errors among them, %)."""
    valid = targets["box_valid"]
    count = valid.sum().astype(jnp.float32)
    target_classes = jnp.where(valid, targets["labels"], classification.num_classes(logits.shape[-1]))
    giou = box_ops.elementwise_generalized_box_iou(box_ops.cxcywh_to_xyxy(boxes),
                                                   box_ops.cxcywh_to_xyxy(targets["boxes"]), cfg.giou_eps)
    slots = jnp.where(valid, jnp.arange(valid.shape[1])[None], -1)
    return {"loss_ce": classification.loss_sums(logits, target_classes, valid, count, cfg),
            "loss_bbox": (jnp.where(valid, jnp.abs(boxes - targets["boxes"]).sum(-1), 0).sum(), count),
            "loss_giou": (jnp.where(valid, 1 - giou, 0).sum(), count),
            "class_error": _class_error_sums(logits, slots, targets["labels"])}


def _class_error_sums(logits, matched, labels):
    """(wrong top-1 classes, matched queries) of the final layer."""
    valid = matched >= 0
    top1 = jnp.take_along_axis(jax.lax.stop_gradient(logits).argmax(-1), jnp.maximum(matched, 0), axis=1)
    wrong = jnp.where(valid, top1 != labels, False).sum()
    return wrong.astype(jnp.float32), valid.sum().astype(jnp.float32)


def mask_focal_dice(logits, target, valid):
    """Per mask (focal loss averaged over the valid pixels, dice loss): logits [..., H, W], target
    [..., H, W] bool, valid [..., H, W] bool (the pixels that count) -> ([...], [...]) float32."""
    t = target.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = MASK_FOCAL_ALPHA * t + (1 - MASK_FOCAL_ALPHA) * (1 - t)
    focal = jnp.where(valid, alpha_t * ce * (1 - p_t) ** MASK_FOCAL_GAMMA, 0.0)
    count = jnp.maximum(valid.sum((-2, -1)), 1).astype(jnp.float32)
    p = jnp.where(valid, p, 0.0)
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    return focal.sum((-2, -1)) / count, dice


def _mask_sums(outputs, matched, targets):
    """(numerator, denominator) of loss_mask and loss_dice: outputs with pred_masks [B, Q, h, w] and
    pred_masks_hw [B, 2, 2] (valid (h, w) of the logits, and of the image they cover on the canvas);
    matched [B, M] (final layer); targets with segments [B, H, W] int32 and segment_ids [B, M]."""
    segments, box_valid = targets["segments"], targets["box_valid"]
    valid = matched >= 0
    logits = jnp.take_along_axis(outputs["pred_masks"], jnp.maximum(matched, 0)[:, :, None, None], axis=1)
    logit_hw, image_hw = outputs["pred_masks_hw"][:, 0], outputs["pred_masks_hw"][:, 1]
    up = resize(logits[..., None], logit_hw, image_hw, segments.shape[1:], "bilinear")[..., 0]  # [B, M, H, W]
    target = (segments[:, None] == targets["segment_ids"][:, :, None, None]) & box_valid[:, :, None, None]
    pixels = valid_region(image_hw, segments.shape[1:])[:, None]
    focal, dice = mask_focal_dice(up, target, pixels)
    num_boxes = box_valid.sum().astype(jnp.float32)
    return {"loss_mask": (jnp.where(valid, focal, 0).sum(), num_boxes),
            "loss_dice": (jnp.where(valid, dice, 0).sum(), num_boxes)}


def loss_sums(outputs, targets, loss_config, classification: str, *, method=None) -> dict:
    """{term: (numerator, denominator)} of every loss term over the batch (float32 scalars): the
    term is numerator / denominator (see ``normalise``), so sums of both over batches, devices or
    hosts give the term of their union exactly.

    - loss_ce: softmax: (sum of weight x NLL, sum of the weights) over every query;
      sigmoid_focal: (sum of the focal loss, number of target boxes).
    - loss_bbox, loss_giou: (sum over matched queries, number of target boxes).
    - cardinality_error: (sum over images of |#predicted objects - #targets|, number of images).
    - class_error (final layer): (wrong top-1 classes, matched queries).
    Auxiliary layers' terms suffixed ``_l`` as in ``compute_loss``.

    targets: as ``compute_loss``, optionally with "example_valid" [B] bool: images with False
    (fillers) count nowhere (they have no boxes; their queries and images are left out).
    """
    cfg, kind = loss_config, classification_of(classification)
    example_valid = targets.get("example_valid", jnp.ones(targets["labels"].shape[:1], bool))
    matched = match(outputs, targets, cfg, classification, method)  # [L, B, M]
    logits, boxes = stack_layers(outputs, cfg.aux_loss)
    num_layers = logits.shape[0]
    sums = {}
    for layer in range(num_layers):
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        layer_sums = _layer_sums(logits[layer], boxes[layer], matched[layer], targets, cfg, kind, example_valid)
        sums.update({name + suffix: value for name, value in layer_sums.items()})
    sums["class_error"] = _class_error_sums(logits[-1], matched[-1], targets["labels"])
    if "pred_masks" in outputs:
        sums.update(_mask_sums(outputs, matched[-1], targets))
    if "enc_outputs" in outputs:  # two-stage: the encoder's proposals against class-agnostic targets
        proposals = outputs["enc_outputs"]
        binary = {**targets, "labels": jnp.zeros_like(targets["labels"])}
        matched_proposals = match(proposals, binary, cfg, classification, method)[0]
        proposal_sums = _layer_sums(proposals["pred_logits"], proposals["pred_boxes"], matched_proposals, binary, cfg,
                                    kind, example_valid)
        sums.update({name + "_enc": value for name, value in proposal_sums.items()})
    if "dn_outputs" in outputs:  # denoising queries, each trained towards its own target
        dn_logits, dn_boxes = stack_layers(outputs["dn_outputs"], cfg.aux_loss)
        dn = dn_targets(targets, dn_logits.shape[2])
        for layer in range(dn_logits.shape[0]):
            suffix = "_dn" if layer == dn_logits.shape[0] - 1 else f"_dn_{layer}"
            layer_sums = _denoising_layer_sums(dn_logits[layer], dn_boxes[layer], dn, cfg, kind)
            sums.update({name + suffix: value for name, value in layer_sums.items()})
    return sums


def normalise(sums, loss_config, *, axis_name=None):
    """``loss_sums`` output -> (total, terms) as ``compute_loss``: each term numerator / denominator,
    a denominator of 0 read as 1 (official: at least one box; its numerator is then 0), except
    class_error, 100 when nothing is matched (official). total = sum over layers of the weighted
    loss_ce, loss_bbox and loss_giou.

    With ``axis_name`` (inside pmap) the denominators are summed over the devices and each device
    returns its share: the psum of the shares is the loss of the whole batch.
    """
    cfg = loss_config
    norm = lambda x: _psum(x, axis_name)
    terms = {}
    for name, (numerator, denominator) in sums.items():
        denominator = norm(denominator)
        if name.startswith("class_error"):
            share_of_devices = 1.0 / norm(jnp.asarray(1.0))
            terms[name] = jnp.where(denominator > 0, 100.0 * numerator / jnp.maximum(denominator, 1.0),
                                    100.0 * share_of_devices)
        else:
            terms[name] = numerator / jnp.where(denominator > 0, denominator, 1.0)
    weights = {"loss_ce": cfg.ce_weight, "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight,
               "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
    total = sum(weights[_unsuffixed(name)] * value for name, value in terms.items() if _unsuffixed(name) in weights)
    return total, terms


def _unsuffixed(name: str) -> str:
    """A term's name without its auxiliary layer, encoder or denoising suffix: loss_ce_0, loss_ce_enc,
    loss_ce_dn, loss_ce_dn_0 -> loss_ce."""
    base, _, last = name.rpartition("_")
    if last.isdigit():
        name = base
        base, _, last = name.rpartition("_")
    return base if last in ("enc", "dn") else name


def compute_loss(outputs, targets, loss_config, classification: str, *, axis_name=None, method=None):
    """(total, terms) of the set-prediction loss; see the module docstring.

    outputs: the model's dict; targets: {"labels" [B, M] int32, "boxes" [B, M, 4] (cxcywh,
    normalised), "box_valid" [B, M] bool, optionally "example_valid" [B] bool (see ``loss_sums``);
    for a model with masks also "segments" [B, H, W] int32 and "segment_ids" [B, M] int32};
    classification: the model's (``config.model.classification``, ``detr_jax.classification``);
    method: matcher override ("host" / "device").
    """
    sums = loss_sums(outputs, targets, loss_config, classification, method=method)
    return normalise(sums, loss_config, axis_name=axis_name)
