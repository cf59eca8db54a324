"""Backbone pretraining on the training split's own boxes: a stand-in for ImageNet weights where
none can be had (the CPU demo, offline machines).

Official DETR starts from an ImageNet-pretrained ResNet. From a random backbone it sits at the
class-prior solution for thousands of steps: on the synthetic demo, 5,670 steps left the class
error at 84% (5 classes: chance is 80%) and the AP at 0.003. With ``config.init.pretrain_steps > 0``
a fresh run first trains the backbone alone as a dense classifier, then DETR starts from it:

  every cell (i, j) of the backbone's output [h, w] (stride s = canvas / feature size) is labelled
  with the class of the smallest valid box containing its centre ((j + 0.5) s, (i + 0.5) s) in
  pixels of the unpadded image, or background (label num_classes); a linear head (thrown away
  afterwards) is trained with softmax cross-entropy, background cells weighted
  ``BACKGROUND_WEIGHT``, padding cells not at all; AdamW at ``init.pretrain_lr``, the training
  pipeline's batches and augmentation with their own seed (``train.seed + 1``).

Every backbone parameter is trained (frozen_stages applies to DETR's training afterwards). Single
host only: hosts pretraining on their own shards would start DETR from different backbones.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from detr_jax.metrics import MetricsWriter, Throughput, format_duration, mean_metrics
from detr_jax.models.position import downsample_mask
from detr_jax.models.resnet import ResNet

BACKGROUND_WEIGHT = 0.3


def dense_labels(boxes, labels, box_valid, size, feature_hw: tuple[int, int], stride: float, num_classes: int):
    """Class of each feature cell -> [B, h, w] int32 (num_classes: background).

    boxes [B, M, 4] (cx, cy, w, h) normalised by size; labels [B, M]; box_valid [B, M];
    size [B, 2] (h, w) pixels of the unpadded image. A cell whose centre lies in several boxes
    takes the smallest box's class.
    """
    h, w = feature_hw
    size = size.astype(jnp.float32)
    cy = (jnp.arange(h) + 0.5)[None, :, None, None] * stride / size[:, 0, None, None, None]  # [B, h, 1, 1]
    cx = (jnp.arange(w) + 0.5)[None, None, :, None] * stride / size[:, 1, None, None, None]  # [B, 1, w, 1]
    box = lambda k: boxes[:, None, None, :, k]  # [B, 1, 1, M]
    inside = ((jnp.abs(cx - box(0)) <= box(2) / 2) & (jnp.abs(cy - box(1)) <= box(3) / 2)
              & box_valid[:, None, None, :])  # [B, h, w, M]
    area = jnp.where(inside, box(2) * box(3), jnp.inf)
    smallest = area.argmin(-1)  # [B, h, w]
    cls = jnp.take_along_axis(labels, smallest.reshape(labels.shape[0], -1), axis=1).reshape(smallest.shape)
    return jnp.where(inside.any(-1), cls, num_classes).astype(jnp.int32)


def dense_loss(head_logits, cell_labels, cell_padding, num_classes: int):
    """Weighted cross-entropy over unpadded cells, and the accuracy on object cells.

    head_logits [B, h, w, num_classes + 1]; cell_labels [B, h, w]; cell_padding [B, h, w] bool.
    -> (loss, accuracy) scalars.
    """
    nll = -jnp.take_along_axis(jax.nn.log_softmax(head_logits.astype(jnp.float32)), cell_labels[..., None],
                               axis=-1)[..., 0]
    background = cell_labels == num_classes
    weight = jnp.where(cell_padding, 0.0, jnp.where(background, BACKGROUND_WEIGHT, 1.0))
    objects = ~background & ~cell_padding
    correct = (head_logits.argmax(-1) == cell_labels) & objects
    return (weight * nll).sum() / jnp.maximum(weight.sum(), 1e-9), correct.sum() / jnp.maximum(objects.sum(), 1)


def make_pretrain_step(backbone: nn.Module, head: nn.Module, tx, buffers: dict, num_classes: int):
    """(params {"backbone", "head"}, opt_state, batch) -> (params, opt_state, {"loss", "accuracy"}).
    buffers: the backbone's non-parameter variables ({} or {"buffers": ...})."""

    def loss_fn(params, batch):
        features = backbone.apply({"params": params["backbone"], **buffers}, batch["image"])
        hw = features.shape[1:3]
        cells = dense_labels(batch["boxes"], batch["labels"], batch["box_valid"], batch["size"], hw,
                             batch["image"].shape[1] / hw[0], num_classes)
        logits = head.apply({"params": params["head"]}, features)
        return dense_loss(logits, cells, downsample_mask(batch["padding_mask"], hw), num_classes)

    def step(params, opt_state, batch):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

    return jax.jit(step)


def pretrain_backbone(config, model, variables, source, workdir, log=print):
    """Pretrain ``variables``' backbone as ``config.init`` says -> variables with the new backbone.

    model: the DETR module (its ``backbone`` is trained); source: the train split (a
    ``load_dataset`` result). Progress goes to ``log`` and WORKDIR/history/pretrain.jsonl.
    """
    from detr_jax import data

    init, steps = config.init, config.init.pretrain_steps
    if jax.process_count() > 1:
        raise ValueError("config.init.pretrain_steps: backbone pretraining runs on a single host; on several hosts "
                         "start from ImageNet weights (config.init.torchvision_backbone) instead")
    if init.checkpoint or init.torchvision_backbone:
        raise ValueError("config.init.pretrain_steps pretrains a fresh backbone; it cannot be combined with "
                         "config.init.checkpoint or config.init.torchvision_backbone")
    num_classes = config.model.num_classes
    head = nn.Dense(num_classes + 1, name="dense_head")
    buffers = _buffers(variables)
    # the last stage only (a multi-scale model's backbone also returns C3, C4: the same parameters)
    backbone = model.backbone.clone(num_outputs=1) if isinstance(model.backbone, ResNet) else model.backbone
    width = jax.eval_shape(lambda p: backbone.apply({"params": p, **buffers}, jnp.zeros((1, 64, 64, 3))),
                           variables["params"]["backbone"]).shape[-1]
    params = {"backbone": variables["params"]["backbone"],
              "head": head.init(jax.random.PRNGKey(config.train.seed + 1), jnp.zeros((1, width)))["params"]}
    tx = optax.adamw(init.pretrain_lr, weight_decay=config.optim.weight_decay)
    opt_state = tx.init(params)
    step_fn = make_pretrain_step(backbone, head, tx, buffers, num_classes)
    batch_size = config.train.batch_size
    batches = data.train_batches(config.data, batch_size, seed=config.train.seed + 1, source=source)
    keys = ("image", "padding_mask", "boxes", "labels", "box_valid", "size")
    writer, throughput, pending = MetricsWriter(workdir, "pretrain"), Throughput(0, steps, batch_size), []
    log(f"pretraining the backbone: {steps} steps of dense classification, batch {batch_size}, lr {init.pretrain_lr:g}")
    try:
        for step in range(1, steps + 1):
            batch = next(batches)
            params, opt_state, metrics = step_fn(params, opt_state, {k: batch[k] for k in keys})
            pending.append(metrics)
            if step % config.train.log_every_steps == 0 or step == steps:
                scalars = mean_metrics(jax.device_get(pending))
                pending = []
                scalars.update(throughput.report(step))
                writer.write(step, scalars)
                log(f"pretrain {step}/{steps} loss {scalars['loss']:.4f} object-cell accuracy "
                    f"{100 * scalars['accuracy']:.1f}% | {scalars['steps_per_s']:.2f} steps/s | "
                    f"ETA {format_duration(scalars['eta_s'])}")
    finally:
        writer.close()
    return {**variables, "params": {**variables["params"], "backbone": jax.device_get(params["backbone"])}}


def _buffers(variables) -> dict:
    """The backbone's FrozenBatchNorm buffers as a variables entry ({} with GroupNorm)."""
    backbone = variables.get("buffers", {}).get("backbone")
    return {"buffers": backbone} if backbone else {}
