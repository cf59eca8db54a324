"""The training library: state, the pmap'd train step, and the loop with checkpoints and metrics.

``train_and_evaluate(config, workdir)`` is what ``train.py`` calls. The step is a pure function
``(state, batch, rng) -> (state, metrics)`` compiled with ``jax.pmap`` over the local devices;
gradients and loss terms are summed over every device of every host (the loss returns per-device
shares, see ``detr_jax.losses``), so a global batch gives the same update however it is split.
"""
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from detr_jax import checkpoint, convert, perf, pretrain
from detr_jax.metrics import MetricsWriter, Throughput, format_duration, mean_metrics
from detr_jax.losses import compute_loss
from detr_jax.models import build_model, trainable_mask
from detr_jax.optim import make_optimizer

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # micro-batches consumed (= data position); int32 scalar
    params: Any
    buffers: Any  # FrozenBatchNorm statistics: carried, never updated
    opt_state: Any
    skipped: jnp.ndarray  # updates skipped because the loss or gradient was not finite


def batch_targets(batch):
    return {"labels": batch["labels"], "boxes": batch["boxes"], "box_valid": batch["box_valid"]}


def make_train_step(model, tx, schedule, loss_config, model_config, grad_accum_steps: int = 1):
    """The pure step ``(state, batch, rng) -> (state, metrics)``, to be pmap'd with axis ``AXIS``.

    batch: this device's share of the global batch (image [b, H, W, 3], padding_mask [b, H, W],
    labels/boxes/box_valid [b, M, ...]). metrics: every loss term, ``loss`` (weighted total),
    ``grad_norm`` (trainable gradients, before clipping), ``lr`` and ``finite`` (the update was
    applied; a non-finite loss or gradient leaves the parameters and optimizer state unchanged).

    Frozen parameters (``trainable_mask``) enter the forward pass through ``stop_gradient``: their
    gradients are zero and the backward pass through the frozen stem and stages is never computed.
    """

    def step(state, batch, rng):
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
        trainable = trainable_mask(state.params, model_config)

        def loss_fn(params):
            params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, trainable)
            outputs = model.apply({"params": params, "buffers": state.buffers}, batch["image"],
                                  batch["padding_mask"], train=True, rngs={"dropout": rng})
            return compute_loss(outputs, batch_targets(batch), loss_config, axis_name=AXIS)

        (share, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.psum(grads, AXIS)
        total, terms = jax.lax.psum((share, terms), AXIS)
        grad_norm = optax.tree.norm(grads)  # frozen gradients are zero
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state),
                                  skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = {**terms, "loss": total, "grad_norm": grad_norm, "finite": finite,
                   "lr": schedule(state.step // grad_accum_steps)}
        return new_state, metrics

    return step


def initial_variables(config, model, rng):
    """Fresh variables, or those of ``config.init``: a converted variables directory or an official
    checkpoint file (.pth / .npz), optionally without its class head; then optionally torchvision
    ImageNet weights for the backbone."""
    init = config.init
    if not init.checkpoint:
        variables = jax.jit(model.init)(rng, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    else:  # no fresh init to throw away: the checkpoint gives every variable (or the class head's rng)
        path = Path(init.checkpoint)
        if path.is_dir():
            saved, saved_model_config = checkpoint.load_variables(path)
            state_dict = convert.to_official_state_dict(saved, saved_model_config)
        else:
            state_dict = convert.load_state_dict_file(path)
        variables = convert.from_official_state_dict(state_dict, config.model, drop_class_head=init.drop_class_head,
                                                     rng=jax.random.fold_in(rng, 1))
    if init.torchvision_backbone:
        state_dict = convert.load_state_dict_file(init.torchvision_backbone)
        variables = convert.from_torchvision_resnet(state_dict, config.model, variables)
    return jax.device_get(variables)


def shard(batch, num_devices: int):
    """Host batch [B, ...] -> [devices, B / devices, ...]."""
    return jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), batch)


def replicate(tree, num_devices: int):
    """Host pytree -> [devices, ...] copies, for pmap."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices, *np.shape(x))), tree)


def replicate_on_devices(tree, num_devices: int):
    """Host pytree -> copies on the local devices, laid out as ``jax.pmap`` lays out its outputs: a
    pmap'd step then sees the same input layout at its first call as at every later one and builds
    one program, not two (host arrays at the first call would cost a second compilation). The
    step's outputs are sharded over a mesh of the local devices whose axis is pmap's ``AXIS``."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:num_devices]), (AXIS,))
    return jax.device_put(replicate(tree, num_devices), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))


def unreplicate(tree):
    return jax.device_get(jax.tree.map(lambda x: x[0], tree))


def params_checksum(params) -> float:
    """A cheap fingerprint of the parameters (sum of |values|, float64), to compare runs."""
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(params)))


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Plan:
    """The run's sizes, all derived from the config and the dataset."""
    global_batch: int
    host_batch: int
    device_batch: int
    steps_per_epoch: int  # micro-batches per epoch (full batches every host can make)
    total_steps: int  # micro-batches of the whole run

    @staticmethod
    def make(train, grad_accum_steps: int, source, data_config) -> "Plan":
        from detr_jax import data

        devices, local = jax.device_count(), jax.local_device_count()
        if train.batch_size % devices:
            raise ValueError(f"config.train.batch_size ({train.batch_size}) must be a multiple of the number of "
                             f"devices ({devices})")
        host = train.batch_size // jax.process_count()
        steps_per_epoch = data.steps_per_epoch(source.images_per_host(), host, len(data.bucket_list(data_config)))
        total = train.num_steps if train.num_steps > 0 else math.ceil(train.num_epochs * steps_per_epoch)
        total = math.ceil(total / grad_accum_steps) * grad_accum_steps  # whole optimizer updates
        return Plan(train.batch_size, host, host // local, steps_per_epoch, total)


class PeriodicEval:
    """COCO evaluation of the val split during training: the 12 numbers and the val loss terms
    (val_loss, val_loss_ce, ..., with the run's config.loss) to TensorBoard and to
    WORKDIR/history/eval.jsonl, the results and per-class AP to WORKDIR/eval/step_NNNNNN/."""

    def __init__(self, config, model, workdir):
        from detr_jax import data
        from detr_jax.evaluation.checkpoints import eval_settings

        self.config, self.model, self.workdir = config, model, workdir
        self.settings = eval_settings(config)
        self.source = data.load_dataset(config.data, "val")
        self.writer = MetricsWriter(workdir, "eval")

    def run(self, step: int, state: TrainState, epoch: float) -> dict:
        from detr_jax.evaluation import METRIC_NAMES, evaluate
        from detr_jax.evaluation.evaluator import format_val_loss

        start = time.perf_counter()
        result = evaluate(self.model, {"params": state.params, "buffers": state.buffers}, self.config.data,
                          batch_size=self.settings.batch_size, workdir=self.workdir, step=step, source=self.source,
                          score_threshold=float(self.settings.score_threshold), topk=int(self.settings.topk),
                          ground_truth=self.settings.ground_truth or None, loss_config=self.config.loss, log=_log)
        val_loss = {k: v for k, v in result.items() if k.startswith("val_")}
        self.writer.write(step, {**{k: result[k] for k in METRIC_NAMES}, **val_loss, "epoch": epoch,
                                 "eval_seconds": time.perf_counter() - start})
        _log(f"eval at step {step}: AP {result['AP']:.4f} AP50 {result['AP50']:.4f} AP75 {result['AP75']:.4f} | "
             f"val {format_val_loss(result)} ({result['num_images']} images, {time.perf_counter() - start:.1f}s)")
        return result

    def close(self) -> None:
        self.writer.close()


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train_and_evaluate(config, workdir) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint when it has one.

    Writes WORKDIR/config.json, checkpoints/ (every ``train.checkpoint_every_steps`` and at the end,
    the last ``train.keep_checkpoints`` kept), tensorboard/ and history/train.jsonl. SIGTERM saves a
    checkpoint and returns cleanly. A non-finite loss or gradient is never applied; with
    ``train.on_nonfinite = "stop"`` the run stops with an error, the last good checkpoint kept.
    ``train.compilation_cache_dir`` keeps compiled programs across runs; ``train.profile_steps``
    traces that many steps (after the run's first) into tensorboard/ for TensorBoard's profile tab.
    The metric ``train_step_programs`` counts the train step's programs built so far (one per batch
    shape, i.e. per bucket). Returns the final state (unreplicated).
    """
    from detr_jax import data

    workdir = Path(workdir)
    if config.train.compilation_cache_dir:
        perf.enable_compilation_cache(config.train.compilation_cache_dir)
    source = data.load_dataset(config.data, "train")
    if config.model.num_classes <= 0:
        config.model.num_classes = source.info.num_classes
        _log(f"config.model.num_classes set from the dataset: {source.info.num_classes}")
    if source.info.num_classes > config.model.num_classes:
        raise ValueError(f"the dataset has labels up to {source.info.num_classes - 1} but config.model.num_classes = "
                         f"{config.model.num_classes}; set --config.model.num_classes={source.info.num_classes}")
    accum = config.optim.grad_accum_steps
    plan = Plan.make(config.train, accum, source, config.data)
    model = build_model(config.model)
    rng = jax.random.PRNGKey(config.train.seed)
    init_rng, step_rng = jax.random.split(rng)
    variables = initial_variables(config, model, init_rng)
    tx, schedule = make_optimizer(config.optim, variables["params"], config.model,
                                  plan.steps_per_epoch / accum, plan.total_steps // accum)
    state = TrainState(step=np.int32(0), params=variables["params"], buffers=variables.get("buffers", {}),
                       opt_state=tx.init(variables["params"]), skipped=np.int32(0))

    checkpoints = checkpoint.TrainCheckpoints(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    restored = checkpoints.restore(jax.tree.map(np.asarray, state), warn=_log)
    if restored is not None:
        step, state, _ = restored
        _log(f"resumed from {checkpoints.directory / str(step)} (step {step})")
    start = int(state.step)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
    _log(f"devices: {jax.device_count()} ({jax.local_device_count()} local x {jax.process_count()} processes, "
         f"{jax.devices()[0].platform}); batch: {plan.device_batch} per device, {plan.host_batch} per host, "
         f"{plan.global_batch} global" + (f" x {accum} accumulated" if accum > 1 else ""))
    _log(f"dataset: {source.info.num_images} training images, {plan.steps_per_epoch} steps per epoch; "
         f"training steps {start} -> {plan.total_steps}")

    if restored is None and config.init.pretrain_steps > 0:
        variables = pretrain.pretrain_backbone(config, model, variables, source, workdir, log=_log)
        state = state.replace(params=variables["params"])
    step_fn = perf.TraceCounter(make_train_step(model, tx, schedule, config.loss, config.model, accum))
    p_step = jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))  # state updated in place
    local = jax.local_device_count()
    state = replicate_on_devices(state, local)
    batches = data.train_batches(config.data, plan.host_batch, seed=config.train.seed, start_step=start, source=source)
    metrics_writer = MetricsWriter(workdir, "train")
    throughput = Throughput(start, plan.total_steps, plan.global_batch)
    preemption = Preemption()
    trace = perf.StepTrace(workdir / "tensorboard", start + 1, config.train.profile_steps)

    evaluator = PeriodicEval(config, model, workdir) if (config.train.eval_every_steps > 0 or
                                                          config.train.eval_at_end) else None

    def save(step):
        meta = {"step": step, "data_position": step, "seed": config.train.seed, "config": config.to_json()}
        checkpoints.save(step, unreplicate(state), meta)

    pending = []
    step = start
    try:
        while step < plan.total_steps:
            batch = next(batches)
            trace.before(step)
            state, metrics = p_step(state, shard(batch, local), step_rng)
            trace.after(step, metrics)
            step += 1
            pending.append(metrics)
            last = step == plan.total_steps
            if step % config.train.log_every_steps == 0 or last or preemption.requested:
                logged = [jax.tree.map(lambda x: np.asarray(x[0]), m) for m in jax.device_get(pending)]
                pending = []
                nonfinite = sum(1 for m in logged if not m["finite"])
                scalars = mean_metrics([{k: v for k, v in m.items() if k != "finite"} for m in logged])
                scalars.update(throughput.report(step), epoch=step / plan.steps_per_epoch,
                               skipped_steps=int(unreplicate(state.skipped)),
                               train_step_programs=step_fn.traces)
                metrics_writer.write(step, scalars)
                _log(f"step {step}/{plan.total_steps} (epoch {scalars['epoch']:.2f}) loss {scalars['loss']:.4f} "
                     f"ce {scalars['loss_ce']:.3f} bbox {scalars['loss_bbox']:.3f} giou {scalars['loss_giou']:.3f} "
                     f"class_err {scalars['class_error']:.1f} | grad {scalars['grad_norm']:.3f} lr {scalars['lr']:.2e} | "
                     f"{scalars['steps_per_s']:.2f} steps/s {scalars['examples_per_s']:.1f} img/s | "
                     f"ETA {format_duration(scalars['eta_s'])}")
                if nonfinite and config.train.on_nonfinite == "stop":
                    kept = checkpoints.steps()
                    raise FloatingPointError(
                        f"non-finite loss or gradient in {nonfinite} of the last {len(logged)} steps (up to step {step}); "
                        "stopping. Those updates were not applied; the last good checkpoint is "
                        f"{checkpoints.directory / str(kept[-1]) if kept else '(none yet)'}. Lower the learning rate, "
                        "check the data report, or set --config.train.on_nonfinite=skip to skip such steps.")
            if step % config.train.checkpoint_every_steps == 0 or last or preemption.requested:
                save(step)
            every = config.train.eval_every_steps
            if evaluator and ((every > 0 and step % every == 0) or (last and config.train.eval_at_end)):
                evaluator.run(step, unreplicate(state), step / plan.steps_per_epoch)
            if preemption.requested:
                _log(f"SIGTERM: saved the checkpoint of step {step}; exiting")
                break
    finally:
        trace.close()
        preemption.restore()
        metrics_writer.close()
        if evaluator:
            evaluator.close()
        checkpoints.close()
    final = unreplicate(state)
    if config.train.profile_steps:
        _log(f"profile trace of steps {start + 1}..{start + config.train.profile_steps} in {workdir / 'tensorboard'} "
             "(TensorBoard's profile tab)")
    _log(f"finished at step {step}; parameter checksum {params_checksum(final.params)!r}")
    return final
