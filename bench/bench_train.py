"""Train-step throughput of DETR at the official recipe, matcher and loss included, on this machine.

The step is the one train.py runs (``detr_jax.training.make_train_step`` under ``jax.pmap`` over the
local devices, state donated): forward, Hungarian matching of all 6 decoder layers, the loss with
auxiliary terms, backward (none through the frozen stem and layer1), psum, AdamW with clipping.
Random weights and images, about 7 target boxes per image (COCO's mean) padded to 100.

One row per (decoder) model x image size x global batch x dtype x attention x remat x matcher x padding:
compile seconds, seconds per step (median and spread of the timed steps after one warm-up), images/s (all
devices and per device), GFLOPs per image of the compiled step (XLA cost analysis), the FLOP rate
reached per device, the matcher's share of the step (the same matching, timed alone on one
device's batch), and memory per device (XLA's memory analysis; GPU/TPU: the allocator's peak so far).

Beside it, ``--official=DIR --official_python=PY`` runs official PyTorch DETR's step (a checkout of
facebookresearch/detr, a Python with torch; ``bench/official_detr_step.py``) on the same machine,
alternating step by step with ours so that both see the same load, and prints its seconds and the
ratio ours / official. ``--parts`` splits the step: backbone and transformer (input projection,
transformer, heads and the loss with matching), forward and forward + backward, each timed alone
on one device's batch with its GFLOPs (XLA cost analysis) and FLOP rate.

  python bench/bench_train.py                              # R50, 800x1088 and 512x512, batch 4 per device
  python bench/bench_train.py --quick                      # CPU: R50, batch 2, 512x512, float32
  python bench/bench_train.py --quick --parts --official=../official_detr --official_python=../torchenv/bin/python
  python bench/bench_train.py --quick --decoders detr conditional dab deformable deformable_refine \
      deformable_two_stage     # each decoder's paper recipe, side by side
  python bench/bench_train.py --sizes 800x1088 --batches 64 --dtypes bfloat16 --attention fused \\
      --remat none transformer all --json train.json      # one H100
  python bench/bench_train.py --config configs/synthetic.py --models demo --sizes 192x256 --batches 8 \\
      --dtypes float32 --padding exact official          # the CPU demo's step, both paddings
"""
import argparse
import itertools
import json
import statistics
import subprocess
import time
from pathlib import Path

import common  # first: puts the repository on sys.path
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bench_matcher
from detr_jax import build_model, perf
from detr_jax.config import PADDINGS
from detr_jax.losses import compute_loss
from detr_jax.matching import match
from detr_jax.models import trainable_mask
from detr_jax.optim import make_optimizer
from detr_jax.parallel import AXIS, replicate_on_devices, shard
from detr_jax.training import TrainState, batch_targets, make_train_step

OFFICIAL_STEP = Path(__file__).resolve().parent / "official_detr_step.py"
HOW_TO_OFFICIAL = ("official PyTorch DETR on this machine: add --official=DETR_CHECKOUT --official_python=TORCH_PYTHON "
                   "(bench/official_detr_step.py; see its docstring)")

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
    fn = jax.jit(lambda o, t: match(o, t, config.loss, config.model.classification))
    return common.time_call(fn, (outputs, targets), repeats)[0]


class OfficialStep:
    """Official PyTorch DETR's train step in a subprocess (``bench/official_detr_step.py``): each call
    runs one step there and returns once it is done."""

    def __init__(self, python: str, official_dir: str, official_args: list, batch: int, size: str):
        command = [python, str(OFFICIAL_STEP), f"--official={official_dir}", f"--batch={batch}", f"--size={size}",
                   *official_args]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{OFFICIAL_STEP.name} ended without answering (its error is printed above)")
        return json.loads(line)

    def __call__(self) -> float:
        self.process.stdin.write("1\n")
        self.process.stdin.flush()
        return self._answer()["seconds"][0]

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)


def official_args(model: str) -> list | None:
    """Official ``main.py`` options for a configs/detr_coco.py variant, None if it has no official twin."""
    return {"r50": [], "r50_dc5": ["--dilation"], "r101": ["--backbone=resnet101"],
            "r101_dc5": ["--backbone=resnet101", "--dilation"], "r50_prenorm": ["--pre_norm"]}.get(model)


def init_state(model, tx_config, model_config):
    """(variables, optimizer, schedule, TrainState) with random weights, on the host."""
    variables = common.init_variables(model, model_config)
    params = variables["params"]
    tx, schedule = make_optimizer(tx_config, params, model_config, 1000.0, 100_000)
    state = TrainState(step=np.int32(0), params=params, buffers=variables.get("buffers", {}),
                       opt_state=jax.jit(tx.init)(params), skipped=np.int32(0))
    return variables, tx, schedule, jax.device_get(state)


def compiled_train_step(config, batch: int, size: tuple[int, int]):
    """(step, compiled program, compile seconds): ``step()`` runs train.py's pmapped step once on a
    fixed random global batch, updating its state in place."""
    devices = jax.local_device_count()
    if batch % devices:
        raise ValueError(f"--batches {batch}: must be a multiple of the {devices} local devices")
    model = build_model(config.model)
    _, tx, schedule, state = init_state(model, config.optim, config.model)
    state = replicate_on_devices(state, devices)
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

    return step, compiled, compile_s


def measure(config, batch: int, size: tuple[int, int], repeats: int, official=None) -> dict:
    """The train step's row; with ``official`` (a callable running official's step) both are timed
    alternating, and the row has official's median seconds and the ratio ours / official."""
    step, compiled, compile_s = compiled_train_step(config, batch, size)
    row = {"official_s": None, "vs_official": None}
    if official is None:
        median, spread, _ = common.time_call(step, (), repeats)
    else:
        ours, theirs = common.time_alternating([step, official], repeats)
        median, spread = statistics.median(ours), (max(ours) - min(ours)) / 2
        row.update(official_s=statistics.median(theirs),
                   vs_official=statistics.median([a / b for a, b in zip(ours, theirs)]))
    stats = perf.program_stats(compiled)
    devices = jax.local_device_count()
    device_batch = batch // devices
    match_s = matching_seconds(config, device_batch, repeats)
    peak = perf.peak_device_memory(jax.local_devices()[0])
    return {"compile_s": compile_s, "s_per_step": median, "spread_s": spread, "images_per_s": batch / median,
            "images_per_s_per_device": batch / median / devices, "gflops_per_image": stats.flops / device_batch / 1e9,
            "tflops_per_s_per_device": stats.flops / median / 1e12, "matching_share": match_s / median,
            "program_mib": stats.peak_bytes / 2**20, "device_peak_mib": peak / 2**20 if peak is not None else None,
            **row}


class GivenFeatures(nn.Module):
    """A stand-in backbone returning the feature map [B, h, w, C] given in the "inputs" collection,
    so that the rest of DETR runs alone."""

    @nn.compact
    def __call__(self, images):
        return self.variable("inputs", "features", lambda: None).value


def part_programs(config, device_batch: int, size: tuple[int, int]) -> dict:
    """{part: (jitted function, its arguments)} for the step's parts on one device: the backbone
    forward, its forward + backward (frozen stages under stop_gradient, as in training), the rest of
    DETR (input projection, transformer, heads, loss with matching) forward, and its forward + backward."""
    model = build_model(config.model)
    variables, _, _, _ = init_state(model, config.optim, config.model)
    params, buffers = variables["params"], variables.get("buffers", {})
    batch = make_batch(device_batch, size, config.data.max_boxes, config.model.num_classes)
    trainable = trainable_mask(params, config.model)
    backbone_vars = lambda p: {"params": p, "buffers": buffers.get("backbone", {})}

    def backbone_forward(p, images):
        p = jax.tree.map(lambda x, keep: x if keep else jax.lax.stop_gradient(x), p, trainable["backbone"])
        return model.backbone.apply(backbone_vars(p), images)

    features = jax.jit(backbone_forward)(params["backbone"], batch["image"])
    cotangent = jnp.asarray(np.random.RandomState(1).standard_normal(features.shape), features.dtype)
    head = model.clone(backbone=GivenFeatures())
    head_params = {k: v for k, v in params.items() if k != "backbone"}
    rng = jax.random.PRNGKey(2)

    def head_loss(p, features):
        outputs = head.apply({"params": p, "inputs": {"backbone": {"features": features}}}, batch["image"],
                             batch["padding_mask"], train=True, rngs={"dropout": rng})
        return compute_loss(outputs, batch_targets(batch), config.loss, config.model.classification)[0]

    backbone_grad = jax.grad(lambda p, x: jnp.vdot(backbone_forward(p, x), cotangent))
    return {"backbone forward": (jax.jit(backbone_forward), (params["backbone"], batch["image"])),
            "backbone forward + backward": (jax.jit(backbone_grad), (params["backbone"], batch["image"])),
            "transformer forward": (jax.jit(head_loss), (head_params, features)),
            "transformer forward + backward": (jax.jit(jax.grad(head_loss)), (head_params, features))}


def measure_parts(config, device_batch: int, size: tuple[int, int], repeats: int) -> list[dict]:
    """One row per part (``part_programs``), timed alternating: seconds, GFLOPs, GFLOP/s."""
    programs = {name: (fn.lower(*args).compile(), args) for name, (fn, args) in part_programs(config, device_batch, size).items()}
    times = common.time_alternating([lambda c=c, a=a: c(*a) for c, a in programs.values()], repeats)
    rows = []
    for (name, (compiled, _)), part_times in zip(programs.items(), times):
        seconds, flops = statistics.median(part_times), perf.program_stats(compiled).flops
        rows.append({"part": name, "seconds": seconds, "gflops": flops / 1e9, "gflops_per_s": flops / seconds / 1e9})
    return rows


PARTS_TABLE = common.Table([("part", "part", "<32"), ("s", "seconds", "7.3f"), ("GFLOP", "gflops", "7.1f"),
                            ("GFLOP/s", "gflops_per_s", "8.1f")])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/detr_coco.py", help="the config file of --models")
    parser.add_argument("--models", nargs="+", default=["r50"], help="variants of --config")
    parser.add_argument("--decoders", nargs="+", default=None, choices=list(common.DECODER_CONFIGS),
                        help="instead of --config: each decoder's paper COCO recipe (configs/DECODER_coco.py)")
    parser.add_argument("--sizes", nargs="+", default=["800x1088", "512x512"], help="image sizes HxW")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="global batch sizes (default: 4 per device, as official)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--attention", nargs="+", default=["xla"], choices=["xla", "fused"])
    parser.add_argument("--remat", nargs="+", default=["none"], choices=["none", "transformer", "backbone", "all"])
    parser.add_argument("--matchers", nargs="+", default=["host"], choices=["host", "device"])
    parser.add_argument("--padding", nargs="+", default=["exact"], choices=PADDINGS, help="config.model.padding")
    parser.add_argument("--conv_impl", nargs="+", default=["auto"], choices=["auto", "xla", "gemm"],
                        help="config.model.conv_impl")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps after one warm-up")
    parser.add_argument("--quick", action="store_true", help=f"a few minutes on a CPU: {QUICK}")
    parser.add_argument("--parts", action="store_true", help="also time the step's parts (one device's batch)")
    parser.add_argument("--official", help="a checkout of facebookresearch/detr: time its step alternating with ours")
    parser.add_argument("--official_python", default="python", help="a Python with torch for --official")
    parser.add_argument("--json", help="also write the rows to this json file")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    batches = args.batches or [4 * jax.local_device_count()]

    env = common.environment()
    print(common.environment_line(env) + "; AdamW, clip 0.1, aux loss, ~7 boxes per image padded to 100")
    if not args.official:
        print(f"({HOW_TO_OFFICIAL})")
    table = common.Table([("decoder", "decoder", "<20"), ("model", "model", "<8"), ("size", "size", ">9"),
                          ("batch", "batch", "5d"),
                          ("dtype", "dtype", ">8"), ("attn", "attention", ">5"), ("remat", "remat", ">11"),
                          ("match", "matcher", ">6"), ("padding", "padding", ">8"), ("conv", "conv_impl", ">5"),
                          ("compile s", "compile_s", "9.1f"), ("s/step", "s_per_step", "7.3f"), ("+-", "spread_s", "6.3f"),
                          ("img/s", "images_per_s", "7.2f"),
                          ("/device", "images_per_s_per_device", "7.2f"), ("GFLOP/img", "gflops_per_image", "9.1f"),
                          ("TFLOP/s", "tflops_per_s_per_device", "7.3f"), ("match", "matching_share", "6.1%"),
                          ("prog MiB", "program_mib", "8.0f"), ("peak MiB", "device_peak_mib", "8.0f"),
                          ("official s", "official_s", "10.3f"), ("ours/off", "vs_official", "8.2f")])
    print(table.header())
    rows, parts = [], []
    for decoder, name, size, batch, dtype, attention, remat, matcher, padding, conv_impl in (
            itertools.product(args.decoders or [None], args.models, args.sizes, batches, args.dtypes, args.attention,
                              args.remat, args.matchers, args.padding, args.conv_impl)):
        config = common.decoder_config(decoder, name) if decoder else common.load_config(args.config, name)
        decoder = decoder or config.model.decoder
        config.model.update(dtype=dtype, attention=attention, remat=remat, padding=padding, conv_impl=conv_impl)
        config.loss.matcher = matcher
        official = None
        if args.official and config.model.decoder == "detr" and official_args(name) is not None:
            official = OfficialStep(args.official_python, args.official, official_args(name), batch, size)
        try:
            row = measure(config, batch, common.parse_size(size), args.repeats, official)
        finally:
            if official is not None:
                official.close()
        rows.append({"decoder": decoder, "model": name, "size": size, "batch": batch, "dtype": dtype,
                     "attention": attention,
                     "remat": remat, "matcher": matcher, "padding": padding, "conv_impl": conv_impl, **row})
        print(table.line(rows[-1]), flush=True)
        if args.parts:
            parts += [{**rows[-1], **part} for part in
                      measure_parts(config, batch // jax.local_device_count(), common.parse_size(size), args.repeats)]
            print(PARTS_TABLE.header())
            print("\n".join(PARTS_TABLE.line(part) for part in parts[-4:]), flush=True)
    if args.json:
        common.write_json(args.json, env, rows + parts)


if __name__ == "__main__":
    main()
