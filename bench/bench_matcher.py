"""Matcher cost per training step: host (scipy via pure_callback) vs device (lax Hungarian).

One step matches every decoder layer (6) of every image, as the loss does. Targets per image are
drawn around a mean (COCO averages about 7) and padded to max_boxes = 100.

  python bench/bench_matcher.py                 # batches 2, 16, 64; ~7 and 100 targets
  python bench/bench_matcher.py --batches 2 16 --repeats 5 --json matcher.json
"""
import argparse
from pathlib import Path

import common  # first: puts the repository on sys.path
import jax
import numpy as np

from detr_jax.config import loss_config
from detr_jax.matching import match


def problem(batch, targets_mean, num_queries=100, num_classes=91, max_boxes=100, layers=6, seed=0):
    rng = np.random.RandomState(seed)
    outputs = [{"pred_logits": rng.normal(0, 2, (batch, num_queries, num_classes + 1)).astype(np.float32),
                "pred_boxes": rng.uniform(0.05, 0.95, (batch, num_queries, 4)).astype(np.float32)}
               for _ in range(layers)]
    counts = np.clip(rng.poisson(targets_mean, batch), 0, max_boxes) if targets_mean < max_boxes else np.full(batch, max_boxes)
    valid = np.arange(max_boxes)[None] < counts[:, None]
    targets = {"labels": rng.randint(1, num_classes, (batch, max_boxes)).astype(np.int32),
               "boxes": rng.uniform(0.1, 0.9, (batch, max_boxes, 4)).astype(np.float32), "box_valid": valid}
    return {**outputs[-1], "aux_outputs": outputs[:-1]}, targets, float(counts.mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16, 64], help="images per step")
    parser.add_argument("--targets", type=float, nargs="+", default=[7, 100], help="mean targets per image (100 = all)")
    parser.add_argument("--methods", nargs="+", default=["host", "device"], choices=["host", "device"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    cfg = loss_config()
    env = common.environment()
    print(common.environment_line(env) + "; 100 queries, 6 decoder layers, max_boxes 100")
    print(f"{'batch':>5} {'targets/img':>11} {'method':>7} {'ms/step (median)':>17} {'+-':>7} {'ms/image':>9}")
    rows = []
    for batch in args.batches:
        for mean in args.targets:
            outputs, targets, actual = problem(batch, mean)
            for method in args.methods:
                fn = jax.jit(lambda o, t, m=method: match(o, t, cfg, "softmax", m))
                median, spread, _ = common.time_call(fn, (outputs, targets), args.repeats)
                row = dict(batch=batch, targets_per_image=actual, method=method, ms_per_step=1e3 * median,
                           spread_ms=1e3 * spread)
                rows.append(row)
                print(f"{batch:5d} {actual:11.1f} {method:>7} {1e3 * median:17.2f} {1e3 * spread:7.2f} "
                      f"{1e3 * median / batch:9.2f}", flush=True)
    if args.json:
        common.write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
