"""Pod-scale training on CPU: processes over jax.distributed (localhost) against one process with
as many simulated devices. Two shape buckets, 8 steps, dropout on. The same global batch gives the
same loss at every step and the same parameters on 2 processes x 2 devices as on 1 x 4; SIGTERM to
one of 2 processes stops both after the same step, and the run resumed on 1 process ends where the
uninterrupted run ends. (The data schedule itself is checked on 1, 2 and 3 hosts, without
training, in test_data_pipeline.py and test_data_tfds.py.)"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_train import assert_same_params, final_params, read_history

STEPS = 8
COMMON = [f"--config.train.num_steps={STEPS}", "--config.train.batch_size=4", "--config.train.log_every_steps=1",
          "--config.model.dropout=0.1", "--config.optim.schedule=constant", "--config.data.train_scales=(64, 96)",
          "--config.data.train_max_size=96", "--config.data.buckets=((64, 96), (96, 64))"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(synthetic data folder, compilation cache): shared by every run of the module."""
    root = tmp_path_factory.mktemp("multihost")
    return str(root / "data"), str(root / "cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, shared, processes: int, devices: int, *overrides):
    """Start one job: ``processes`` processes with ``devices`` simulated CPU devices each."""
    data_dir, cache = shared
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = [sys.executable, "train.py", "--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.train.compilation_cache_dir={cache}", *COMMON, *overrides]
    port = free_port()
    multi = lambda i: ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
                       if processes > 1 else [])
    return [subprocess.Popen(args + multi(i), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(processes)]


def finish(job) -> list[str]:
    outputs = [p.communicate(timeout=900)[0] for p in job]
    for p, out in zip(job, outputs):
        assert p.returncode == 0, out
    return outputs


def run(workdir, shared, processes, devices, *overrides) -> list[str]:
    return finish(launch(workdir, shared, processes, devices, *overrides))


def losses(workdir):
    return [(h["step"], h["loss"]) for h in read_history(workdir)]


def assert_same_run(a, b, steps=STEPS):
    """Loss at every logged step within relative 1e-5; final parameters within 1e-5."""
    la, lb = dict(losses(a)), dict(losses(b))
    common = sorted(la.keys() & lb.keys())
    assert common and common[-1] == steps
    for step in common:
        assert abs(la[step] - lb[step]) <= 1e-5 * abs(la[step]), (step, la[step], lb[step])
    step_a, params_a = final_params(a)
    step_b, params_b = final_params(b)
    assert step_a == step_b == steps
    assert_same_params(params_a, params_b, atol=1e-5)


@pytest.fixture(scope="module")
def one_by_four(shared, tmp_path_factory):
    """The uninterrupted reference: 1 process x 4 devices."""
    workdir = tmp_path_factory.mktemp("1x4") / "run"
    out = run(workdir, shared, 1, 4)[0]
    assert "devices: 4 (4 local x 1 processes, cpu); batch: 1 per device, 4 per host, 4 global" in out
    programs = read_history(workdir)[-1]["train_step_programs"]
    assert programs >= 2, programs  # the steps really changed shape
    return workdir


def test_two_by_two_equals_one_by_four(one_by_four, shared, tmp_path):
    outputs = run(tmp_path / "2x2", shared, 2, 2)
    assert "devices: 4 (2 local x 2 processes, cpu); batch: 1 per device, 2 per host, 4 global" in outputs[0]
    assert sum("parameter checksum" in out for out in outputs) == 1  # only process 0 prints
    assert_same_run(one_by_four, tmp_path / "2x2")


def test_sigterm_to_one_of_two_processes_then_resume_on_one(one_by_four, shared, tmp_path):
    """SIGTERM to process 1 only: both processes save the same step and exit 0; the run resumed on
    1 process x 4 devices (an elastic resume: 2 hosts -> 1; a changed checkpoint interval, logged)
    ends with the parameters of the uninterrupted run."""
    workdir = tmp_path / "preempted"
    job = launch(workdir, shared, 2, 2, "--config.train.checkpoint_every_steps=100")
    history = workdir / "history" / "train.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (history.exists() and history.read_text().count("\n") >= 2):
        time.sleep(0.1)
    job[1].send_signal(signal.SIGTERM)
    outputs = finish(job)
    stopped_at = int(outputs[0].split("stopped by a signal on another host: saved the checkpoint of step ")[1].split(";")[0])
    assert 2 <= stopped_at < STEPS, outputs[0]
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped_at)]  # one step, saved by both
    out = run(workdir, shared, 1, 4)[0]
    assert f"resumed from {workdir / 'checkpoints' / str(stopped_at)} (step {stopped_at})" in out
    assert "config changed since that checkpoint: train.checkpoint_every_steps 100 -> 3" in out
    assert_same_run(one_by_four, workdir)
