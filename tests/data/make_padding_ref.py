"""Per-image outputs of the official PyTorch DETR, each image run alone and unpadded: the reference
of tests/test_padding_official.py ("exact" padding must reproduce them from any canvas and batch).

Run with a torch environment (torch, torchvision; no GPU, no download) and an unmodified export of
facebookresearch/detr:

  python tests/data/make_padding_ref.py --official=/path/to/detr

(tests/data/make_official_ref.py's docstring gives the exact environment commands.) It writes
tests/data/padding_ref_r50.npz and padding_ref_r101_dc5.npz. Weights:
``official_layout.make_state_dict(2024, backbone=...)`` (tests/official_layout.py). Images:
``image_array(seed, h, w)`` for ``IMAGES`` (N(0, 1) noise standing in for normalised pixels). Each
file holds, for image i: ``pred_logits/i``, ``pred_boxes/i`` (final decoder layer, float32),
``pred_logits_f64/i``, ``pred_boxes_f64/i`` (the same model and image in float64, ``model.double()``),
``feature_hw/i`` (the official backbone's feature size), plus ``image_sizes``, ``image_seeds``,
``weights_seed``, ``weights_sha256``, ``spec``.

Runtime shims, no official file edited: ``datasets`` and ``engine`` are stubbed (main.py imports them;
only its argument parser is used); ``models.backbone.is_main_process`` returns False so that the ResNet
is built without downloading ImageNet weights; the torchvision wheel's C ops are absent, so the two
operator schemas torchvision's meta registrations need at import (nms, qnms) are declared first.
"""
import argparse
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import official_layout  # noqa: E402

IMAGES = ((0, 97, 131), (1, 128, 95), (2, 113, 150))  # (seed, h, w): odd sizes and different shapes
WEIGHTS_SEED = 2024
MODELS = {"r50": dict(backbone="resnet50", dilation=False), "r101_dc5": dict(backbone="resnet101", dilation=True)}


def image_array(seed: int, h: int, w: int) -> np.ndarray:
    """The test image: [h, w, 3] float32 N(0, 1) (NHWC, as detr-jax takes it)."""
    return np.random.RandomState(seed).standard_normal((h, w, 3)).astype(np.float32)


def import_official(official: Path):
    """(torch, models.build_model, main.get_args_parser) from an official DETR export, with the shims."""
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401  (after the schemas)

    sys.path.insert(0, str(official))
    sys.modules["datasets"] = types.SimpleNamespace(build_dataset=None, get_coco_api_from_dataset=None)
    sys.modules["engine"] = types.SimpleNamespace(evaluate=None, train_one_epoch=None)
    import models.backbone
    from main import get_args_parser
    from models import build_model

    models.backbone.is_main_process = lambda: False
    return torch, build_model, get_args_parser


def run_model(torch, build_model, get_args_parser, name: str) -> dict:
    """Every image of IMAGES alone through the official model ``name``, in float32 and float64."""
    options = MODELS[name]
    argv = ["--device", "cpu", "--backbone", options["backbone"]] + (["--dilation"] if options["dilation"] else [])
    args = get_args_parser().parse_args(argv)
    model, _, _ = build_model(args)
    state_dict = official_layout.make_state_dict(WEIGHTS_SEED, backbone=options["backbone"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    out = {"weights_seed": np.int64(WEIGHTS_SEED),
           "weights_sha256": np.str_(official_layout.weights_sha256(state_dict)),
           "image_sizes": np.array([(h, w) for _, h, w in IMAGES], np.int64),
           "image_seeds": np.array([s for s, _, _ in IMAGES], np.int64),
           "spec": np.str_(f"official DETR {options}, main.py defaults, eval mode, each image alone and unpadded; "
                           f"torch {torch.__version__}")}
    for i, (seed, h, w) in enumerate(IMAGES):
        image = torch.from_numpy(image_array(seed, h, w).transpose(2, 0, 1).copy())
        features = []
        hook = model.backbone[0].body.register_forward_hook(lambda m, x, y: features.append(y["0"].shape[-2:]))
        with torch.no_grad():
            f32 = model([image])
            hook.remove()
            f64 = model.double()([image.double()])
            model.float()
        out[f"feature_hw/{i}"] = np.array(features[0], np.int64)
        for key in ("pred_logits", "pred_boxes"):
            out[f"{key}/{i}"] = f32[key][0].numpy()
            out[f"{key}_f64/{i}"] = f64[key][0].numpy()
        gap = [np.abs(out[f"{k}/{i}"] - out[f"{k}_f64/{i}"]).max() for k in ("pred_logits", "pred_boxes")]
        print(f"{name} image {i} ({h}x{w}): features {tuple(features[0])}, float32 vs float64 logits "
              f"{gap[0]:.2e}, boxes {gap[1]:.2e}", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="an export of facebookresearch/detr")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch, build_model, get_args_parser = import_official(args.official)
    torch.set_num_threads(args.threads)
    for name in MODELS:
        arrays = run_model(torch, build_model, get_args_parser, name)
        path = args.out / f"padding_ref_{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
