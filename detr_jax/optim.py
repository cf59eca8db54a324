"""Optimizer of the official recipe: AdamW, a separate backbone learning rate, frozen parameters,
clipping by global norm, step or warm-up + cosine schedules, optional gradient accumulation.

``make_optimizer(config.optim, params, model_config, steps_per_epoch)`` -> (optax transform,
learning-rate schedule of the non-backbone parameters). Schedules count optimizer updates (with
accumulation, one update every ``grad_accum_steps`` micro-batches).

The chain is: zero the frozen gradients (so they do not count in the norm) -> clip the global norm
of the trainable gradients -> AdamW per group (backbone: ``lr_backbone``; Deformable DETR's
``sampling_offsets`` and ``reference_points``: ``lr * lr_linear_proj_mult``; rest: ``lr``; decoupled
weight decay on every trained parameter, as torch.optim.AdamW in official DETR) -> frozen
parameters never move and carry no optimizer state.
"""
import jax
import optax

from detr_jax.models import trainable_mask

SCHEDULES = ("step", "warmup_cosine", "constant")


def lr_schedule(optim, peak: float, steps_per_epoch: float, total_steps: int):
    """Learning rate as a function of the optimizer update count."""
    if optim.schedule == "step":
        drops = {int(round(epoch * steps_per_epoch)): optim.lr_drop_factor for epoch in optim.lr_drop_epochs}
        return optax.piecewise_constant_schedule(peak, drops)
    if optim.schedule == "warmup_cosine":
        warmup = int(round(optim.warmup_epochs * steps_per_epoch))
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                  end_value=peak * optim.end_lr_factor)
    if optim.schedule == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"config.optim.schedule = {optim.schedule!r}; expected one of {', '.join(SCHEDULES)}")


LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")  # official Deformable DETR lr_linear_proj_names


def param_groups(params, model_config):
    """Label of every parameter: "frozen", "backbone" (trained backbone), "linear_proj" (a module
    named in LINEAR_PROJ_NAMES) or "rest"."""
    trainable = trainable_mask(params, model_config)

    def label(path, keep):
        if not keep:
            return "frozen"
        if path[0].key == "backbone":
            return "backbone"
        return "linear_proj" if any(p.key in LINEAR_PROJ_NAMES for p in path) else "rest"

    return jax.tree_util.tree_map_with_path(label, trainable)


def make_optimizer(optim, params, model_config, steps_per_epoch: float, total_steps: int):
    """(optax transform over ``params``, schedule of the main learning rate). ``total_steps`` counts
    optimizer updates."""
    groups = param_groups(params, model_config)
    main = lr_schedule(optim, optim.lr, steps_per_epoch, total_steps)
    backbone = lr_schedule(optim, optim.lr_backbone, steps_per_epoch, total_steps)
    adamw_of = lambda lr: optax.adamw(lr, optim.b1, optim.b2, optim.eps, weight_decay=optim.weight_decay)
    transforms = {"rest": adamw_of(main), "backbone": adamw_of(backbone), "frozen": optax.set_to_zero()}
    if "linear_proj" in jax.tree_util.tree_leaves(groups):  # models without these keep their optimizer state's layout
        transforms["linear_proj"] = adamw_of(lr_schedule(optim, optim.lr * optim.lr_linear_proj_mult, steps_per_epoch,
                                                         total_steps))
    frozen = jax.tree.map(lambda g: g == "frozen", groups)
    tx = optax.chain(
        optax.masked(optax.set_to_zero(), frozen),
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
        optax.multi_transform(transforms, groups),
    )
    if optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
    return tx, main
