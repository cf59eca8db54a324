"""Pod-scale training on CPU: processes over jax.distributed (localhost) against one process with
as many simulated devices, dropout on. The same global batch gives the same loss at every step and
the same parameters whatever the number of hosts and devices; a run stopped on 2 processes resumes
on 1 (and, in the full matrix, the reverse); SIGTERM to one of 2 processes stops both after the same
step.

Two matrices (``--multihost``, see conftest.py): "quick", the suite's (2 buckets, 8 steps: 2x2
against 1x4, and the SIGTERM stop on 2x2 resumed on 1x4); "full", issue 14's acceptance (3 buckets,
12 steps, adding 2x1 against 1x2 and a resume from 1x2 on 2x1), about 13 minutes:

  python -m pytest -q tests/test_multihost.py --multihost=full
"""
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, devices_env
from test_train import assert_same_params, final_params, read_history


@dataclasses.dataclass(frozen=True)
class Matrix:
    steps: int
    buckets: str  # --config.data.buckets
    scales: str  # --config.data.train_scales

    def flags(self) -> list[str]:
        return [f"--config.train.num_steps={self.steps}", "--config.train.batch_size=4",
                "--config.train.log_every_steps=1", "--config.model.dropout=0.1", "--config.optim.schedule=constant",
                f"--config.data.train_scales={self.scales}", "--config.data.train_max_size=96",
                f"--config.data.buckets={self.buckets}"]


MATRICES = {"quick": Matrix(8, "((64, 96), (96, 64))", "(64, 96)"),
            "full": Matrix(12, "((64, 96), (96, 64), (96, 96))", "(64, 80, 96)")}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, request):
    """(synthetic data folder, compilation cache, the matrix): shared by every run of the module."""
    root = tmp_path_factory.mktemp("multihost")
    return str(root / "data"), str(root / "cache"), MATRICES[request.config.getoption("--multihost")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, shared, processes: int, devices: int, *overrides):
    """Start one job: ``processes`` processes with ``devices`` simulated CPU devices each."""
    data_dir, cache, matrix = shared
    env = devices_env(devices)
    args = [sys.executable, "train.py", "--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.train.compilation_cache_dir={cache}", *matrix.flags(),
            *overrides]
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


def assert_same_run(a, b, steps):
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


def reference_run(shared, tmp_path_factory, devices: int):
    """An uninterrupted run on 1 process x ``devices`` devices, whose steps change shape."""
    workdir = tmp_path_factory.mktemp(f"1x{devices}") / "run"
    out = run(workdir, shared, 1, devices)[0]
    per_device = 4 // devices
    assert (f"devices: {devices} ({devices} local x 1 processes, cpu); batch: {per_device} per device, 4 per host, "
            "4 global") in out
    programs = read_history(workdir)[-1]["train_step_programs"]
    assert programs >= 2, programs  # the steps really changed shape
    return workdir


@pytest.fixture(scope="module")
def one_by_four(shared, tmp_path_factory):
    return reference_run(shared, tmp_path_factory, 4)


@pytest.fixture(scope="module")
def one_by_two(shared, tmp_path_factory):
    return reference_run(shared, tmp_path_factory, 2)


def test_two_by_two_equals_one_by_four(one_by_four, shared, tmp_path):
    outputs = run(tmp_path / "2x2", shared, 2, 2)
    assert "devices: 4 (2 local x 2 processes, cpu); batch: 1 per device, 2 per host, 4 global" in outputs[0]
    assert sum("parameter checksum" in out for out in outputs) == 1  # only process 0 prints
    assert_same_run(one_by_four, tmp_path / "2x2", shared[2].steps)


def test_sigterm_to_one_of_two_processes_then_resume_on_one(one_by_four, shared, tmp_path):
    """SIGTERM to process 1 only: both processes save the same step and exit 0; the run resumed on
    1 process x 4 devices (an elastic resume, 2 hosts -> 1, with a changed checkpoint interval,
    logged) ends with the parameters of the uninterrupted run."""
    steps = shared[2].steps
    workdir = tmp_path / "preempted"
    job = launch(workdir, shared, 2, 2, "--config.train.checkpoint_every_steps=100")
    history = workdir / "history" / "train.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (history.exists() and history.read_text().count("\n") >= 2):
        time.sleep(0.1)
    job[1].send_signal(signal.SIGTERM)
    outputs = finish(job)
    stopped_at = int(outputs[0].split("stopped by a signal on another host: saved the checkpoint of step ")[1].split(";")[0])
    assert 2 <= stopped_at < steps, outputs[0]
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped_at)]  # one step, saved by both
    out = run(workdir, shared, 1, 4)[0]
    assert f"resumed from {workdir / 'checkpoints' / str(stopped_at)} (step {stopped_at})" in out
    assert "config changed since that checkpoint: train.checkpoint_every_steps 100 -> 3" in out
    assert_same_run(one_by_four, workdir, steps)


@pytest.mark.multihost_full
def test_two_processes_one_device_each_equal_one_process_two_devices(one_by_two, shared, tmp_path):
    outputs = run(tmp_path / "2x1", shared, 2, 1)
    assert "devices: 2 (1 local x 2 processes, cpu); batch: 2 per device, 2 per host, 4 global" in outputs[0]
    assert_same_run(one_by_two, tmp_path / "2x1", shared[2].steps)


@pytest.mark.multihost_full
def test_elastic_resume_from_one_process_on_two(one_by_two, shared, tmp_path):
    """Stopped at step 6 on 1 process x 2 devices, resumed on 2 processes x 1 device; the changed
    train.num_steps is a compatible change, logged."""
    steps = shared[2].steps
    workdir = tmp_path / "elastic"
    run(workdir, shared, 1, 2, "--config.train.num_steps=6")
    outputs = run(workdir, shared, 2, 1, f"--config.train.num_steps={steps}")
    assert f"resumed from {workdir / 'checkpoints' / '6'} (step 6)" in outputs[0]
    assert f"config changed since that checkpoint: train.num_steps 6 -> {steps}" in outputs[0]
    assert_same_run(one_by_two, workdir, steps)
