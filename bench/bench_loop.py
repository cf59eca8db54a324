"""What train.py's loop adds to the train step, measured in one run, alternating: the preemption
agreement, an asynchronous checkpoint save (train.py's) and, for comparison, a synchronous one.

The step is train.py's (``make_train_step`` under ``jax.pmap``, state donated) at the official R50
model size (its parameters and AdamW state: about 41M parameters, 0.5 GB). Each timed unit is two
steps; in the save modes the save train.py does after a step comes between them: the state copied
to the host (``first_local``) and handed to ``TrainCheckpoints.save``. An asynchronous save writes
in the background while the second step runs (on a 2-core CPU the two share the cores), and is
waited for, untimed, before the next unit; the synchronous one waits for the files in the unit.
In the agreement mode the second step is dispatched after ``Preemption.agreed`` has read the first
step's summed stop flag, as the loop does at every step. "cost" is the unit's time minus that of
the unit with nothing between the steps.

  python bench/bench_loop.py                     # R50, batch 2, 512x512, 3 rounds
  python bench/bench_loop.py --rounds 5 --size 800x1088 --batch 4
"""
import argparse
import statistics
import tempfile
import time

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from bench_train import make_batch
from detr_jax import build_model
from detr_jax.checkpoint import TrainCheckpoints
from detr_jax.periodic import Preemption
from detr_jax.optim import make_optimizer
from detr_jax.parallel import AXIS, first_local, replicate_on_devices, shard
from detr_jax.training import TrainState, make_train_step

MODES = ("none", "agree", "async", "sync")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="r50", help="configs/detr_coco.py variant")
    parser.add_argument("--size", default="512x512", help="image size HxW")
    parser.add_argument("--batch", type=int, default=2, help="global batch")
    parser.add_argument("--rounds", type=int, default=3, help="timed iterations of each mode (alternating)")
    args = parser.parse_args(argv)

    config = common.load_config("configs/detr_coco.py", args.model)
    devices = jax.local_device_count()
    model = build_model(config.model)
    variables = common.init_variables(model, config.model)
    tx, schedule = make_optimizer(config.optim, variables["params"], config.model, 1000.0, 100_000)
    state = TrainState(step=np.int32(0), params=variables["params"], buffers=variables.get("buffers", {}),
                       opt_state=jax.jit(tx.init)(variables["params"]), skipped=np.int32(0))
    state = replicate_on_devices(jax.device_get(state), devices)
    p_step = jax.pmap(make_train_step(model, tx, schedule, config.loss, config.model), axis_name=AXIS,
                      in_axes=(0, 0, None, None), donate_argnums=(0,))
    batch = shard(make_batch(args.batch, common.parse_size(args.size), config.data.max_boxes,
                             config.model.num_classes), devices)
    rng = jax.random.PRNGKey(1)
    state_mib = sum(np.asarray(x[0]).nbytes for x in jax.tree_util.tree_leaves(jax.device_get(state))) / 2**20

    env = common.environment()
    print(common.environment_line(env) + f"; {args.model}, batch {args.batch}, {args.size}, "
          f"train state {state_mib:.0f} MiB")
    with tempfile.TemporaryDirectory() as root:
        savers = {"async": TrainCheckpoints(f"{root}/async", keep=1, async_save=True),
                  "sync": TrainCheckpoints(f"{root}/sync", keep=1, async_save=False)}
        times = {mode: [] for mode in MODES}
        preemption, flag = Preemption(), np.int32(0)
        state, metrics = p_step(state, batch, rng, flag)  # compile and warm up
        jax.block_until_ready(metrics)
        for round_ in range(args.rounds + 1):  # round 0: every mode once, untimed
            for mode in MODES:
                start = time.perf_counter()
                state, metrics = p_step(state, batch, rng, flag)
                if mode == "agree":
                    preemption.agreed(metrics)
                elif mode != "none":
                    savers[mode].save(round_, first_local(state), {"step": round_})
                    if mode == "sync":
                        savers[mode].wait()
                state, metrics = p_step(state, batch, rng, flag)
                jax.block_until_ready(metrics)
                if round_:
                    times[mode].append(time.perf_counter() - start)
                if mode == "async":
                    savers[mode].wait()
        for saver in savers.values():
            saver.close()
        preemption.close()
    base = statistics.median(times["none"])
    table = common.Table([("between", "mode", "<7"), ("s/2 steps", "s", "9.3f"), ("+-", "spread", "6.3f"),
                          ("cost s", "cost", "7.3f"), ("cost / step", "ratio", "11.1%")])
    print(table.header())
    for mode in MODES:
        ts = times[mode]
        median = statistics.median(ts)
        print(table.line({"mode": mode, "s": median, "spread": (max(ts) - min(ts)) / 2, "cost": median - base,
                          "ratio": (median - base) / (base / 2)}))


if __name__ == "__main__":
    main()
