"""Wall time of a COCO evaluation of the synthetic val split on this machine.

    python bench/bench_eval.py [--config configs/synthetic.py] [--batch_sizes 8] [--num_val 128] [--json FILE]

The model and data sizes are the config's (default: the CPU demo, configs/synthetic.py), with random
weights (so AP is ~0: this measures time, not accuracy). Each batch size is evaluated twice with
``detr_jax.evaluation.evaluate``: a cold pass (compiling the forward once per canvas shape) and a
warm pass (compiled). Prints one row per pass: wall time, its inference and COCOeval parts,
images/s, and the compilations it added.
"""
import argparse
import os
import tempfile
import time

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp

from detr_jax import build_model
from detr_jax.config import loss_config
from detr_jax.data import load_dataset
from detr_jax.evaluation import evaluate, inference


def measure(model, variables, data_config, source, batch_size: int) -> dict:
    """One evaluate pass -> its timings and the compilations it added."""
    predictor = inference.predictor(model, 0, loss_config=loss_config())  # the one ``evaluate`` uses
    compiled = predictor.traces
    start = time.perf_counter()
    result = evaluate(model, variables, data_config, batch_size=batch_size, source=source, log=None)
    wall = time.perf_counter() - start
    return {"batch_size": batch_size, "wall_s": wall, "inference_s": result["inference_seconds"],
            "cocoeval_s": result["cocoeval_seconds"], "images": result["num_images"],
            "images_per_s": result["num_images"] / wall, "compiles": predictor.traces - compiled,
            "AP": result["AP"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/synthetic.py",
                        help="config file with config.model and config.data")
    parser.add_argument("--variant", default="", help="config variant")
    parser.add_argument("--batch_sizes", default="8", help="comma-separated global eval batch sizes")
    parser.add_argument("--num_val", type=int, default=128, help="synthetic val images")
    parser.add_argument("--data_dir", default=None,
                        help="where the synthetic dataset is generated (default: temporary)")
    parser.add_argument("--json", default=None, help="also write the rows to this json file")
    args = parser.parse_args(argv)
    config = common.load_config(args.config, args.variant)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        config.data.update(source="synthetic", data_dir=args.data_dir or os.path.join(tmp, "synthetic"),
                           synthetic_num_val=args.num_val)
        source = load_dataset(config.data, "val")
        model = build_model(config.model)
        variables = common.init_variables(model, config.model)
        env = common.environment()
        print(f"{common.environment_line(env)}; {source.info.num_images} val images; "
              f"config {args.config}{':' + args.variant if args.variant else ''}")
        print(f"{'batch':>5} {'pass':<5} {'wall s':>7} {'infer s':>8} {'cocoeval s':>10} {'img/s':>7} {'compiles':>8}")
        rows = []
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for name in ("cold", "warm"):
                row = {"pass": name, **measure(model, variables, config.data, source, batch_size)}
                rows.append(row)
                print(f"{batch_size:>5} {name:<5} {row['wall_s']:>7.2f} {row['inference_s']:>8.2f} "
                      f"{row['cocoeval_s']:>10.2f} {row['images_per_s']:>7.1f} {row['compiles']:>8}")
    if args.json:
        common.write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
