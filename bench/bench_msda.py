"""Multi-scale deformable attention's sampling (``detr_jax.models.deformable``): the "gather" and
"dense" paths side by side, forward and forward + backward, at Deformable DETR's shapes.

One row per problem x path x pass: the problem's queries (the encoder's self-attention has one per
feature cell of the 4 levels; the decoder's cross-attention 300), milliseconds (median and spread
of the timed runs; the two paths' runs alternate, so a changing load reaches both alike), GFLOPs
from XLA's cost analysis (2 per multiply-add) and the program's memory (arguments + outputs +
scratch, XLA's memory analysis). "dense" builds a [queries x cells] matrix per level and head; a
problem whose matrix would pass --max_dense_gib is left out of that path (its row says so).

  python bench/bench_msda.py                          # 800x1066 (the official size), batch 1
  python bench/bench_msda.py --size 512x512 --batch 2 --json msda.json
"""
import argparse
import statistics

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import perf
from detr_jax.models.deformable import MSDA, MSDA_IMPLS

HEADS, LEVELS, POINTS, HEAD_DIM = 8, 4, 4, 32


def level_shapes(size):
    """((h, w) at strides 8, 16, 32, 64) with torch's ceil(n / 2) per stride-2 layer."""
    h, w = size
    out = []
    for stride in (2, 4, 8, 16, 32, 64):
        h, w = -(-h // 2), -(-w // 2)
        if stride >= 8:
            out.append((h, w))
    return tuple(out)


def problem(shapes, batch: int, queries: int, seed: int = 0):
    """Random value [B, N, H, c], locations [B, Q, H, L, P, 2] in [-0.1, 1.1] and softmaxed weights."""
    r = np.random.RandomState(seed)
    n = sum(h * w for h, w in shapes)
    value = jnp.asarray(r.standard_normal((batch, n, HEADS, HEAD_DIM)), jnp.float32)
    locations = jnp.asarray(r.uniform(-0.1, 1.1, (batch, queries, HEADS, LEVELS, POINTS, 2)), jnp.float32)
    weights = jax.nn.softmax(jnp.asarray(r.standard_normal((batch, queries, HEADS, LEVELS * POINTS)), jnp.float32))
    return value, locations, weights.reshape(batch, queries, HEADS, LEVELS, POINTS)


def programs(impl: str, shapes):
    """{"forward": f, "forward+backward": g} of (value, locations, weights)."""
    forward = lambda v, loc, w: MSDA[impl](v, shapes, loc, w)
    cotangent = lambda out: jnp.sin(out)  # a fixed, non-trivial output gradient

    def backward(v, loc, w):
        out, pullback = jax.vjp(forward, v, loc, w)
        return pullback(cotangent(out))

    return {"forward": forward, "forward+backward": backward}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="800x1066", help="image size HxW (the feature levels follow)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decoder_queries", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--max_dense_gib", type=float, default=4.0,
                        help="leave out the dense path where its sampling matrices would pass this")
    parser.add_argument("--json", help="also write the rows to this json file")
    args = parser.parse_args(argv)

    env = common.environment()
    print(common.environment_line(env))
    shapes = level_shapes(common.parse_size(args.size))
    cells = sum(h * w for h, w in shapes)
    print(f"levels {shapes}: {cells} cells; {HEADS} heads x {LEVELS} levels x {POINTS} points, head dim {HEAD_DIM}")
    table = common.Table([("problem", "problem", "<8"), ("queries", "queries", "7d"), ("path", "impl", "<6"),
                          ("pass", "pass", "<16"), ("ms", "ms", "9.1f"), ("+-", "spread_ms", "7.1f"),
                          ("GFLOP", "gflops", "7.2f"), ("prog MiB", "program_mib", "8.0f"), ("note", "note", "<1")])
    print(table.header())
    rows = []
    for name, queries in (("decoder", args.decoder_queries), ("encoder", cells)):
        inputs = problem(shapes, args.batch, queries)
        dense_gib = args.batch * HEADS * queries * max(h * w for h, w in shapes) * 4 / 2**30
        for pass_name in ("forward", "forward+backward"):
            compiled, measured = {}, []
            for impl in MSDA_IMPLS:
                row = {"problem": name, "queries": queries, "impl": impl, "pass": pass_name, "ms": None,
                       "spread_ms": None, "gflops": None, "program_mib": None, "note": ""}
                if impl == "dense" and dense_gib > args.max_dense_gib:
                    row["note"] = f"left out: a {dense_gib:.1f} GiB sampling matrix per level (--max_dense_gib)"
                    rows.append(row)
                    continue
                compiled[impl] = jax.jit(programs(impl, shapes)[pass_name]).lower(*inputs).compile()
                stats = perf.program_stats(compiled[impl])
                row.update(gflops=stats.flops / 1e9, program_mib=stats.peak_bytes / 2**20)
                rows.append(row)
                measured.append(row)
            times = common.time_alternating([lambda c=c: c(*inputs) for c in compiled.values()], args.repeats)
            for row, t in zip(measured, times):
                row.update(ms=1e3 * statistics.median(t), spread_ms=1e3 * (max(t) - min(t)) / 2)
            for row in rows[-len(MSDA_IMPLS):]:
                print(table.line(row), flush=True)
    if args.json:
        common.write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
