"""What the benchmark scripts share: the environment line, timing after warm-up, configs, json.

  env = environment()                    device, versions, cores, XLA_FLAGS (printed and saved)
  median, spread, times = time_call(fn, args, repeats)
  times_a, times_b = time_alternating([fn_a, fn_b], repeats)   turns alternate: same load for both
  table = Table([("model", "model", "<8"), ("ms", "ms_per_batch", "9.1f"), ...])
  print(table.header()); print(table.line(row))   fixed-width columns; None prints "-"
  write_json(path, env, rows)            {"environment": env, "rows": rows}
"""
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402


def environment() -> dict:
    """The machine and software a measurement was taken on."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
            "cpu_cores": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def environment_line(env: dict) -> str:
    return (f"device: {env['devices']} x {env['device']} ({env['platform']}), {env['cpu_cores']} CPU cores; "
            f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, python {env['python']}"
            + (f"; XLA_FLAGS={env['xla_flags']}" if env["xla_flags"] else ""))


def time_call(fn, args, repeats: int, warmup: int = 1):
    """(median seconds, spread = (max - min) / 2, all times) of ``fn(*args)`` over ``repeats`` runs
    after ``warmup`` untimed ones, each waited for with ``jax.block_until_ready``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times)) / 2, times


def time_alternating(fns, repeats: int, warmup: int = 1):
    """Seconds of each of ``fns`` (callables without arguments, each waited for with
    ``jax.block_until_ready``), run in turn ``repeats`` times after ``warmup`` untimed turns, so that
    a changing load on the machine reaches them alike: a list of ``repeats`` times per function."""
    times = [[] for _ in fns]
    for turn in range(warmup + repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if turn >= warmup:
                fn_times.append(time.perf_counter() - start)
    return times


# --decoders: each decoder's COCO recipe, (config file, prefix of its variant before the model name)
DECODER_CONFIGS = {"detr": ("configs/detr_coco.py", ""), "conditional": ("configs/conditional_coco.py", ""),
                   "dab": ("configs/dab_coco.py", ""), "deformable": ("configs/deformable_coco.py", "deformable_"),
                   "deformable_refine": ("configs/deformable_coco.py", "refine_"),
                   "deformable_two_stage": ("configs/deformable_coco.py", "two_stage_"),
                   # DETR with the panoptic mask head (250 classes, pred_masks of the 100 queries at stride 4)
                   "detr_panoptic": ("configs/detr_panoptic_coco.py", "")}


def decoder_config(decoder: str, model: str):
    """``decoder``'s COCO config (DECODER_CONFIGS) for ``model`` (r50, r101, ...)."""
    path, prefix = DECODER_CONFIGS[decoder]
    return load_config(path, prefix + model)


def init_variables(model, model_config):
    """Random variables of ``model`` (``detr_jax.models.detr.init_inputs``)."""
    from detr_jax.models.detr import init_inputs

    return jax.jit(model.init)(jax.random.PRNGKey(0), *init_inputs(model_config))


def load_config(path: str, variant: str = ""):
    """``get_config(variant)`` of a config file (relative paths from the repository root)."""
    path = Path(path) if Path(path).is_absolute() or Path(path).exists() else REPO / path
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def parse_size(text: str) -> tuple[int, int]:
    """'800x1333' -> (800, 1333)."""
    h, _, w = text.partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise ValueError(f"image size {text!r}: expected HxW, e.g. 800x1333")
    return int(h), int(w)


class Table:
    """Fixed-width text table: columns are (header, row key, format spec such as "9.1f" or "<8")."""

    def __init__(self, columns):
        self.columns = columns

    @staticmethod
    def _width(spec: str) -> int:
        digits = spec.lstrip("<>").split(".")[0].rstrip("dfs%")
        return int(digits) if digits else 0

    def header(self) -> str:
        return " ".join(f"{title:<{self._width(spec)}}" if spec.startswith("<") else f"{title:>{self._width(spec)}}"
                        for title, _, spec in self.columns)

    def line(self, row: dict) -> str:
        return " ".join(f"{'-':>{self._width(spec)}}" if row[key] is None else f"{row[key]:{spec}}"
                        for _, key, spec in self.columns)


def write_json(path, env: dict, rows: list) -> None:
    Path(path).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
