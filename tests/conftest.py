"""Shared test helpers: the tiny model config and the official reference dump."""
import os
import sys
from pathlib import Path

import pytest

from detr_jax.config import model_config

REPO = Path(__file__).resolve().parents[1]

# A model small enough to compile in a second or two on CPU; same code paths as DETR-R50.
TINY = dict(backbone="resnet_tiny", num_classes=5, num_queries=10, hidden_dim=32, num_heads=4,
            num_encoder_layers=2, num_decoder_layers=3, ffn_dim=64, dropout=0.1)


def tiny_config(**overrides):
    return model_config(**{**TINY, **overrides})


def reference_dir() -> Path:
    """../shared/reference (or $DETR_JAX_REFERENCE): the official DETR-R50 output dump."""
    candidates = [Path(os.environ["DETR_JAX_REFERENCE"])] if "DETR_JAX_REFERENCE" in os.environ else []
    candidates += [REPO.parent / "shared" / "reference", REPO / "shared" / "reference"]
    for path in candidates:
        if (path / "detr_r50_official_ref.npz").exists():
            return path
    raise FileNotFoundError(f"official reference not found in {[str(c) for c in candidates]}; "
                            "set DETR_JAX_REFERENCE to the folder holding detr_r50_official_ref.npz")


@pytest.fixture(scope="session")
def reference():
    """(official_weights module, reference arrays, the seed-2024 official state_dict)."""
    path = reference_dir()
    sys.path.insert(0, str(path))
    import official_weights

    ref = official_weights.load_reference(path / "detr_r50_official_ref.npz")
    state_dict = official_weights.make_state_dict(int(ref["weights_seed"]))
    assert official_weights.weights_sha256(state_dict) == str(ref["weights_sha256"])
    return official_weights, ref, state_dict


def reference_outputs(ref, suffix=""):
    """The official model's outputs in the reference dump as a model output dict."""
    return {"pred_logits": ref["pred_logits" + suffix], "pred_boxes": ref["pred_boxes" + suffix],
            "aux_outputs": [{"pred_logits": ref["aux_pred_logits" + suffix][l],
                             "pred_boxes": ref["aux_pred_boxes" + suffix][l]} for l in range(5)]}


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
