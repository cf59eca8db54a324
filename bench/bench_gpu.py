"""The GPU benchmark in one run: inference latency, train throughput, the matcher's share, compile times.

Made to run as is on one lent GPU (a few minutes, compiles included), with nothing but jax, flax,
optax, numpy, scipy and ml_collections (no tensorflow, no dataset, no network):

- inference: DETR-R50, batch 1, 800x1333, float32 and bfloat16, xla and fused attention:
  compile seconds, ms per image, GFLOP/s;
- training at the official recipe (``configs/detr_coco.py:r50``: AdamW, clip 0.1, aux loss, the
  host matcher, frozen stem and layer1), batch 8 per device, 800x1088 (a typical padded COCO
  batch), float32 and bfloat16: compile seconds, s per step, images/s per device;
- the matcher's share of that step: the same matching (all 6 decoder layers of one device's batch)
  timed alone, on the host (scipy) and on the device (``loss.matcher = "device"``).

It prints a markdown table and writes it to ``--out``. ``--dry_run`` runs the same code with a tiny
model and tiny images, on any machine (the test suite runs it on CPU).

  python bench/bench_gpu.py --out=$OUT/gpu.md        # on the GPU, about 4 minutes
  python bench/bench_gpu.py --dry_run --out=/tmp/gpu.md
"""
import argparse
import copy
import time
from pathlib import Path

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp

import bench_inference
import bench_train

ANCHORS = ("Anchors: official DETR about 8.5 img/s per V100 (float32); FlagPerf about 22 img/s per A100 (float32); "
           "MasterSkepticista's JAX DETR about 24 img/s per A6000 (bfloat16); inference 36 ms on a V100 (paper).")
FULL = dict(inference_size="800x1333", train_size="800x1088", train_batch_per_device=8, inference_repeats=20,
            train_repeats=5, inference=[("float32", "xla"), ("float32", "fused"), ("bfloat16", "xla"),
                                        ("bfloat16", "fused")], train=["float32", "bfloat16"])
# Every code path once (bfloat16 and fused attention, the default path being the same code with
# other arguments), in well under a minute on 2 CPU cores.
DRY_RUN = dict(inference_size="64x96", train_size="64x96", train_batch_per_device=1, inference_repeats=1,
               train_repeats=1, inference=[("bfloat16", "fused")], train=["bfloat16"])
# A model small enough to compile in seconds on a CPU, with every part of the real one.
TINY_MODEL = dict(backbone="resnet_tiny", backbone_norm="group_norm", frozen_stages=-1, hidden_dim=32, num_heads=2,
                  ffn_dim=64, num_encoder_layers=1, num_decoder_layers=2, num_queries=10)


def recipe_config(dtype: str, attention: str, dry_run: bool):
    """configs/detr_coco.py:r50 with ``dtype`` and ``attention`` (the tiny model with ``dry_run``)."""
    config = common.load_config("configs/detr_coco.py", "r50")
    config.model.update(dtype=dtype, attention=attention, **(TINY_MODEL if dry_run else {}))
    if dry_run:  # the device matcher needs as many queries as padded targets
        config.data.max_boxes = config.model.num_queries
    return config


def inference_row(dtype: str, attention: str, sizes: dict, dry_run: bool) -> dict:
    """Batch-1 forward pass: compile seconds, ms per image, GFLOP/s."""
    config = recipe_config(dtype, attention, dry_run)
    model = bench_train.build_model(config.model)
    variables = common.init_variables(model, config.model)
    result = bench_inference.measure(model, variables, 1, common.parse_size(sizes["inference_size"]),
                                     sizes["inference_repeats"])
    return {"dtype": dtype, "attention": attention, "compile_s": result["compile_s"], "ms": result["ms_per_image"],
            "tflops": result["tflops_per_s"], "mib": result["device_peak_mib"] or result["program_mib"]}


def train_row(dtype: str, sizes: dict, dry_run: bool) -> dict:
    """The official-recipe train step at ``train_batch_per_device`` per device, and the share of it the
    host and the device matcher take."""
    config = recipe_config(dtype, "xla", dry_run)
    devices = jax.local_device_count()
    batch = sizes["train_batch_per_device"] * devices
    result = bench_train.measure(config, batch, common.parse_size(sizes["train_size"]), sizes["train_repeats"])
    device_config = copy.deepcopy(config)
    device_config.loss.matcher = "device"
    device_match_s = bench_train.matching_seconds(device_config, batch // devices, sizes["train_repeats"])
    return {"dtype": dtype, "batch": batch, "compile_s": result["compile_s"], "s_per_step": result["s_per_step"],
            "images_per_s_per_device": result["images_per_s_per_device"], "host_match": result["matching_share"],
            "device_match": device_match_s / result["s_per_step"], "mib": result["device_peak_mib"] or result["program_mib"]}


def markdown(env: dict, sizes: dict, inference: list, train: list, wall_s: float, dry_run: bool) -> str:
    """The results as markdown: the environment, an inference table and a train table."""
    lines = [f"GPU benchmark{' (dry run: tiny model and images)' if dry_run else ''}: {common.environment_line(env)}; "
             f"{wall_s:.0f} s in all", "",
             f"Inference, DETR-R50, batch 1, {sizes['inference_size']}:", "",
             "| dtype | attention | compile s | ms / image | TFLOP/s | MiB |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['attention']} | {r['compile_s']:.1f} | {r['ms']:.1f} | {r['tflops']:.2f} | "
              f"{r['mib']:.0f} |" for r in inference]
    lines += ["", f"Train step at the official recipe, {sizes['train_size']}, {sizes['train_batch_per_device']} "
              "images per device (host matcher; the matcher's share: the same matching timed alone):", "",
              "| dtype | global batch | compile s | s / step | images/s per device | host matcher share | "
              "device matcher share | MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['compile_s']:.1f} | {r['s_per_step']:.3f} | "
              f"{r['images_per_s_per_device']:.2f} | {r['host_match']:.1%} | {r['device_match']:.1%} | {r['mib']:.0f} |"
              for r in train]
    return "\n".join(lines + ["", ANCHORS, ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--dry_run", action="store_true", help="tiny model and sizes, fewer rows, any machine")
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else FULL
    start = time.perf_counter()
    env = common.environment()
    print(common.environment_line(env), flush=True)
    inference = []
    for dtype, attention in sizes["inference"]:
        inference.append(inference_row(dtype, attention, sizes, args.dry_run))
        print("inference", inference[-1], flush=True)
    train = []
    for dtype in sizes["train"]:
        train.append(train_row(dtype, sizes, args.dry_run))
        print("train", train[-1], flush=True)
    text = markdown(env, sizes, inference, train, time.perf_counter() - start, args.dry_run)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
