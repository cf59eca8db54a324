"""Compilation over a training epoch of the real pipeline: programs built and seconds spent.

Runs ``train.py``'s loop (``detr_jax.training.train_and_evaluate``) for one epoch on the synthetic
dataset and counts, with jax.monitoring, every XLA program built (compiled or loaded from the
persistent cache) and the seconds it took. The train step should be built once per shape bucket
the epoch used, never more. With --cache_dir the epoch runs twice: cold, then with the programs
of the first run in the persistent compilation cache (programs holding a host callback, such as
the scipy matcher's, are never cached: use --matcher device to cache the train step).

  python bench/bench_compile.py                                     # the CPU demo (configs/synthetic.py)
  python bench/bench_compile.py --cache_dir /tmp/jax-cache --matcher device
  python bench/bench_compile.py --config configs/detr_coco.py --variant r50 --batch_size 4   # a GPU
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # first: puts the repository on sys.path

from detr_jax import perf
from detr_jax.data import bucket_list


def run_epoch(config, workdir: Path) -> dict:
    from detr_jax.training import train_and_evaluate

    start = time.perf_counter()
    with perf.CompileWatch() as watch:
        train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    history = [json.loads(line) for line in (workdir / "history" / "train.jsonl").read_text().splitlines()]
    programs, seconds = watch.total()
    slowest = sorted(watch.seconds.items(), key=lambda kv: -kv[1])[:3]
    return {"steps": int(history[-1]["step"]), "train_step_programs": int(history[-1]["train_step_programs"]),
            "programs": programs, "cache_hits": watch.cache_hits, "compile_s": seconds, "epoch_s": wall,
            "slowest": [(name, round(s, 2)) for name, s in slowest]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/synthetic.py", help="config file")
    parser.add_argument("--variant", default="", help="config variant")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--num_train", type=int, default=0, help="synthetic training images (default: the config's)")
    parser.add_argument("--matcher", choices=["host", "device"], default=None, help="default: the config's")
    parser.add_argument("--cache_dir", default="", help="persistent compilation cache: run the epoch cold and warm")
    parser.add_argument("--workdir", default=None, help="where the dataset and runs go (default: temporary)")
    parser.add_argument("--json", help="also write the rows to this json file")
    args = parser.parse_args(argv)

    config = common.load_config(args.config, args.variant)
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as tmp:
        root = Path(args.workdir or tmp)
        data_dir = config.data.data_dir if config.data.source == "synthetic" and config.data.data_dir else root / "data"
        config.data.update(source="synthetic", data_dir=str(data_dir))
        if args.num_train:
            config.data.synthetic_num_train = args.num_train
        if args.batch_size:
            config.train.batch_size = args.batch_size
        if args.matcher:
            config.loss.matcher = args.matcher
        config.train.update(num_steps=0, num_epochs=1.0, eval_every_steps=0, eval_at_end=False,
                            checkpoint_every_steps=10**9, log_every_steps=10**9,
                            compilation_cache_dir=args.cache_dir)
        env = common.environment()
        buckets = len(bucket_list(config.data))
        print(f"{common.environment_line(env)}; config {args.config}{':' + args.variant if args.variant else ''}, "
              f"batch {config.train.batch_size}, {buckets} buckets, matcher {config.loss.matcher}")
        rows = []
        for name in ("cold", "cached") if args.cache_dir else ("cold",):
            row = {"run": name, "buckets": buckets, **run_epoch(config, root / f"run_{name}")}
            rows.append(row)
        print(f"{'run':<6} {'steps':>5} {'buckets':>7} {'step programs':>13} {'programs':>8} {'cache hits':>10} "
              f"{'compile s':>9} {'epoch s':>7}  slowest programs (s)")
        for row in rows:
            print(f"{row['run']:<6} {row['steps']:>5} {row['buckets']:>7} {row['train_step_programs']:>13} "
                  f"{row['programs']:>8} {row['cache_hits']:>10} {row['compile_s']:>9.1f} {row['epoch_s']:>7.1f}  "
                  + ", ".join(f"{n} {s}" for n, s in row["slowest"]))
    if args.json:
        common.write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
