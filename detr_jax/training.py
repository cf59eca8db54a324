"""The training library: state, the pmap'd train step, and the run: setup, restore, a loop of actions.

``train_and_evaluate(config, workdir)`` is what ``train.py`` calls: ``setup`` (dataset, sizes, model,
optimizer, fresh state), ``restore`` (the newest compatible checkpoint, see
``checkpoint.TrainCheckpoints``), then ``train_loop`` over the steps with the periodic actions of
``detr_jax.periodic`` (log, checkpoint, evaluate, profile) and an agreed preemption stop.

The step is a pure function ``(state, batch, rng, stop_flag) -> (state, metrics)`` compiled with
``jax.pmap`` over the local devices; gradients and loss terms are summed over every device of every
host (the loss returns per-device shares, see ``detr_jax.losses``), so a global batch gives the same
update however it is split over hosts and devices. Every host feeds every step its share of the same
global batch (``detr_jax.data.pipeline``), so every process runs the same program at every step.
"""
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from detr_jax import checkpoint, convert, denoising, perf, periodic, pretrain, workdir_lock
from detr_jax.errors import ConfigError
from detr_jax.losses import compute_loss
from detr_jax.metrics import MetricsWriter, Throughput
from detr_jax.models import build_model, trainable_mask
from detr_jax.models.detr import MASK_HEAD_MODULES, init_inputs
from detr_jax.optim import make_optimizer
from detr_jax.parallel import AXIS, first_local, replicate_on_devices, shard


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # micro-batches consumed (= data position); int32 scalar
    params: Any
    buffers: Any  # FrozenBatchNorm statistics: carried, never updated
    opt_state: Any
    skipped: jnp.ndarray  # updates skipped because the loss or gradient was not finite


def batch_targets(batch):
    """The loss targets of a batch; an image with example_valid False (unreadable) counts nowhere
    (a batch without example_valid has only valid images); the mask targets (segments, segment_ids)
    where the batch has them."""
    keys = ("labels", "boxes", "box_valid", "example_valid", "segments", "segment_ids")
    return {k: batch[k] for k in keys if k in batch}


def make_train_step(model, tx, schedule, loss_config, model_config, grad_accum_steps: int = 1):
    """The pure step ``(state, batch, rng, stop_flag=0) -> (state, metrics)``, to be pmap'd with axis
    ``AXIS`` (rng and stop_flag broadcast: ``in_axes=(0, 0, None, None)``).

    batch: this device's share of the global batch (image [b, H, W, 3], padding_mask [b, H, W],
    labels/boxes/box_valid [b, M, ...], example_valid [b]). stop_flag: int32 scalar, this host's
    preemption request. With ``loss_config.denoising.groups`` each step draws its noised DN queries
    (``detr_jax.denoising``) from rng and trains on them too. metrics: every loss term, ``loss``
    (weighted total), ``grad_norm`` (trainable gradients, before clipping), ``lr``, ``finite`` (the
    update was applied; a non-finite loss or gradient leaves the parameters and optimizer state
    unchanged) and ``stop`` (stop_flag summed over every device of every host: > 0 when any host
    asked to stop).

    Frozen parameters (``trainable_mask``) enter the forward pass through ``stop_gradient``: their
    gradients are zero and the backward pass through the frozen stem and stages is never computed.
    """

    def step(state, batch, rng, stop_flag=0):
        rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
        trainable = trainable_mask(state.params, model_config)
        targets = batch_targets(batch)
        dn_queries = None
        if loss_config.denoising.groups:
            rng, dn_rng = jax.random.split(rng)
            noise = denoising.draw_noise(dn_rng, loss_config.denoising.groups, targets["labels"].shape,
                                         model.num_classes)
            dn_queries = denoising.model_inputs(targets, noise, loss_config.denoising, model.num_queries, AXIS)

        def loss_fn(params):
            params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, trainable)
            outputs = model.apply({"params": params, "buffers": state.buffers}, batch["image"],
                                  batch["padding_mask"], train=True, rngs={"dropout": rng}, denoising=dn_queries)
            return compute_loss(outputs, targets, loss_config, model.classification, axis_name=AXIS)

        (share, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.psum(grads, AXIS)
        total, terms, stop = jax.lax.psum((share, terms, stop_flag), AXIS)
        grad_norm = optax.tree.norm(grads)  # frozen gradients are zero
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state),
                                  skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = {**terms, "loss": total, "grad_norm": grad_norm, "finite": finite, "stop": stop,
                   "lr": schedule(state.step // grad_accum_steps)}
        return new_state, metrics

    return step


def initial_variables(config, model, rng):
    """Fresh variables, or those of ``config.init``: a training workdir (its newest checkpoint), a
    converted variables directory or an official checkpoint file (.pth / .npz), optionally without
    its class head; then optionally torchvision ImageNet weights for the backbone. A model with the
    mask head (``config.model.masks``) may start from a detector's weights: its mask head is then
    freshly initialised (official ``--frozen_weights``)."""
    init = config.init
    if not init.checkpoint:
        variables = jax.jit(model.init)(rng, *init_inputs(config.model))
    else:  # no fresh init to throw away: the checkpoint gives every variable (or the class head's rng)
        state_dict, saved_model_config = _init_state_dict(Path(init.checkpoint))
        target = config.model
        detector_only = config.model.masks and not convert.has_mask_head(state_dict)
        if detector_only:
            target = ml_collections.ConfigDict({**config.model.to_dict(), "masks": False, "freeze_detector": False})
        if saved_model_config is not None:
            ignore = ("num_classes",) if init.drop_class_head else ()
            differences = checkpoint.model_differences(saved_model_config, target, ignore=ignore)
            if differences:
                made = "was trained as" if (Path(init.checkpoint) / "checkpoints").is_dir() else "was converted for"
                raise ConfigError(f"config.init.checkpoint = {init.checkpoint!r} {made} another model: "
                                  f"{checkpoint.format_changes(differences)} (checkpoint -> config.model)")
        variables = convert.from_official_state_dict(state_dict, target, drop_class_head=init.drop_class_head,
                                                     rng=jax.random.fold_in(rng, 1))
        if detector_only:
            variables = with_fresh_mask_head(variables, model, config.model, jax.random.fold_in(rng, 2))
    if init.torchvision_backbone:
        state_dict = convert.load_state_dict_file(init.torchvision_backbone)
        variables = convert.from_torchvision_resnet(state_dict, config.model, variables)
    return jax.device_get(variables)


def _init_state_dict(path: Path):
    """(official state_dict, the model config it was saved with or None) of ``config.init.checkpoint``:
    a training workdir, a converted variables directory or an official file."""
    if path.is_dir() and (path / "checkpoints").is_dir():
        _, saved, run_config, _ = checkpoint.latest_train_variables(path)
        return convert.to_official_state_dict(saved, run_config.model), run_config.model
    if path.is_dir():
        saved, saved_model_config = checkpoint.load_variables(path)
        return convert.to_official_state_dict(saved, saved_model_config), saved_model_config
    return convert.load_state_dict_file(path), None


def with_fresh_mask_head(detector_variables, model, model_config, rng) -> dict:
    """A detector's variables with a freshly initialised mask head added (``MASK_HEAD_MODULES``)."""
    fresh = jax.jit(model.init)(rng, *init_inputs(model_config))
    params = {**detector_variables["params"], **{k: fresh["params"][k] for k in MASK_HEAD_MODULES}}
    return {**detector_variables, "params": params}


def params_checksum(params) -> float:
    """A cheap fingerprint of the parameters (sum of |values|, float64), to compare runs."""
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(params)))


@dataclasses.dataclass
class RunSizes:
    """The run's sizes, all derived from the config and the dataset when the run starts."""
    global_batch: int
    host_batch: int
    device_batch: int
    steps_per_epoch: int  # global batches (micro-batches) per epoch
    total_steps: int  # micro-batches of the whole run
    eval_every: int  # steps between evaluations (0: none): train.eval_every_steps, or eval_every_epochs

    @staticmethod
    def make(train, grad_accum_steps: int, source, data_config) -> "RunSizes":
        from detr_jax import data
        from detr_jax.validation import check_devices

        devices, local = jax.device_count(), jax.local_device_count()
        check_devices(train.batch_size, devices)
        host = data.train_host_batch(train.batch_size, jax.process_count())
        steps_per_epoch = data.steps_per_epoch(source.info.num_images, train.batch_size,
                                               len(data.bucket_list(data_config)))
        total = train.num_steps if train.num_steps > 0 else math.ceil(train.num_epochs * steps_per_epoch)
        total = math.ceil(total / grad_accum_steps) * grad_accum_steps  # whole optimizer updates
        eval_every = train.eval_every_steps
        if train.eval_every_epochs:  # the validator allows one of the two
            eval_every = max(1, round(train.eval_every_epochs * steps_per_epoch))
        return RunSizes(train.batch_size, host, host // local, steps_per_epoch, total, eval_every)


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
        from detr_jax.evaluation.evaluator import PQ_NAMES, SEGM_NAMES, format_val_loss

        start = time.perf_counter()
        result = evaluate(self.model, {"params": state.params, "buffers": state.buffers}, self.config.data,
                          batch_size=self.settings.batch_size, workdir=self.workdir, step=step, source=self.source,
                          score_threshold=float(self.settings.score_threshold), topk=int(self.settings.topk),
                          ground_truth=self.settings.ground_truth or None, loss_config=self.config.loss,
                          padding=self.settings.padding, panoptic_threshold=float(self.settings.panoptic_threshold),
                          log=_log)
        val_loss = {k: v for k, v in result.items() if k.startswith("val_")}
        masks = {k: result[k] for k in PQ_NAMES + SEGM_NAMES if k in result}  # a model with the mask head
        self.writer.write(step, {**{k: result[k] for k in METRIC_NAMES}, **masks, **val_loss, "epoch": epoch,
                                 "eval_seconds": time.perf_counter() - start})
        pq = f" PQ {masks['PQ']:.4f} segm AP {masks['segm_AP']:.4f}" if masks else ""
        _log(f"eval at step {step}: AP {result['AP']:.4f} AP50 {result['AP50']:.4f} AP75 {result['AP75']:.4f}{pq} | "
             f"val {format_val_loss(result)} ({result['num_images']} images, {time.perf_counter() - start:.1f}s)")
        return result

    def close(self) -> None:
        self.writer.close()


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


@dataclasses.dataclass
class Run:
    """What ``setup`` prepares: the config, the workdir, sizes, dataset, model, optimizer and a state
    (fresh, or restored by ``restore``), with the step it starts from."""
    config: ml_collections.ConfigDict
    workdir: Path
    sizes: RunSizes
    source: Any
    model: Any
    tx: Any
    schedule: Any
    variables: dict
    state: TrainState  # host arrays
    checkpoints: checkpoint.TrainCheckpoints
    restored: bool = False

    @property
    def start(self) -> int:
        return int(self.state.step)


def setup(config, workdir) -> Run:
    """Dataset, sizes, model, optimizer and a fresh train state (nothing written yet)."""
    from detr_jax import data

    workdir = Path(workdir)
    if config.train.compilation_cache_dir:
        perf.enable_compilation_cache(config.train.compilation_cache_dir)
    source = data.load_dataset(config.data, "train")
    if config.model.num_classes <= 0:  # the run's config: the given one, resolved (the given one is not changed)
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.num_classes = source.info.num_classes
        _log(f"config.model.num_classes set from the dataset: {source.info.num_classes}")
    if source.info.num_classes > config.model.num_classes:
        raise ConfigError(f"the dataset has labels up to {source.info.num_classes - 1} but config.model.num_classes = "
                         f"{config.model.num_classes}; set --config.model.num_classes={source.info.num_classes}")
    accum = config.optim.grad_accum_steps
    sizes = RunSizes.make(config.train, accum, source, config.data)
    model = build_model(config.model)
    init_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[0]
    variables = initial_variables(config, model, init_rng)
    tx, schedule = make_optimizer(config.optim, variables["params"], config.model,
                                  sizes.steps_per_epoch / accum, sizes.total_steps // accum)
    state = TrainState(step=np.int32(0), params=variables["params"], buffers=variables.get("buffers", {}),
                       opt_state=tx.init(variables["params"]), skipped=np.int32(0))
    checkpoints = checkpoint.TrainCheckpoints(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    return Run(config, workdir, sizes, source, model, tx, schedule, variables, state, checkpoints)


def restore(run: Run) -> Run:
    """The run continued from its newest compatible checkpoint (``TrainCheckpoints.restore``: a
    corrupt one is skipped, another model's stops with ``IncompatibleCheckpoint``, other config
    changes are logged), or pretrained as configured when there is none; then WORKDIR/config.json."""
    restored = run.checkpoints.restore(jax.tree.map(np.asarray, run.state), run.config, warn=_log)
    if restored is not None:
        step, state, meta, changes = restored
        _log(f"resumed from {run.checkpoints.directory / str(step)} (step {step})")
        if changes:
            _log(f"config changed since that checkpoint: {checkpoint.format_changes(changes)}")
        run = dataclasses.replace(run, state=state, restored=True)
    elif run.config.init.pretrain_steps > 0:
        variables = pretrain.pretrain_backbone(run.config, run.model, run.variables, run.source, run.workdir, log=_log)
        run = dataclasses.replace(run, variables=variables, state=run.state.replace(params=variables["params"]))
    if jax.process_index() == 0:
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / "config.json").write_text(run.config.to_json(indent=2) + "\n")
    return run


def make_actions(run: Run, programs) -> list[periodic.Action]:
    """The periodic actions of a run's config: log, checkpoint, evaluate, profile."""
    train, sizes = run.config.train, run.sizes
    last_good = lambda: (str(run.checkpoints.directory / str(run.checkpoints.steps()[-1]))
                         if run.checkpoints.steps() else None)
    meta = lambda step: {"step": step, "data_position": step, "seed": train.seed, "config": run.config.to_json(),
                         "class_names": list(run.source.info.class_names)}
    actions = [periodic.LogMetrics(train.log_every_steps, MetricsWriter(run.workdir, "train"),
                                   Throughput(run.start, sizes.total_steps, sizes.global_batch), sizes.steps_per_epoch,
                                   _log, train.on_nonfinite == "stop", last_good, sizes.total_steps, programs),
               periodic.SaveCheckpoint(train.checkpoint_every_steps, run.checkpoints, meta)]
    if sizes.eval_every > 0 or train.eval_at_end:
        actions.append(periodic.Evaluate(sizes.eval_every, train.eval_at_end,
                                         PeriodicEval(run.config, run.model, run.workdir), sizes.steps_per_epoch))
    if train.profile_steps:
        actions.append(periodic.Profile(perf.StepTrace(run.workdir / "tensorboard", run.start + 1, train.profile_steps)))
    return actions


def train_loop(run: Run, p_step, batches, actions, preemption: periodic.Preemption, step_rng):
    """Steps from ``run.start`` to the planned end, or to the step every host agreed to stop after.
    -> (replicated state, the step reached, whether it stopped early)."""
    local = jax.local_device_count()
    state = replicate_on_devices(run.state, local)
    step, previous, stopping = run.start, None, False
    while step < run.sizes.total_steps and not stopping:
        for action in actions:
            action.before_step(step)
        state, metrics = p_step(state, shard(next(batches), local), step_rng, preemption.flag())
        step += 1
        stopping = previous is not None and preemption.agreed(previous)
        host_state = functools.cache(functools.partial(first_local, state))  # fetched once, if asked for
        end = periodic.StepEnd(step, step == run.sizes.total_steps or stopping, stopping, metrics, host_state)
        for action in actions:
            action.after_step(end)
        previous = metrics
    return state, step, stopping


def train_and_evaluate(config, workdir) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint when it has one. The run
    holds the workdir (``workdir_lock``): a second run on it stops with ``WorkdirInUse``.

    Writes WORKDIR/config.json, checkpoints/ (every ``train.checkpoint_every_steps`` and at the end,
    the last ``train.keep_checkpoints`` kept), tensorboard/ and history/train.jsonl. SIGTERM or
    SIGINT (Ctrl-C; a second one exits at once) on any host stops every host after the same step,
    which is saved; the run then returns cleanly. A
    non-finite loss or gradient is never applied; with ``train.on_nonfinite = "stop"`` the run stops
    with an error, the last good checkpoint kept. ``train.compilation_cache_dir`` keeps compiled
    programs across runs; ``train.profile_steps`` traces that many steps (after the run's first)
    into tensorboard/ for TensorBoard's profile tab. The metric ``train_step_programs`` counts the
    train step's programs built so far (one per batch shape, i.e. per bucket). Returns the final
    state (unreplicated).
    """
    from detr_jax.validation import validate

    validate(config)
    with workdir_lock.hold(workdir):
        return _train(restore(setup(config, workdir)))


def _train(run: Run) -> TrainState:
    """The run's steps, after ``setup`` and ``restore``; -> the final state (unreplicated)."""
    from detr_jax import data

    config = run.config
    sizes, accum = run.sizes, config.optim.grad_accum_steps
    _log(f"devices: {jax.device_count()} ({jax.local_device_count()} local x {jax.process_count()} processes, "
         f"{jax.devices()[0].platform}); batch: {sizes.device_batch} per device, {sizes.host_batch} per host, "
         f"{sizes.global_batch} global" + (f" x {accum} accumulated" if accum > 1 else ""))
    _log(f"dataset: {run.source.info.num_images} training images, {sizes.steps_per_epoch} steps per epoch; "
         f"training steps {run.start} -> {sizes.total_steps}")
    step_fn = perf.TraceCounter(make_train_step(run.model, run.tx, run.schedule, config.loss, config.model, accum))
    p_step = jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None, None), donate_argnums=(0,))  # in place
    batches = data.train_batches(config.data, sizes.global_batch, seed=config.train.seed, start_step=run.start,
                                 source=run.source)
    step_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[1]
    preemption = periodic.Preemption()
    actions = []
    try:
        actions = make_actions(run, lambda: step_fn.traces)
        state, step, stopped = train_loop(run, p_step, batches, actions, preemption, step_rng)
    finally:
        preemption.close()
        for action in actions:
            action.close()
        run.checkpoints.close()
    if stopped:
        _log(f"stopped by {preemption.cause()}: saved the checkpoint of step {step}; exiting")
    final = first_local(state)
    if config.train.profile_steps:
        _log(f"profile trace of steps {run.start + 1}..{run.start + config.train.profile_steps} in "
             f"{run.workdir / 'tensorboard'} (TensorBoard's profile tab)")
    _log(f"finished at step {step}; parameter checksum {params_checksum(final.params)!r}")
    return final
