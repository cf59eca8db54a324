"""Speed tooling: the persistent compilation cache, compile accounting, XLA cost and memory
analysis of compiled programs, and profiler traces.

  enable_compilation_cache(dir)       compiled programs persist across runs (jax's disk cache)
  with CompileWatch() as watch: ...   every program built in the block (compiled, or loaded from the
                                      persistent cache): count and seconds per program name
  TraceCounter(fn)                    fn, counting its traces (under jit/pmap: programs built for it)
  program_stats(compiled)             FLOPs, bytes accessed and memory of a compiled program
  peak_device_memory(device)          the allocator's peak where the platform reports it (GPU, TPU)
  StepTrace(dir, first, count)        a profiler trace of steps first..first+count-1, TensorBoard-readable
"""
import collections
import dataclasses
import functools
from pathlib import Path

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # a program built, cached or not
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def enable_compilation_cache(directory) -> None:
    """Keep compiled programs in ``directory`` (created if missing) and reuse them in later runs
    with the same program, jax version and device. Programs compiling in under a second are not
    stored (jax's default threshold). Takes effect even after earlier compilations in this process."""
    from jax.experimental.compilation_cache import compilation_cache

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()  # jax decides whether to use the cache once, at the first compile


class CompileWatch:
    """Counts the XLA programs built (and the seconds it took) per program name while active.

    ``counts["jit(f)"]``: programs built for ``jax.jit(f)``, whether compiled or loaded from the
    persistent compilation cache (``jax.pmap`` names its programs ``jit(_fun)``: use TraceCounter
    for one function); ``cache_hits``: how many of all programs were loaded from that cache.
    """

    def __init__(self):
        self.counts = collections.Counter()
        self.seconds = collections.Counter()
        self.cache_hits = 0

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            name = str(kwargs.get("fun_name", "?"))
            self.counts[name] += 1
            self.seconds[name] += duration

    def _on_event(self, event: str, **kwargs) -> None:
        self.cache_hits += event == CACHE_HIT_EVENT

    def start(self) -> "CompileWatch":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def stop(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def __enter__(self) -> "CompileWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def total(self) -> tuple[int, float]:
        """(compilations, seconds) over every function."""
        return sum(self.counts.values()), sum(self.seconds.values())


class TraceCounter:
    """``fn`` that counts how often it is traced: under ``jax.jit`` or ``jax.pmap``, once per
    program built for it (a new input shape or dtype), never per call."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.fn, self.traces = fn, 0

    def __call__(self, *args, **kwargs):
        self.traces += 1  # a Python side effect: runs only while tracing
        return self.fn(*args, **kwargs)


@dataclasses.dataclass
class ProgramStats:
    flops: float  # XLA cost analysis of the whole program (all its images), 0 where not reported
    bytes_accessed: float
    argument_bytes: int  # buffers of the compiled program, per device
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments' buffers
    temp_bytes: int  # scratch the program allocates while it runs

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs (less those in donated buffers) + scratch: the memory the program
        needs on one device while it runs."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def program_stats(compiled) -> ProgramStats:
    """Cost and memory analysis of ``jax.jit(f).lower(...).compile()`` (per device)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    memory = compiled.memory_analysis()
    size = lambda name: int(getattr(memory, name, 0) or 0) if memory is not None else 0
    return ProgramStats(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                        argument_bytes=size("argument_size_in_bytes"), output_bytes=size("output_size_in_bytes"),
                        alias_bytes=size("alias_size_in_bytes"), temp_bytes=size("temp_size_in_bytes"))


def peak_device_memory(device) -> int | None:
    """Peak bytes the device's allocator has held (GPU, TPU); None where it is not reported (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class StepTrace:
    """A jax profiler trace of ``count`` steps starting at step ``first``, written under
    ``directory`` (``plugins/profile/RUN/*.xplane.pb``: TensorBoard's profile tab with
    ``--logdir=directory``). Call ``before(step)`` before running a step and ``after(step, outputs)``
    once it is dispatched; the trace stops when the last traced step's outputs are ready."""

    def __init__(self, directory, first: int, count: int):
        self.directory, self.first, self.last = str(directory), first, first + count - 1
        self.active = False

    def before(self, step: int) -> None:
        if self.first <= step <= self.last and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        """Stop a trace still running (the run ended inside the traced steps)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
