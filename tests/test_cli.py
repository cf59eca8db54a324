"""The command-line entry points, run as a user runs them."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, TINY, tiny_config
from detr_jax import build_model
from detr_jax.checkpoint import load_variables
from detr_jax.config import init_config
from detr_jax.convert import to_official_state_dict
from detr_jax.errors import ConfigError
from detr_jax.evaluation.checkpoints import load_for_eval
from detr_jax.training import initial_variables


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def tiny_overrides(**changes):
    return [f"--config.model.{k}={v}" for k, v in {**TINY, **changes}.items()]


@pytest.mark.parametrize("entry", [["-m", "detr_jax.convert"], ["train.py"], ["eval.py"]])
def test_help(entry):
    result = run(*entry, "--help")
    # absl prints the flags to stdout and exits with status 1 after --help (its convention)
    assert result.returncode == 1 and not result.stderr, result.stderr
    assert "--config: Config file[:variant]" in result.stdout and "Traceback" not in result.stdout


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    config = tiny_config()
    model = build_model(config)
    x, m = np.random.RandomState(0).standard_normal((1, 64, 96, 3)).astype(np.float32), np.zeros((1, 64, 96), bool)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    path = tmp_path_factory.mktemp("official") / "tiny.npz"
    np.savez(path, **to_official_state_dict(variables, config))
    return path, model.apply(variables, x, m), (x, m)


def test_convert_official_checkpoint(tmp_path, tiny_official):
    path, expected, inputs = tiny_official
    out = tmp_path / "converted"
    result = run("-m", "detr_jax.convert", "--config=configs/detr_coco.py:r50", *tiny_overrides(),
                 f"--input={path}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "orbax" not in result.stderr and "xla_bridge" not in result.stderr  # no library chatter (was ~40 lines)
    assert ("assumed architecture (config.model, recorded in model_config.json, checked at every load): resnet_tiny, "
            "2 + 3 layers, post-norm, detr decoder, softmax classification, 10 queries, 5 classes.") in result.stdout
    variables, model_config = load_variables(out)
    assert model_config.backbone == "resnet_tiny" and model_config.num_classes == 5
    got = build_model(model_config).apply(variables, *inputs)
    np.testing.assert_allclose(got["pred_logits"], expected["pred_logits"], rtol=1e-6, atol=1e-6)
    # never overwrites
    again = run("-m", "detr_jax.convert", "--config=configs/detr_coco.py:r50", *tiny_overrides(),
                f"--input={path}", f"--output={out}")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    # the same weights taken for another variant (DC5 has the same keys and shapes): refused at load
    dc5 = tiny_config(dilation=True)
    with pytest.raises(ConfigError, match=r"converted for another model than --config's: dilation False -> True"):
        load_for_eval(str(out), workdir=tmp_path, model_config=dc5)
    config = ml_collections.ConfigDict({"model": dc5, "init": init_config(checkpoint=str(out))})
    with pytest.raises(ConfigError, match=r"was converted for another model: dilation False -> True"):
        initial_variables(config, build_model(dc5), jax.random.PRNGKey(0))


def test_convert_errors_and_fine_tuning(tmp_path, tiny_official):
    path, _, _ = tiny_official
    args = ["-m", "detr_jax.convert", "--config=configs/detr_coco.py:r50", *tiny_overrides(num_classes=3),
            f"--input={path}"]
    mismatch = run(*args, f"--output={tmp_path / 'a'}")
    assert mismatch.returncode != 0 and "drop_class_head" in mismatch.stderr
    assert not (tmp_path / "a").exists()
    fine_tune = run(*args, f"--output={tmp_path / 'b'}", "--drop_class_head")
    assert fine_tune.returncode == 0, fine_tune.stderr
    variables, model_config = load_variables(tmp_path / "b")
    assert model_config.num_classes == 3 and variables["params"]["class_embed"]["kernel"].shape == (32, 4)


def test_convert_torchvision_backbone(tmp_path, tiny_official):
    path, _, _ = tiny_official
    official = dict(np.load(path))
    prefix = "backbone.0.body."
    torchvision = {k[len(prefix):]: v for k, v in official.items() if k.startswith(prefix)}
    np.savez(tmp_path / "resnet_tiny.npz", **torchvision)
    result = run("-m", "detr_jax.convert", "--config=configs/detr_coco.py:r50", *tiny_overrides(),
                 f"--input={tmp_path / 'resnet_tiny.npz'}", f"--output={tmp_path / 'c'}", "--source=torchvision")
    assert result.returncode == 0, result.stderr
    variables, _ = load_variables(tmp_path / "c")
    np.testing.assert_array_equal(variables["params"]["backbone"]["conv1"]["kernel"],
                                  official[prefix + "conv1.weight"].transpose(2, 3, 1, 0))
