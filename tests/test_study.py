"""Convergence studies (detr_jax/study.py): the report's numbers on hand-made histories, the study
config's checks, the CLI (--help, --print_commands) and a real 2-run grid of the tiny config, killed
in its second run and resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from conftest import REPO
from detr_jax import study
from detr_jax.errors import ConfigError

TINY = "configs/synthetic.py:tiny"


def test_convergence_numbers_on_a_hand_made_history():
    rows = study.by_step([{"step": 8, "epoch": 1.0, "AP": 0.1}, {"step": 16, "epoch": 2.0, "AP": 0.2},
                          {"step": 24, "epoch": 3.0, "AP": 0.5}, {"step": 16, "epoch": 2.0, "AP": 0.35},  # resumed
                          {"step": 32, "epoch": 4.0, "AP": 0.6}, {"step": 40, "epoch": 5.0, "AP": 0.55}])
    assert [r["step"] for r in rows] == [8, 16, 24, 32, 40] and rows[1]["AP"] == 0.35  # the last one written
    # best 0.6 at epoch 4; 0.5 x 0.6 = 0.3 first reached at epoch 2, 0.45 at 3, 0.54 at 4
    assert study.convergence(rows, (0.5, 0.75, 0.9)) == {
        "evaluations": 5, "final_ap": 0.55, "best_ap": 0.6, "best_epoch": 4.0, "reached": (2.0, 3.0, 4.0)}
    assert study.convergence([{"step": 8, "epoch": 1.0, "loss": 3.0}], (0.5,)) == {}
    assert study.mean_spread([0.2, 0.4, None]) == "0.3000 ± 0.1000" and study.mean_spread([None]) == "-"
    epochs, mean, low, high = study.band([{1: (0.5, 1.0), 2: (1.0, 3.0)}, {1: (0.5, 3.0)}])
    for got, expected in ((epochs, [0.5, 1.0]), (mean, [2.0, 3.0]), (low, [1.0, 3.0]), (high, [3.0, 3.0])):
        np.testing.assert_array_equal(got, expected)

    def result(group, seed, status, wall, evals):
        return study.Result(study.Run(group, seed, Path("/x"), ()), status, wall, evals, [])

    text = study.tables([result("a", 0, "finished", 100.0, rows),
                         result("a", 1, "finished", 140.0, [{"step": 8, "epoch": 1.0, "AP": 0.4}]),
                         result("b", 0, "not started", None, [])], (0.5, 0.75, 0.9))
    assert "| a | 0 | finished | 5 | 0.5500 | 0.6000 | 4 | 2 | 3 | 4 | 1m40s |" in text
    assert "| b | 0 | not started | 0 | - | - | - | - | - | - | - |" in text
    # final 0.55 and 0.4, best 0.6 and 0.4; epochs (2, 3, 4) and (1, 1, 1); wall 100 and 140 s
    assert "| a | 2/2 | 0.4750 ± 0.0750 | 0.5000 ± 0.1000 | 1.50 ± 0.50 | 2.00 ± 1.00 | 2.50 ± 1.50 | " \
           "120 ± 20 s |" in text
    assert "| b | 0/1 | - | - | - | - | - | - |" in text


def study_config(**fields):
    return ml_collections.ConfigDict({"groups": [dict(name="a", config=TINY)], **fields})


@pytest.mark.parametrize("fields, message", [
    (dict(groups=[dict(name="a", config=TINY, overrides={"train.num_stepz": 4})]),
     r"s.py: groups\[0\].overrides: 'train.num_stepz': configs/synthetic.py:tiny has no field 'train.num_stepz'"),
    (dict(overrides={"train": {"num_steps": 4.5}}), r"s.py: groups\[0\].overrides: 'train.num_steps': .*float"),
    (dict(groups=[dict(name="a", config=TINY), dict(name="a", config=TINY)]),
     r"groups\[1\].name: 'a' is the name of an earlier group too"),
    (dict(groups=[dict(name="a", config="configs/synthetic.py:tiniest")]), r"groups\[0\].config: .*unknown variant"),
    (dict(groups=[dict(name="a", config=TINY, overrides={"model.hidden_dim": 30})]),
     r"groups\[0\]: configs/synthetic.py:tiny with its overrides: .*hidden_dim = 30"),
    (dict(seeds=(0, 0)), r"s.py: seeds: \(0, 0\): expected a non-empty tuple of distinct integers"),
    (dict(fractions=(0.5, 1.5)), r"fractions: .*numbers in \(0, 1\]"),
    (dict(seed=(0,)), r"s.py: seed: unknown field"),
])
def test_study_config_mistakes_name_the_file_and_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        study.checked(study_config(**fields), "s.py")


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "detr_jax.study", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_help():
    result = run("--help")
    assert result.returncode == 1 and "--print_commands" in result.stdout and "Traceback" not in result.stdout


def write_study(path: Path, data_dir: Path, steps: int) -> Path:
    """A study of the tiny config, 1 group x seeds 0, 1, its data and compilation cache beside ``path``."""
    path.write_text(f'''import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        groups=[dict(name="tiny", config="{TINY}", overrides={{"train.num_steps": {steps}}})],
        seeds=(0, 1),
        fractions=(0.5, 0.9),
        overrides=dict(data=dict(data_dir="{data_dir}"), train=dict(
            eval_at_end=True, log_every_steps=2, compilation_cache_dir="{data_dir.parent / 'cache'}")),
    ))
''')
    return path


def test_print_commands(tmp_path):
    config = write_study(tmp_path / "study_tiny.py", tmp_path / "data", steps=4)
    result = run(f"--config={config}", f"--workdir={tmp_path / 'study'}", "--print_commands",
                 "--config.overrides.train.log_every_steps=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"cd {REPO} && {sys.executable} train.py --config={TINY} --workdir={tmp_path / 'study/runs/tiny'}/seed_{s} "
        f"--config.train.seed={s} --config.data.data_dir={tmp_path / 'data'} "
        f"--config.train.compilation_cache_dir={tmp_path / 'cache'} --config.train.eval_at_end=True "
        f"--config.train.log_every_steps=1 --config.train.num_steps=4" for s in (0, 1)]
    assert not (tmp_path / "study").exists()


def files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The tiny grid (seeds 0 and 1) started, SIGKILLed (its process group: the study and train.py)
    once seed 1's train.py has written its first line, reported (what --report_only does, in this process), then run
    again to its end. -> (workdir, seed 0's files after the kill, the partial report, the result of
    the second study command)."""
    tmp = tmp_path_factory.mktemp("study")
    config, workdir = write_study(tmp / "study_tiny.py", tmp / "data", steps=4), tmp / "study"
    second = workdir / "runs" / "tiny" / "seed_1"
    process = subprocess.Popen([sys.executable, "-m", "detr_jax.study", f"--config={config}", f"--workdir={workdir}"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not ((second / study.LOG).exists() and len((second / study.LOG).read_text().splitlines()) > 1):
        assert process.poll() is None and time.time() < deadline, "the study ended before its second run began"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = files(workdir / "runs" / "tiny" / "seed_0")
    loaded = study.load_study(study.load_config(str(config)), str(config), workdir)
    report = study.write_report(loaded, workdir, log=lambda line: None)
    return workdir, first, report, run(f"--config={config}", f"--workdir={workdir}")


def test_report_while_a_run_is_unfinished(interrupted):
    workdir, _, report, _ = interrupted
    assert "| tiny | 0 | finished | 1 |" in report
    assert "| tiny | 1 | unfinished | 0 | - |" in report and "| tiny | 1/2 |" in report


def test_grid_resumed_after_a_kill(interrupted):
    workdir, first, _, result = interrupted
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "study: run 1/2 tiny seed 0: finished before (" in out and "), skipped" in out
    assert "study: run 2/2 tiny seed 1: attempt 2, resuming (log " in out and "ETA " in out
    assert "study: run 2/2 tiny seed 1: finished in " in out
    runs = workdir / "runs" / "tiny"
    assert files(runs / "seed_0") == first  # not run again: marker, log and history as they were
    marker = json.loads((runs / "seed_0" / study.MARKER).read_text())
    assert marker["finished"] and len(marker["attempts"]) == 1
    marker = json.loads((runs / "seed_1" / study.MARKER).read_text())
    killed, resumed = marker["attempts"]
    assert marker["finished"] and killed["returncode"] is None and resumed["returncode"] == 0
    assert killed["seconds"] > 0 and resumed["seconds"] > 0  # the killed one: until its log's last line
    assert (runs / "seed_1" / study.LOG).read_text().count("=== study attempt") == 2
    table = (workdir / "study.md").read_text()
    assert table in out
    for seed in (0, 1):
        evals = study.read_history(runs / f"seed_{seed}" / "history" / "eval.jsonl")
        assert [e["step"] for e in evals] == [4]
        ap = f"{evals[0]['AP']:.4f}"
        assert f"| tiny | {seed} | finished | 1 | {ap} | {ap} | 0.5 | 0.5 | 0.5 |" in table
    assert "| tiny | 2/2 |" in table
    assert {p.name for p in (workdir / "plots").iterdir()} == {"ap.png", "loss.png"}
    assert "![AP](plots/ap.png)" in table and "![loss](plots/loss.png)" in table


@pytest.mark.parametrize("name", ["study_cpu", "study_schedules", "study_norm", "study_decoders"])
def test_shipped_study_configs_load_and_validate(name, tmp_path):
    """Every group of every shipped study config loads, takes its overrides and validates (no run)."""
    module = study.load_config(f"configs/{name}.py")  # a study config is a config file too
    runs = study.load_study(module, f"configs/{name}.py", tmp_path).runs
    assert len(runs) == len(module.groups) * len(module.seeds) >= 2
    assert all(run.args[1].startswith("--config=configs/") for run in runs)
