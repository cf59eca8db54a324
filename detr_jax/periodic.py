"""What the training loop does around its steps, one small object each (after clu's periodic actions).

The loop (``detr_jax.training.train_loop``) runs the steps; after each one it hands every action a
``StepEnd`` and the actions decide, each for itself, whether to act:

- ``LogMetrics``: console line, TensorBoard and history/train.jsonl every ``every`` steps; stops
  the run on a non-finite step when asked to;
- ``SaveCheckpoint``: a checkpoint every ``every`` steps, at the end and when the run stops early;
- ``Evaluate``: COCO evaluation of the val split every ``every`` steps and at the end;
- ``Profile``: a profiler trace of a few steps (its ``before_step`` runs before the step).

``Preemption`` turns SIGTERM or Ctrl-C (SIGINT) on any host into a stop that every host agrees on,
after the same step.

Every host runs the same actions at the same steps (checkpoints and evaluations are collective), so
each decision depends only on the step, the run's end and values every host shares.
"""
import abc
import dataclasses
import signal
from typing import Any, Callable

import numpy as np

from detr_jax.metrics import format_duration, mean_metrics
from detr_jax.parallel import first_local


@dataclasses.dataclass
class StepEnd:
    """What an action sees after a step: the step count reached, whether it is the run's last (its
    planned end or an agreed stop), the step's metrics (per-device arrays, not yet fetched) and
    ``host_state()``, the unreplicated train state (fetched once, on first use)."""
    step: int
    last: bool
    stopping: bool
    metrics: dict
    host_state: Callable[[], Any]


def due(step: int, every: int, last: bool, at_end: bool = True) -> bool:
    """The step is a multiple of ``every`` (> 0), or the run's last step and ``at_end``."""
    return (every > 0 and step % every == 0) or (last and at_end)


class Action(abc.ABC):
    """Base: acts after steps; ``before_step`` and ``close`` do nothing unless overridden."""

    def before_step(self, step: int) -> None:
        pass

    @abc.abstractmethod
    def after_step(self, end: StepEnd) -> None:
        """Act (or not) after the step that ``end`` describes."""

    def close(self) -> None:
        pass





class LogMetrics(Action):
    """Mean of the step metrics since the last line, with rate, ETA, epoch and skipped steps.

    writer: ``MetricsWriter``; throughput: ``Throughput``; log: prints on process 0;
    stop_on_nonfinite: raise ``FloatingPointError`` when a logged step was not applied, naming
    ``last_good()`` (the newest checkpoint, or None).
    """

    def __init__(self, every: int, writer, throughput, steps_per_epoch: float, log: Callable[[str], None],
                 stop_on_nonfinite: bool, last_good: Callable[[], str | None], total_steps: int,
                 programs: Callable[[], int]):
        self.every, self.writer, self.throughput, self.log = every, writer, throughput, log
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.stop_on_nonfinite, self.last_good, self.programs = stop_on_nonfinite, last_good, programs
        self.pending = []

    def after_step(self, end: StepEnd) -> None:
        self.pending.append(end.metrics)
        if not due(end.step, self.every, end.last):
            return
        logged = [first_local(m) for m in self.pending]
        self.pending = []
        nonfinite = sum(1 for m in logged if not m["finite"])
        scalars = mean_metrics([{k: v for k, v in m.items() if k not in ("finite", "stop")} for m in logged])
        scalars.update(self.throughput.report(end.step), epoch=end.step / self.steps_per_epoch,
                       skipped_steps=int(np.asarray(end.host_state().skipped)), train_step_programs=self.programs())
        self.writer.write(end.step, scalars)
        self.log(f"step {end.step}/{self.total_steps} (epoch {scalars['epoch']:.2f}) loss {scalars['loss']:.4f} "
                 f"ce {scalars['loss_ce']:.3f} bbox {scalars['loss_bbox']:.3f} giou {scalars['loss_giou']:.3f} "
                 f"class_err {scalars['class_error']:.1f} | grad {scalars['grad_norm']:.3f} lr {scalars['lr']:.2e} | "
                 f"{scalars['steps_per_s']:.2f} steps/s {scalars['examples_per_s']:.1f} img/s | "
                 f"ETA {format_duration(scalars['eta_s'])}")
        if nonfinite and self.stop_on_nonfinite:
            raise FloatingPointError(
                f"non-finite loss or gradient in {nonfinite} of the last {len(logged)} steps (up to step {end.step}); "
                f"stopping. Those updates were not applied; the last good checkpoint is {self.last_good() or '(none yet)'}. "
                "Lower the learning rate, check the data report, or set --config.train.on_nonfinite=skip to skip "
                "such steps.")

    def close(self) -> None:
        self.writer.close()


class SaveCheckpoint(Action):
    """``checkpoints.save(step, host state, meta(step))`` every ``every`` steps and at the run's last
    step (its end, or the agreed stop of a preemption)."""

    def __init__(self, every: int, checkpoints, meta: Callable[[int], dict]):
        self.every, self.checkpoints, self.meta = every, checkpoints, meta

    def after_step(self, end: StepEnd) -> None:
        if due(end.step, self.every, end.last):
            self.checkpoints.save(end.step, end.host_state(), self.meta(end.step))


class Evaluate(Action):
    """``evaluator.run(step, host state, epoch)`` every ``every`` steps and, with ``at_end``, at the
    planned end (not at an early stop: the restarted run evaluates when it gets there)."""

    def __init__(self, every: int, at_end: bool, evaluator, steps_per_epoch: float):
        self.every, self.at_end, self.evaluator, self.steps_per_epoch = every, at_end, evaluator, steps_per_epoch

    def after_step(self, end: StepEnd) -> None:
        if due(end.step, self.every, end.last and not end.stopping, self.at_end):
            self.evaluator.run(end.step, end.host_state(), end.step / self.steps_per_epoch)

    def close(self) -> None:
        self.evaluator.close()


class Profile(Action):
    """A ``perf.StepTrace`` as an action: starts before its first step, stops after its last."""

    def __init__(self, trace):
        self.trace = trace

    def before_step(self, step: int) -> None:
        self.trace.before(step)

    def after_step(self, end: StepEnd) -> None:
        self.trace.after(end.step - 1, end.metrics)

    def close(self) -> None:
        self.trace.close()


class Preemption:
    """SIGTERM or SIGINT (Ctrl-C) on any host stops every host after the same step, which then saves
    and exits 0. A second SIGINT on a host raises ``KeyboardInterrupt`` there at once (no save).

    The handler only records the signal. Each step takes ``flag()`` as an input and sums it over
    every device of every host into its ``stop`` metric (a scalar riding on the step's own
    all-reduce: no collective of its own). After dispatching step k the loop asks ``agreed(metrics
    of step k - 1)``: every host reads the same sum, so every host ends after step k.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None  # the name of the first signal this host got
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: exiting without saving")
        self.received = self.received or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def cause(self) -> str:
        """What stopped the run, as seen from this host."""
        return self.received or "a signal on another host"

    def flag(self) -> np.ndarray:
        """The step input: int32 1 once this host got the signal, else 0."""
        return np.int32(self.requested)

    @staticmethod
    def agreed(metrics) -> bool:
        """Whether any host had the signal when it ran the step of ``metrics`` (its ``stop``)."""
        return bool(first_local(metrics["stop"]) > 0)

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
