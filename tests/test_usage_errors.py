"""Operator mistakes: each gets one ``error: ...`` line naming the flag, field or folder, and exit
status 2, before any work (the config validator, the flag parser, the workdir lock)."""
import runpy
import subprocess
import sys

import pytest

from conftest import REPO, devices_env
from detr_jax import workdir_lock
from detr_jax.config import data_config
from detr_jax.errors import ConfigError, WorkdirInUse
from detr_jax.validation import validate

TINY = ["train.py", "--config=configs/synthetic.py:tiny"]


def run(*args, devices=1):
    env = devices_env(devices)
    process = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return process.returncode, process.stdout, process.stderr


def error_line(stderr: str) -> str:
    """The one error line, with nothing but library start-up chatter before it."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# (the mistake, flags after train.py --config=configs/synthetic.py:tiny --workdir=W, the message)
MISTAKES = [
    ("a typo in a field", ["--config.optim.lrr=1"],
     """error: --config.optim.lrr=1: the config has no field 'lrr'. Did you mean "lr" instead of "lrr"?"""),
    ("a typo in a section", ["--config.optimm.lr=1"],
     """error: --config.optimm.lr=1: the config has no field 'optimm'. Did you mean "optim" instead of "optimm"?"""),
    ("a wrong enum", ["--config.model.classification=softmx"],
     "error: the config has a problem: config.model.classification = 'softmx': expected one of 'softmax', "
     "'sigmoid_focal'"),
    ("a wrong type", ["--config.train.batch_size=four"],
     "error: flag --config.train.batch_size=four: invalid literal for int() with base 10: 'four'"),
    ("a batch the devices cannot split", ["--config.train.batch_size=3"],
     "error: config.train.batch_size = 3: expected a multiple of the number of devices (2)"),
    ("heads that do not divide the width", ["--config.model.num_heads=3"],
     "error: the config has a problem: config.model.hidden_dim = 32: expected an even multiple of "
     "config.model.num_heads (3)"),
    ("several problems at once", ["--config.model.dtype=float16", "--config.data.flip_prob=1.5"],
     "error: the config has 2 problems:"),
    ("an unknown variant", ["--config=configs/synthetic.py:tiniest"],
     "error: flag --config=configs/synthetic.py:tiniest: ValueError: configs/synthetic.py: unknown variant 'tiniest'; "
     "expected [DECODER_]VARIANT with DECODER one of detr, conditional, dab, dn_dab, deformable, deformable_refine, "
     "deformable_two_stage and VARIANT one of demo, tiny, overfit"),
    ("an unknown flag", ["--work_dir=/tmp"], "error: Unknown command line flag 'work_dir'"),
    ("a bucket off the stride", ["--config.data.buckets=((100, 128),)"],
     "error: the config has a problem: config.data.buckets = ((100, 128),): expected (h, w) pairs, positive "
     "multiples of config.data.size_divisor (32)"),
    ("no duration", ["--config.train.num_steps=0", "--config.train.num_epochs=0"],
     "error: the config has a problem: config.train.num_steps = 0 and config.train.num_epochs = 0: expected a "
     "duration (one > 0)"),
]


@pytest.mark.parametrize("mistake,flags,message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_train_mistake_is_one_line_and_exit_2(mistake, flags, message, tmp_path):
    code, _, stderr = run(*TINY, f"--workdir={tmp_path / 'run'}", *flags, devices=2)
    assert code == 2, stderr
    assert error_line(stderr).startswith(message)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_every_problem_is_listed():
    config = {"data": data_config(flip_prob=1.5, source="voc", max_boxes=0)}
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert str(error.value).splitlines() == [
        "the config has 3 problems:",
        "  config.data.source = 'voc': expected one of 'synthetic', 'coco_json', 'tfds', 'coco_panoptic'",
        "  config.data.max_boxes = 0: expected an integer >= 1",
        "  config.data.flip_prob = 1.5: expected a number >= 0 and <= 1"]


def test_the_shipped_configs_are_valid():
    for spec in ("synthetic.py", "synthetic.py:tiny", "synthetic.py:overfit", "synthetic.py:conditional",
                 "synthetic.py:dab_tiny", "detr_coco.py:r50", "detr_coco.py:r101_dc5", "conditional_coco.py:r50_108ep",
                 "dab_coco.py:r50", "deformable_coco.py:deformable", "deformable_coco.py:refine_r101",
                 "deformable_coco.py:two_stage", "synthetic.py:deformable_two_stage_tiny", "finetune.py",
                 "convergence.py"):
        file, _, variant = spec.partition(":")
        validate(runpy.run_path(str(REPO / "configs" / file))["get_config"](variant))


def test_eval_on_a_missing_workdir_writes_nothing(tmp_path):
    code, _, stderr = run("eval.py", "--config=configs/synthetic.py:tiny", f"--workdir={tmp_path / 'nothing'}")
    assert code == 2
    assert error_line(stderr) == (f"error: {tmp_path / 'nothing' / 'checkpoints'}: no such folder; "
                                  f"{tmp_path / 'nothing'} is not a training workdir (train.py --workdir=... writes "
                                  "its checkpoints there)")
    assert not (tmp_path / "nothing").exists()


def test_a_second_run_on_a_held_workdir_stops(tmp_path):
    """While one run holds the workdir, another (here train.py) stops at once with exit 2 and the
    holder named; the lock goes with its holder."""
    with workdir_lock.hold(tmp_path / "run"):
        with pytest.raises(WorkdirInUse, match=r"in use by another run \(pid \d+ on "):
            with workdir_lock.hold(tmp_path / "run"):
                pass
        code, _, stderr = run(*TINY, f"--workdir={tmp_path / 'run'}")
        assert code == 2
        assert error_line(stderr).startswith(f"error: {tmp_path / 'run'} is in use by another run (pid ")
        assert not (tmp_path / "run" / "checkpoints").exists()
    with workdir_lock.hold(tmp_path / "run"):  # released
        pass
