"""Inference latency and throughput of DETR (forward pass, random weights) on this machine.

One row per decoder x model x image size x batch x dtype x attention x padding: compile seconds, milliseconds per batch
(median and spread of the timed runs after one warm-up), per image, images/s, GFLOPs per image
from XLA's cost analysis of the compiled program (2 per multiply-add), the FLOP rate reached, and
memory (the program's arguments + outputs + scratch from XLA's memory analysis, per device; on
GPU/TPU also the allocator's peak so far in the process, so rows are best run from small to large).

  python bench/bench_inference.py                         # full matrix (for a GPU)
  python bench/bench_inference.py --quick                 # CPU: R50, batch 1, 512x512 and 800x1066
  python bench/bench_inference.py --models r50 --sizes 800x1333 --batches 1 8 \\
      --dtypes bfloat16 --attention fused --json inference.json
  python bench/bench_inference.py --models r50 --sizes 800x1066 --batches 1 --dtypes float32 \\
      --attention xla --padding exact official   # the cost of config.model.padding = "exact"
  python bench/bench_inference.py --models r50 --sizes 800x1066 --batches 1 --dtypes float32 \
      --attention xla --decoders detr conditional dab deformable   # each decoder with its paper's COCO recipe
  python bench/bench_inference.py --models r50 --sizes 800x1066 --batches 1 --dtypes float32 \
      --attention xla --padding official --decoders detr detr_panoptic   # the mask head's cost on top of DETR
"""
import argparse
import itertools
import time

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import build_model, perf
from detr_jax.config import PADDINGS

QUICK = dict(models=["r50"], sizes=["512x512", "800x1066"], batches=[1], dtypes=["float32", "bfloat16"],
             attention=["xla"], repeats=3)


def measure(model, variables, batch: int, size: tuple[int, int], repeats: int) -> dict:
    """Compile and time ``model.apply`` on a batch of ``size`` images (no padding)."""
    images = jnp.asarray(np.random.RandomState(0).standard_normal((batch, *size, 3)), jnp.float32)
    mask = jnp.zeros((batch, *size), bool)
    start = time.perf_counter()
    compiled = jax.jit(model.apply).lower(variables, images, mask).compile()
    compile_s = time.perf_counter() - start
    median, spread, _ = common.time_call(compiled, (variables, images, mask), repeats)
    stats = perf.program_stats(compiled)
    device_peak = perf.peak_device_memory(jax.devices()[0])
    return {"compile_s": compile_s, "ms_per_batch": 1e3 * median, "spread_ms": 1e3 * spread,
            "ms_per_image": 1e3 * median / batch, "images_per_s": batch / median,
            "gflops_per_image": stats.flops / batch / 1e9, "tflops_per_s": stats.flops / median / 1e12,
            "program_mib": stats.peak_bytes / 2**20,
            "device_peak_mib": device_peak / 2**20 if device_peak is not None else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["r50", "r50_dc5", "r101"],
                        help="configs/detr_coco.py variants")
    parser.add_argument("--sizes", nargs="+", default=["800x1333", "512x512"], help="image sizes HxW")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--attention", nargs="+", default=["xla", "fused"], choices=["xla", "fused"])
    parser.add_argument("--padding", nargs="+", default=["exact"], choices=PADDINGS, help="config.model.padding")
    parser.add_argument("--conv_impl", nargs="+", default=["auto"], choices=["auto", "xla", "gemm"],
                        help="config.model.conv_impl")
    parser.add_argument("--decoders", nargs="+", default=["detr"], choices=list(common.DECODER_CONFIGS),
                        help="config.model.decoder, each with its paper's COCO recipe (configs/DECODER_coco.py)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs after one warm-up")
    parser.add_argument("--quick", action="store_true", help=f"a few minutes on a CPU: {QUICK}")
    parser.add_argument("--json", help="also write the rows to this json file")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)

    env = common.environment()
    print(common.environment_line(env))
    table = common.Table([("decoder", "decoder", "<20"), ("model", "model", "<8"), ("size", "size", ">9"),
                          ("batch", "batch", "5d"),
                          ("dtype", "dtype", ">8"), ("attn", "attention", ">5"), ("padding", "padding", ">8"),
                          ("conv", "conv_impl", ">5"),
                          ("compile s", "compile_s", "9.1f"),
                          ("ms/batch", "ms_per_batch", "9.1f"), ("+-", "spread_ms", "6.1f"),
                          ("ms/img", "ms_per_image", "8.1f"), ("img/s", "images_per_s", "7.2f"),
                          ("GFLOP/img", "gflops_per_image", "9.1f"), ("TFLOP/s", "tflops_per_s", "7.3f"),
                          ("prog MiB", "program_mib", "8.0f"), ("peak MiB", "device_peak_mib", "8.0f")])
    print(table.header())
    rows = []
    for decoder, name, dtype, attention, padding, conv_impl in itertools.product(
            args.decoders, args.models, args.dtypes, args.attention, args.padding, args.conv_impl):
        config = common.decoder_config(decoder, name)
        config.model.update(dtype=dtype, attention=attention, padding=padding, conv_impl=conv_impl)
        model = build_model(config.model)
        variables = common.init_variables(model, config.model)
        for size, batch in itertools.product(args.sizes, args.batches):
            rows.append({"decoder": decoder, "model": name, "size": size, "batch": batch, "dtype": dtype,
                         "attention": attention,
                         "padding": padding, "conv_impl": conv_impl,
                         **measure(model, variables, batch, common.parse_size(size), args.repeats)})
            print(table.line(rows[-1]), flush=True)
    if args.json:
        common.write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
