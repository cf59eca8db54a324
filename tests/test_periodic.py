"""The training loop's parts, each alone: periodic actions, the agreed preemption stop, honest
checkpoint restore, and the train step's handling of an unreadable image."""
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from detr_jax import periodic
from detr_jax.checkpoint import IncompatibleCheckpoint, TrainCheckpoints, UnreadableCheckpoints, config_changes


def end(step, last=False, stopping=False, metrics=None, state=None):
    return periodic.StepEnd(step, last, stopping, metrics or {}, lambda: state)


def test_due():
    assert [s for s in range(1, 11) if periodic.due(s, 4, last=s == 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if periodic.due(s, 0, last=s == 10)] == [10]
    assert not periodic.due(10, 4, last=True, at_end=False)


class Recorder:
    def __init__(self):
        self.calls = []

    def save(self, step, state, meta):
        self.calls.append((step, state, meta))

    def run(self, step, state, epoch):
        self.calls.append((step, state, epoch))

    def write(self, step, scalars):
        self.calls.append((step, scalars))


def test_save_checkpoint_every_n_at_the_end_and_at_a_stop():
    saved = Recorder()
    action = periodic.SaveCheckpoint(3, saved, meta=lambda step: {"step": step})
    for step in range(1, 6):
        action.after_step(end(step, state=f"s{step}"))
    action.after_step(end(6, last=True, stopping=True, state="s6"))
    assert saved.calls == [(3, "s3", {"step": 3}), (6, "s6", {"step": 6})]
    action.after_step(end(7, last=True, state="s7"))  # the planned end, off the period
    assert saved.calls[-1] == (7, "s7", {"step": 7})


def test_evaluate_every_n_and_at_the_planned_end_only():
    evaluator = Recorder()
    action = periodic.Evaluate(4, True, evaluator, steps_per_epoch=2.0)
    for step in (1, 4, 5):
        action.after_step(end(step, state="s"))
    action.after_step(end(6, last=True, stopping=True, state="s"))  # preempted: evaluated after the restart
    action.after_step(end(7, last=True, state="s"))
    assert evaluator.calls == [(4, "s", 2.0), (7, "s", 3.5)]


def step_metrics(loss, finite=True):
    """Per-device metrics as the pmap'd step returns them (1 device)."""
    keys = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "grad_norm", "lr")
    return {**{k: np.array([loss]) for k in keys}, "finite": np.array([finite]), "stop": np.array([0])}


def test_log_metrics_means_the_interval_and_stops_on_a_nonfinite_step():
    writer, lines = Recorder(), []
    state = type("State", (), {"skipped": np.int32(1)})()
    throughput = type("Throughput", (), {"report": lambda self, step: {"steps_per_s": 2.0, "examples_per_s": 8.0,
                                                                      "eta_s": 1.0}})()
    action = periodic.LogMetrics(2, writer, throughput, 4.0, lines.append, True, lambda: "ckpt/2", 4, lambda: 3)
    action.after_step(end(1, metrics=step_metrics(1.0), state=state))
    assert writer.calls == []
    action.after_step(end(2, metrics=step_metrics(3.0), state=state))
    step, scalars = writer.calls[0]
    assert step == 2 and scalars["loss"] == 2.0 and scalars["epoch"] == 0.5 and scalars["skipped_steps"] == 1
    assert scalars["train_step_programs"] == 3 and "finite" not in scalars and "stop" not in scalars
    assert lines[0].startswith("step 2/4 (epoch 0.50) loss 2.0000")
    action.after_step(end(3, metrics=step_metrics(float("nan"), finite=False), state=state))
    with pytest.raises(FloatingPointError, match="1 of the last 2 steps .* last good checkpoint is ckpt/2"):
        action.after_step(end(4, last=True, metrics=step_metrics(1.0), state=state))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_flag_and_agreement(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # SIGINT: SIG_IGN under nohup
    preemption = periodic.Preemption()
    try:
        assert preemption.flag() == 0 and preemption.cause() == "a signal on another host"
        os.kill(os.getpid(), signum)  # handled: sets the flag, the process goes on
        assert preemption.flag() == 1 and preemption.cause() == signal.Signals(signum).name
        assert preemption.agreed({"stop": np.array([2, 2])})  # another host's flag, summed by the step
        assert not preemption.agreed({"stop": np.array([0, 0])})
    finally:
        preemption.close()
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers it found are back


def test_second_ctrl_c_exits_at_once():
    preemption = periodic.Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
        assert preemption.cause() == "SIGINT"
    finally:
        preemption.close()


def small_state(width=3):
    return {"params": {"w": np.arange(2 * width, dtype=np.float32).reshape(2, width)}, "step": np.array(5, np.int32)}


def run_config(**model):
    config = ml_collections.ConfigDict({"model": {"hidden_dim": 32, "dtype": "float32", **model},
                                        "optim": {"lr": 1e-4}})
    return config


def test_restore_tells_corrupt_incompatible_and_compatible_apart(tmp_path):
    checkpoints = TrainCheckpoints(tmp_path / "checkpoints", keep=None)
    for step in (1, 2):
        checkpoints.save(step, small_state(), {"config": run_config().to_json()})
    checkpoints.close()
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("not json")  # corrupt newest

    checkpoints = TrainCheckpoints(tmp_path / "checkpoints", keep=None)
    warnings = []
    changed = run_config(dtype="bfloat16")
    changed.optim.lr = 2e-4
    step, state, meta, changes = checkpoints.restore(small_state(), changed, warn=warnings.append)
    assert step == 1 and len(warnings) == 2 and "checkpoint" in warnings[0] and "/2 cannot be read" in warnings[0]
    aside = tmp_path / "checkpoints_unreadable" / "2"
    assert warnings[1] == f"warning: moved the unreadable checkpoint aside to {aside}; the run continues from step 1"
    assert (aside / "meta" / "metadata").read_text() == "not json" and checkpoints.steps() == [1]
    np.testing.assert_array_equal(state["params"]["w"], small_state()["params"]["w"])
    assert changes == [("model.dtype", "float32", "bfloat16"), ("optim.lr", 1e-4, 2e-4)]

    with pytest.raises(IncompatibleCheckpoint, match=r"model.hidden_dim 32 -> 64.*new --workdir"):
        checkpoints.restore(small_state(), run_config(hidden_dim=64))
    with pytest.raises(IncompatibleCheckpoint, match=r"no config field differs \(the checkpoint holds 2 arrays.*"
                                                     r"params.w \(2, 3\)"):
        checkpoints.restore(small_state(width=4), run_config())
    (tmp_path / "checkpoints" / "1" / "meta" / "metadata").write_text("not json")  # now every one is corrupt
    with pytest.raises(UnreadableCheckpoints, match=r"none of the checkpoints \[1\] .* can be read"):
        checkpoints.restore(small_state(), run_config(), warn=warnings.append)
    checkpoints.close()


def test_a_run_saves_again_the_step_of_a_checkpoint_set_aside(tmp_path):
    """A corrupt newest checkpoint (its state/ deleted) is moved aside at restore; the run reaches
    that step again and saves it (it used to fail with orbax's StepAlreadyExistsError, at every
    restart); a second corruption of the same step is kept beside the first."""
    for attempt in ("2", "2.1"):
        checkpoints = TrainCheckpoints(tmp_path / "checkpoints", keep=None)
        for step in (1, 2):
            if step not in checkpoints.steps():
                checkpoints.save(step, small_state(), {"config": run_config().to_json()})
        checkpoints.wait()
        shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
        assert checkpoints.restore(small_state(), run_config(), warn=lambda _: None)[0] == 1
        assert (tmp_path / "checkpoints_unreadable" / attempt / "meta").is_dir()
        checkpoints.save(2, small_state(), {"config": run_config().to_json()})
        checkpoints.close()
    reopened = TrainCheckpoints(tmp_path / "checkpoints", keep=None)
    assert reopened.steps() == [1, 2]
    reopened.close()


def test_config_changes_compare_sequences_as_saved():
    a = ml_collections.ConfigDict({"data": {"buckets": ((1, 2),)}, "x": 1})
    b = ml_collections.ConfigDict({"data": {"buckets": ((1, 2),)}, "x": 2, "y": 3})
    assert config_changes(a, b) == [("x", 1, 2), ("y", None, 3)]


def test_an_unreadable_image_changes_neither_loss_nor_gradients():
    """A batch of 3 images plus one that failed to decode (a filler: example_valid False, all
    padding, no boxes) gives the loss and gradients of the 3 images alone."""
    from detr_jax import build_model
    from detr_jax.config import loss_config
    from detr_jax.losses import compute_loss
    from detr_jax.training import batch_targets

    model = build_model(tiny_config(dropout=0.0))
    rng = np.random.RandomState(0)
    good = {"image": rng.standard_normal((3, 64, 64, 3)).astype(np.float32),
            "padding_mask": np.zeros((3, 64, 64), bool), "labels": rng.randint(0, 5, (3, 4)).astype(np.int32),
            "boxes": rng.uniform(0.2, 0.6, (3, 4, 4)).astype(np.float32), "box_valid": rng.rand(3, 4) < 0.7,
            "example_valid": np.ones(3, bool)}
    filler = {"image": np.zeros((1, 64, 64, 3), np.float32), "padding_mask": np.ones((1, 64, 64), bool),
              "labels": np.zeros((1, 4), np.int32), "boxes": np.zeros((1, 4, 4), np.float32),
              "box_valid": np.zeros((1, 4), bool), "example_valid": np.zeros(1, bool)}
    with_filler = {k: np.concatenate([good[k][:2], filler[k], good[k][2:]]) for k in good}
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))

    @jax.jit
    def loss_and_grads(batch):
        def loss(params):
            outputs = model.apply({**variables, "params": params}, batch["image"], batch["padding_mask"])
            return compute_loss(outputs, batch_targets(batch), loss_config(), "softmax")
        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    (total_a, terms_a), grads_a = loss_and_grads(good)
    (total_b, terms_b), grads_b = loss_and_grads(with_filler)
    np.testing.assert_allclose(total_b, total_a, rtol=1e-6)
    for key in terms_a:
        np.testing.assert_allclose(terms_b[key], terms_a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    without_valid = {k: v for k, v in with_filler.items() if k != "example_valid"}
    (total_c, _), _ = loss_and_grads(without_valid)  # read as a real image with no objects: another loss
    assert abs(float(total_c) - float(total_a)) > 1e-3
