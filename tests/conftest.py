"""Shared test helpers: the tiny model config, the environment of multi-device subprocesses, the
official reference dump."""
import os
from pathlib import Path

import pytest

from detr_jax.config import model_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

# A model small enough to compile in a second or two on CPU; same code paths as DETR-R50.
TINY = dict(backbone="resnet_tiny", num_classes=5, num_queries=10, hidden_dim=32, num_heads=4,
            num_encoder_layers=2, num_decoder_layers=3, ffn_dim=64, dropout=0.1)


def devices_env(devices: int, **extra) -> dict:
    """os.environ for a subprocess with ``devices`` simulated CPU devices."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def tiny_config(**overrides):
    return model_config(**{**TINY, **overrides})


def pytest_addoption(parser):
    parser.addoption("--multihost", choices=("quick", "full"), default="quick",
                     help="tests/test_multihost.py's matrix. quick (the suite's, about 5 minutes): 2x2 against 1x4 "
                          "and a SIGTERM stop resumed from 2 processes on 1, 2 buckets, 8 steps. full (about 13 "
                          "minutes): also 2x1 against 1x2 and a resume from 1 process on 2, 3 buckets, 12 steps.")


def pytest_configure(config):
    config.addinivalue_line("markers", "multihost_full: run only with --multihost=full (deselected otherwise)")


def pytest_collection_modifyitems(config, items):
    """Without --multihost=full, the full-matrix-only tests are deselected (reported as such)."""
    if config.getoption("--multihost") == "full":
        return
    deselected = [item for item in items if item.get_closest_marker("multihost_full")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("multihost_full")]


@pytest.fixture(scope="session")
def reference():
    """(official_layout module, the official DETR-R50 dump, its official-layout state_dict).

    The dump is tests/data/official_r50.npz and official_r50_features.npz (made by
    tests/data/make_official_ref.py, whose docstring lists the keys), plus its input batch
    regenerated from the seed: ``images`` [2, 3, 192, 224] float32 and ``masks`` [2, 192, 224]."""
    import official_layout

    ref = {**official_layout.load_npz(DATA / "official_r50.npz"),
           **official_layout.load_npz(DATA / "official_r50_features.npz")}
    ref["images"], ref["masks"] = official_layout.noise_batch(int(ref["image_seed"]), ref["image_sizes"])
    assert official_layout.array_sha256(ref["images"]) == str(ref["images_sha256"])
    state_dict = official_layout.make_state_dict(int(ref["weights_seed"]))
    assert official_layout.weights_sha256(state_dict) == str(ref["weights_sha256"])
    return official_layout, ref, state_dict


def reference_outputs(ref, suffix=""):
    """The official model's outputs in the reference dump as a model output dict."""
    return {"pred_logits": ref["pred_logits" + suffix], "pred_boxes": ref["pred_boxes" + suffix],
            "aux_outputs": [{"pred_logits": ref["aux_pred_logits" + suffix][l],
                             "pred_boxes": ref["aux_pred_boxes" + suffix][l]} for l in range(5)]}


def assert_official_matching(matched, ref):
    """matched [L, B, M] (``detr_jax.matching.match``): every layer's (query, target) pairs equal the
    reference's ``match/L{l}/img{i}_src`` and ``_tgt``."""
    import numpy as np

    from detr_jax.matching import index_pairs

    for layer in range(matched.shape[0]):
        for i, (src, tgt) in enumerate(index_pairs(matched[layer])):
            np.testing.assert_array_equal(src, ref[f"match/L{layer}/img{i}_src"], err_msg=f"L{layer} img{i}")
            np.testing.assert_array_equal(tgt, ref[f"match/L{layer}/img{i}_tgt"], err_msg=f"L{layer} img{i}")


def reference_targets(ref, max_boxes=6):
    """The reference's 5 + 3 targets padded to ``max_boxes`` columns (labels, boxes, box_valid)."""
    import numpy as np

    labels = np.zeros((2, max_boxes), np.int32)
    boxes = np.zeros((2, max_boxes, 4), np.float32)
    valid = np.zeros((2, max_boxes), bool)
    for i in range(2):
        n = len(ref[f"tgt{i}_labels"])
        labels[i, :n], boxes[i, :n], valid[i, :n] = ref[f"tgt{i}_labels"], ref[f"tgt{i}_boxes"], True
    return {"labels": labels, "boxes": boxes, "box_valid": valid}
