"""Data-parallel training: one step of a global batch on 1 device and on 4 (simulated CPU devices,
in a subprocess) gives the same parameters and metrics."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, devices_env


def _devices_check(variant: str):
    """Run with 4 simulated devices: one step of a global batch of 8 on 1 device and on 4, of the
    synthetic config ``variant``."""
    from configs.synthetic import get_config
    from detr_jax import build_model
    from detr_jax.models.detr import init_inputs
    from detr_jax.optim import make_optimizer
    from detr_jax.parallel import AXIS, first_local, replicate, shard
    from detr_jax.training import TrainState, make_train_step

    config = get_config(variant)
    config.optim.schedule = "constant"  # warm-up would start at lr 0
    # Adam's first update is lr * g / (|g| + eps). Parameters whose true gradient is zero (a conv bias
    # before GroupNorm, attention key biases) get rounding noise of ~1e-9 as g, which eps=1e-8 would
    # turn into updates of +-lr that differ between 1 and 4 devices; with eps=1e-4 the update is
    # linear in such g, and the comparison sees the gradients' agreement (the data-parallel part).
    config.optim.eps = 1e-4
    model = build_model(config.model)
    rng = np.random.RandomState(0)
    batch = {"image": rng.standard_normal((8, 64, 64, 3)).astype(np.float32),
             "padding_mask": np.zeros((8, 64, 64), bool),
             "labels": rng.randint(0, 5, (8, 4)).astype(np.int32),
             "boxes": rng.uniform(0.2, 0.6, (8, 4, 4)).astype(np.float32),
             "box_valid": rng.rand(8, 4) < 0.7}
    batch["padding_mask"][::2, 48:] = True
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), *init_inputs(config.model)))
    tx, schedule = make_optimizer(config.optim, variables["params"], config.model, 10.0, 100)
    state = TrainState(step=np.int32(0), params=variables["params"], buffers=variables.get("buffers", {}),
                       opt_state=tx.init(variables["params"]), skipped=np.int32(0))
    step = make_train_step(model, tx, schedule, config.loss, config.model)
    results = []
    for n in (1, 4):
        p_step = jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), devices=jax.devices()[:n])
        new_state, metrics = p_step(replicate(state, n), shard(batch, n), jax.random.PRNGKey(1))
        results.append((first_local(new_state).params, jax.tree.map(lambda x: np.asarray(x[0]), metrics)))
    (p1, m1), (p4, m4) = results
    same_metrics = all(np.allclose(m1[k], m4[k], rtol=1e-5, atol=1e-6) for k in m1)
    deltas = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                                                  jax.tree_util.tree_leaves(p4))]
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(variables["params"])))
    print(json.dumps({"devices": jax.device_count(), "metrics": same_metrics, "max_param_delta": max(deltas),
                      "moved": moved, "loss": float(m1["loss"])}))


@pytest.mark.parametrize("variant", ["tiny", "deformable_two_stage_tiny"])
def test_one_and_four_devices_give_the_same_step(variant):
    """DETR, and Deformable DETR with box refinement and two-stage (its proposals' loss and second
    matching included)."""
    env = devices_env(4, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, __file__, variant], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO / "tests")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["metrics"], result
    assert result["moved"] > 1e-5  # the step changed the parameters ...
    assert result["max_param_delta"] < 1e-6  # ... identically on 1 and 4 devices (float rounding; lr 3e-4)


if __name__ == "__main__":
    _devices_check(sys.argv[1])
