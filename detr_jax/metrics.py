"""Training and evaluation metrics: console lines with rate and ETA, TensorBoard, a json history.

Only process 0 writes. The history (``WORKDIR/history/train.jsonl``, one json object per logged
step) is what convergence-study plots read; TensorBoard event files go to ``WORKDIR/tensorboard``.
"""
import json
import time
from pathlib import Path

import jax
import numpy as np


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Scalars to TensorBoard and to ``history/<name>.jsonl``; a no-op on processes other than 0."""

    def __init__(self, workdir, name: str = "train"):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        import tensorflow as tf  # TensorBoard event files; imported only where logs are written

        workdir = Path(workdir)
        (workdir / "history").mkdir(parents=True, exist_ok=True)
        self._history = open(workdir / "history" / f"{name}.jsonl", "a", buffering=1)
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard" / name))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._history.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        with self._writer.as_default():
            for key, value in values.items():
                self._tf.summary.scalar(key, value, step=int(step))
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._history.close()
            self._writer.close()


class Throughput:
    """Steps/s, examples/s and ETA over the interval since the last report."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int):
        self.total, self.batch = total_steps, batch_size
        self.last_step, self.last_time = start_step, time.perf_counter()

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return {"steps_per_s": rate, "examples_per_s": rate * self.batch,
                "eta_s": (self.total - step) / rate if rate > 0 else float("inf")}


def mean_metrics(history: list[dict]) -> dict:
    """Average a list of per-step metric dicts (host numpy scalars)."""
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}

