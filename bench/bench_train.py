"""Train-step throughput of DETR at the official recipe, matcher and loss included, on this machine.

The step is the one train.py runs (``detr_jax.training.make_train_step`` under ``jax.pmap`` over the
local devices, state donated): forward, Hungarian matching of all 6 decoder layers, the loss with
auxiliary terms, backward (none through the frozen stem and layer1), psum, AdamW with clipping.
Random weights and images, about 7 target boxes per image (COCO's mean) padded to 100.

One row per model x image size x global batch x dtype x attention x remat x matcher: compile
seconds, seconds per step (median and spread of the timed steps after one warm-up), images/s (all
devices and per device), GFLOPs per image of the compiled step (XLA cost analysis), the FLOP rate
reached per device, the matcher's share of the step (the same matching, timed alone on one
device's batch), and memory per device (XLA's memory analysis; GPU/TPU: the allocator's peak so far).

  python bench/bench_train.py                              # R50, 800x1088 and 512x512, batch 4 per device
  python bench/bench_train.py --quick                      # CPU: R50, batch 2, 512x512, float32
  python bench/bench_train.py --sizes 800x1088 --batches 64 --dtypes bfloat16 --attention fused \\
      --remat none transformer all --json train.json      # one H100
"""
import argparse
import itertools
import time

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import bench_matcher
from detr_jax import build_model, perf
from detr_jax.matching import match
from detr_jax.optim import make_optimizer
from detr_jax.training import AXIS, TrainState, make_train_step, replicate_on_devices, shard

QUICK = dict(models=["r50"], sizes=["512x512"], batches=[2], dtypes=["float32"], attention=["xla"],
             remat=["none"], matchers=["host"], repeats=3)


def make_batch(batch: int, size: tuple[int, int], max_boxes: int, num_classes: int, seed: int = 0) -> dict:
    """Random ImageNet-normalised images without padding and about 7 boxes per image."""
    rng = np.random.RandomState(seed)
    counts = np.clip(rng.poisson(7, batch), 1, max_boxes)
    centers, extents = rng.uniform(0.2, 0.8, (batch, max_boxes, 2)), rng.uniform(0.05, 0.3, (batch, max_boxes, 2))
    return {"image": rng.standard_normal((batch, *size, 3)).astype(np.float32),
            "padding_mask": np.zeros((batch, *size), bool),
            "labels": rng.randint(1, num_classes, (batch, max_boxes)).astype(np.int32),
            "boxes": np.concatenate([centers, extents], -1).astype(np.float32),
            "box_valid": np.arange(max_boxes)[None] < counts[:, None]}


def matching_seconds(config, device_batch: int, repeats: int) -> float:
    """Median seconds of one step's matching (every decoder layer) of one device's batch."""
    outputs, targets, _ = bench_matcher.problem(device_batch, 7, num_queries=config.model.num_queries,
                                                num_classes=config.model.num_classes,
                                                max_boxes=config.data.max_boxes,
                                                layers=config.model.num_decoder_layers)
    fn = jax.jit(lambda o, t: match(o, t, config.loss))
    return common.time_call(fn, (outputs, targets), repeats)[0]


def measure(config, batch: int, size: tuple[int, int], repeats: int) -> dict:
    devices = jax.local_device_count()
    if batch % devices:
        raise ValueError(f"--batches {batch}: must be a multiple of the {devices} local devices")
    model = build_model(config.model)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    params = variables["params"]
    tx, schedule = make_optimizer(config.optim, params, config.model, 1000.0, 100_000)
    state = TrainState(step=np.int32(0), params=params, buffers=variables.get("buffers", {}),
                       opt_state=jax.jit(tx.init)(params), skipped=np.int32(0))
    state = replicate_on_devices(jax.device_get(state), devices)
    p_step = jax.pmap(make_train_step(model, tx, schedule, config.loss, config.model), axis_name=AXIS,
                      in_axes=(0, 0, None), donate_argnums=(0,))
    batch_data = shard(make_batch(batch, size, config.data.max_boxes, config.model.num_classes), devices)
    rng = jax.random.PRNGKey(1)
    start = time.perf_counter()
    compiled = p_step.lower(state, batch_data, rng).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], batch_data, rng)
        return metrics

    median, spread, _ = common.time_call(step, (), repeats)
    stats = perf.program_stats(compiled)
    device_batch = batch // devices
    match_s = matching_seconds(config, device_batch, repeats)
    peak = perf.peak_device_memory(jax.local_devices()[0])
    return {"compile_s": compile_s, "s_per_step": median, "spread_s": spread, "images_per_s": batch / median,
            "images_per_s_per_device": batch / median / devices, "gflops_per_image": stats.flops / device_batch / 1e9,
            "tflops_per_s_per_device": stats.flops / median / 1e12, "matching_share": match_s / median,
            "program_mib": stats.peak_bytes / 2**20, "device_peak_mib": peak / 2**20 if peak is not None else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["r50"], help="configs/detr_coco.py variants")
    parser.add_argument("--sizes", nargs="+", default=["800x1088", "512x512"], help="image sizes HxW")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="global batch sizes (default: 4 per device, as official)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--attention", nargs="+", default=["xla"], choices=["xla", "fused"])
    parser.add_argument("--remat", nargs="+", default=["none"], choices=["none", "transformer", "backbone", "all"])
    parser.add_argument("--matchers", nargs="+", default=["host"], choices=["host", "device"])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps after one warm-up")
    parser.add_argument("--quick", action="store_true", help=f"a few minutes on a CPU: {QUICK}")
    parser.add_argument("--json", help="also write the rows to this json file")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    batches = args.batches or [4 * jax.local_device_count()]

    env = common.environment()
    print(common.environment_line(env) + "; AdamW, clip 0.1, aux loss, ~7 boxes per image padded to 100")
    table = common.Table([("model", "model", "<8"), ("size", "size", ">9"), ("batch", "batch", "5d"),
                          ("dtype", "dtype", ">8"), ("attn", "attention", ">5"), ("remat", "remat", ">11"),
                          ("match", "matcher", ">6"), ("compile s", "compile_s", "9.1f"), ("s/step", "s_per_step", "7.3f"),
                          ("+-", "spread_s", "6.3f"), ("img/s", "images_per_s", "7.2f"),
                          ("/device", "images_per_s_per_device", "7.2f"), ("GFLOP/img", "gflops_per_image", "9.1f"),
                          ("TFLOP/s", "tflops_per_s_per_device", "7.3f"), ("match", "matching_share", "6.1%"),
                          ("prog MiB", "program_mib", "8.0f"), ("peak MiB", "device_peak_mib", "8.0f")])
    print(table.header())
    rows = []
    for name, size, batch, dtype, attention, remat, matcher in itertools.product(
            args.models, args.sizes, batches, args.dtypes, args.attention, args.remat, args.matchers):
        config = common.load_config("configs/detr_coco.py", name)
        config.model.update(dtype=dtype, attention=attention, remat=remat)
        config.loss.matcher = matcher
        rows.append({"model": name, "size": size, "batch": batch, "dtype": dtype, "attention": attention,
                     "remat": remat, "matcher": matcher, **measure(config, batch, common.parse_size(size), args.repeats)})
        print(table.line(rows[-1]), flush=True)
    if args.json:
        common.write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
