"""padding="exact" against the official PyTorch DETR run on each image alone, unpadded
(tests/data/padding_ref_*.npz, made by tests/data/make_padding_ref.py), for R50 and R101-DC5 with
tests/official_layout.py's generated weights: every image of a padded batch, on several canvases, in batches
of 1 and 3, must give the official outputs within a small multiple of the official model's own
float32-vs-float64 gap. ``pytest -s`` prints the figures (README, Accuracy)."""
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.detr_coco import get_config
from detr_jax import build_model
from detr_jax.convert import from_official_state_dict
from official_layout import make_state_dict, weights_sha256
from test_padding_exact import pad_batch

DATA = Path(__file__).resolve().parent / "data"
CANVASES = ((128, 160), (192, 224))  # the images are up to 128 x 150
GAP_MULTIPLE = 2  # allowed distance to the float64 run, in multiples of official float32's own


def image_array(seed: int, h: int, w: int) -> np.ndarray:
    """tests/data/make_padding_ref.py's image: [h, w, 3] float32 N(0, 1)."""
    return np.random.RandomState(seed).standard_normal((h, w, 3)).astype(np.float32)


def runs(variant: str, padding: str = "exact") -> tuple[dict, dict]:
    """(reference arrays, {(canvas, batch size): [per-image {"pred_logits", "pred_boxes"}]}):
    batch 1 on each canvas' first, batch 3 on every canvas."""
    ref = dict(np.load(DATA / f"padding_ref_{variant}.npz"))
    config = get_config(variant).model
    config.padding = padding
    state_dict = make_state_dict(int(ref["weights_seed"]), backbone=config.backbone)
    assert weights_sha256(state_dict) == str(ref["weights_sha256"])
    variables = from_official_state_dict(state_dict, config)
    apply = jax.jit(build_model(config).apply)
    images = [image_array(s, h, w) for s, (h, w) in zip(ref["image_seeds"], ref["image_sizes"])]
    per_image = lambda out, n: [{k: np.asarray(out[k][i]) for k in ("pred_logits", "pred_boxes")} for i in range(n)]
    results = {(CANVASES[0], 1): [per_image(apply(variables, *pad_batch([x], CANVASES[0])), 1)[0] for x in images]}
    for canvas in CANVASES:
        results[(canvas, 3)] = per_image(apply(variables, *pad_batch(images, canvas)), 3)
    return ref, results


def gaps(ref, results) -> dict:
    """Max |difference| per (canvas, batch) and output: to the official float32 and float64 runs, and
    official float32's own gap to float64 (all images)."""
    out = {}
    for key in ("pred_logits", "pred_boxes"):
        n = len(ref["image_sizes"])
        out[("official f32 vs f64", key)] = max(np.abs(ref[f"{key}/{i}"] - ref[f"{key}_f64/{i}"]).max() for i in range(n))
        for run, outputs in results.items():
            for suffix in ("", "_f64"):
                out[(run, key + suffix)] = max(np.abs(o[key] - ref[f"{key}{suffix}/{i}"]).max()
                                               for i, o in enumerate(outputs))
    return out


@pytest.fixture(scope="module", params=["r50", "r101_dc5"])
def exact(request):
    return request.param, *runs(request.param)


def test_each_image_of_a_padded_batch_gives_the_official_single_image_outputs(exact):
    variant, ref, results = exact
    table = gaps(ref, results)
    for (run, key), value in table.items():
        print(f"{variant} {run} {key}: {value:.2e}")
    for key in ("pred_logits", "pred_boxes"):
        allowed = GAP_MULTIPLE * table[("official f32 vs f64", key)]
        for run in results:
            assert table[(run, key + "_f64")] <= allowed, (run, key)


def test_outputs_agree_across_canvases_and_batches(exact):
    variant, _, results = exact
    first, *others = results.values()
    for key in ("pred_logits", "pred_boxes"):
        spread = max(np.abs(o[key] - f[key]).max() for outputs in others for o, f in zip(outputs, first))
        print(f"{variant} detr-jax against itself across canvases and batches, {key}: {spread:.2e}")
        assert spread <= 1e-4 if key == "pred_logits" else spread <= 1e-5


def test_official_padding_moves_padded_images():
    """The same batches with padding="official" are off the single-image outputs by far more than
    float noise (official padded-batch semantics): what "exact" removes."""
    ref, results = runs("r50", padding="official")
    table = gaps(ref, results)
    for (run, key), value in table.items():
        print(f"r50 padding=official {run} {key}: {value:.2e}")
    assert all(table[(run, "pred_boxes_f64")] > 1e-3 for run in results)
