"""Throughput of the input pipeline on this machine: images per second, train and eval.

    python bench/bench_pipeline.py [--batches 40] [--batch_size 8] [--workdir DIR]

Two settings, each on a synthetic COCO-format dataset generated for it (JPEG and PNG files):
  official  the official COCO recipe (multi-scale 480..800 / 1333, crop 384..600, eval 800 / 1333)
            on images of 480..640 px per side, as COCO's;
  demo      CPU demo sizes (multi-scale 128..192 / 320, crop 96..144, eval 160 / 320) on images of
            128..256 px, as the synthetic dataset's.
Prints one row per setting and split: images/s after a warm-up batch, the buckets and the share of
canvas pixels that is padding in the timed batches.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from detr_jax.config import data_config  # noqa: E402
from detr_jax.data import eval_batches, train_batches  # noqa: E402
from detr_jax.data.synthetic import Spec, generate  # noqa: E402

DEMO_SIZES = dict(train_scales=(128, 144, 160, 176, 192), train_max_size=320, crop_resize_scales=(96, 120, 144),
                  crop_min_size=96, crop_max_size=144, eval_size=160, eval_max_size=320)
SETTINGS = {"official": ({}, (480, 640)), "demo": (DEMO_SIZES, (128, 256))}


def measure(batches, count: int):
    """(images/s over `count` batches after one warm-up batch, padding share of their canvases)."""
    next(batches)
    start, images, padding, canvas = time.perf_counter(), 0, 0, 0
    for batch in (next(batches) for _ in range(count)):
        images += int(batch["example_valid"].sum())
        padding += int(batch["padding_mask"].sum())
        canvas += batch["padding_mask"].size
    return images / (time.perf_counter() - start), padding / canvas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per row")
    parser.add_argument("--batch_size", type=int, default=8, help="per-host batch size")
    parser.add_argument("--workdir", default=None,
                        help="where the datasets are generated and kept (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as workdir:
            run(args, workdir)
    else:
        run(args, args.workdir)


def run(args, workdir: str):
    print(f"{os.cpu_count()} CPU cores; batch size {args.batch_size}; {args.batches} timed batches per row")
    print(f"{'setting':<9} {'split':<5} {'images/s':>9} {'padding':>8}  buckets")
    for name, (sizes, (lo, hi)) in SETTINGS.items():
        root, count = os.path.join(workdir, name), args.batch_size * (args.batches + 1)
        if not os.path.exists(root):
            generate(root, Spec(num_train=2 * count, num_val=count, seed=0, min_size=lo, max_size=hi))
        cfg = data_config(source="synthetic", data_dir=root, synthetic_num_train=2 * count, synthetic_num_val=count,
                          synthetic_seed=0, **sizes)
        for split in ("train", "val"):
            batches = (train_batches(cfg, args.batch_size, seed=0, process_index=0, process_count=1) if split == "train"
                       else eval_batches(cfg, args.batch_size, process_index=0, process_count=1))
            rate, padding = measure(batches, min(args.batches, batches.num_batches - 1))
            shapes = " ".join(f"{h}x{w}" for h, w in np.asarray(batches.buckets).tolist())
            print(f"{name:<9} {split:<5} {rate:>9.1f} {padding:>7.0%}  {shapes}", flush=True)


if __name__ == "__main__":
    main()
