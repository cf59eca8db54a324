"""Denoising (DN) training, as DN-DETR (IDEA-Research/DN-DETR ``dn_components.py``): the training-time
query augmentation of ``config.loss.denoising``.

Each training step, every target box is fed to the decoder ``groups`` times as an extra query whose
label and box are noised (a query per (group, target slot)); the decoder reconstructs the original
label and box, a task without matching that stabilises and speeds up training. At inference nothing
changes: the model runs without these queries.

- Label noise: each label is replaced, with probability ``label_noise``, by a uniform class in
  0..num_classes-1 (possibly the same).
- Box noise: the centre moves by up to ``box_noise`` x half the width / height, the width and height
  by up to ``box_noise`` x themselves (uniform), then the box is clipped to [0, 1].
- Queries: ``P = groups x M`` slots (M = max_boxes), group-major: slot g M + j is target j of each
  image in group g. The model embeds the noised label (``label_enc``, with an indicator column 1) as
  the query's content and the noised box as its anchor; a slot of an image with fewer targets has
  content 0 and anchor logit 0, as official.
- Attention mask [B, P + Q, P + Q] (True = blocked): the Q matching queries see only each other; a DN
  query sees the matching queries and its own group. As official, the groups hold the batch's
  largest target count: slots j < max_b n_b are visible within their group even in images with
  fewer targets; slots beyond it do not exist officially and are blocked. Under pmap the count is
  the global batch's (official: each GPU's), so a step does not depend on the device count.
- Loss (``detr_jax.losses``): per decoder layer, the model's classification loss, L1 and GIoU of
  each real slot against its original label and box, divided by the number of real slots
  (``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn``, ``_l`` for auxiliary layers), with the weights
  of the matching terms. Official divides by each GPU's own count; here the count is summed over
  the devices like the other terms, so the loss does not depend on how a batch is split.
"""
import jax
import jax.numpy as jnp


def draw_noise(rng, groups: int, num_targets: tuple[int, int], num_classes: int) -> dict:
    """The random numbers of one step: {"label_u" [G, B, M] uniform [0, 1), "new_labels" [G, B, M]
    int32 (a uniform class 0..num_classes-1 for every slot; used where label_u < label_noise), "box_u"
    [G, B, M, 4] uniform [0, 1)} for (B, M) = num_targets. Only label_u < label_noise and box_u
    enter, so the same numbers fed explicitly reproduce the official noise."""
    k1, k2, k3 = jax.random.split(rng, 3)
    shape = (groups, *num_targets)
    return {"label_u": jax.random.uniform(k1, shape), "new_labels": jax.random.randint(k2, shape, 0, num_classes),
            "box_u": jax.random.uniform(k3, (*shape, 4))}


def noised_queries(targets, noise, label_noise: float, box_noise: float) -> dict:
    """targets {"labels" [B, M], "boxes" [B, M, 4] cxcywh, "box_valid" [B, M]} and ``draw_noise``'s
    numbers -> {"labels" [B, P] int32, "boxes" [B, P, 4] in [0, 1], "valid" [B, P] bool}: the noised
    label and box of every DN slot (P = G M, group-major)."""
    groups = noise["label_u"].shape[0]
    flip = noise["label_u"] < label_noise
    labels = jnp.where(flip, noise["new_labels"], targets["labels"][None])  # [G, B, M]
    boxes = jnp.broadcast_to(targets["boxes"][None], noise["box_u"].shape)
    wh = boxes[..., 2:]
    spread = jnp.concatenate([wh / 2, wh], axis=-1)
    boxes = jnp.clip(boxes + (noise["box_u"] * 2 - 1) * spread * box_noise, 0.0, 1.0)
    group_major = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], groups * x.shape[2], *x.shape[3:])
    valid = jnp.broadcast_to(targets["box_valid"][None], labels.shape)
    return {"labels": group_major(labels).astype(jnp.int32), "boxes": group_major(boxes), "valid": group_major(valid)}


def attention_mask(box_valid, groups: int, num_queries: int, axis_name=None):
    """box_valid [B, M] -> self-attention mask [B, P + Q, P + Q] bool (True = blocked): DN slots first
    (P = G M, group-major), then the Q matching queries; see the module docstring. With ``axis_name``
    (inside pmap) the largest target count is the global batch's, so the mask, like the loss, does
    not depend on how the batch is split over devices (official: each GPU's own batch)."""
    b, m = box_valid.shape
    slots = groups * m
    largest = box_valid.sum(-1).max()
    if axis_name is not None:
        largest = jax.lax.pmax(largest, axis_name)
    exists = jnp.tile(jnp.arange(m) < largest, groups)  # [P]: j < the batch's largest count
    group = jnp.repeat(jnp.arange(groups), m)
    dn_to_dn = (group[:, None] != group[None, :]) | ~exists[None, :]
    top = jnp.concatenate([dn_to_dn, jnp.zeros((slots, num_queries), bool)], axis=1)
    bottom = jnp.concatenate([jnp.ones((num_queries, slots), bool), jnp.zeros((num_queries, num_queries), bool)],
                             axis=1)
    return jnp.broadcast_to(jnp.concatenate([top, bottom], axis=0), (b, slots + num_queries, slots + num_queries))


def model_inputs(targets, noise, dn_config, num_queries: int, axis_name=None) -> dict:
    """The model's ``denoising`` argument ({"labels", "boxes", "valid"} of ``noised_queries`` and
    "mask" of ``attention_mask``) for one step's targets and noise."""
    queries = noised_queries(targets, noise, dn_config.label_noise, dn_config.box_noise)
    groups = noise["label_u"].shape[0]
    return {**queries, "mask": attention_mask(targets["box_valid"], groups, num_queries, axis_name)}


def dn_targets(targets, num_slots: int) -> dict:
    """The DN slots' own targets: {"labels" [B, P], "boxes" [B, P, 4], "box_valid" [B, P]}, the
    original targets repeated per group (P = num_slots, a multiple of M)."""
    groups = num_slots // targets["labels"].shape[1]
    tile = lambda x: jnp.tile(x, (1, groups) + (1,) * (x.ndim - 2))
    return {"labels": tile(targets["labels"]), "boxes": tile(targets["boxes"]), "box_valid": tile(targets["box_valid"])}
