"""The official PyTorch DETR-R50 run on tests/official_layout.py's weights: the reference of the parity
tests (tests/test_parity.py, test_matching.py, test_losses.py, test_eval_coco.py, test_convert.py).

Environment (CPU torch, no GPU, nothing downloaded at run time) and an unmodified export of
facebookresearch/detr (commit 29901c5 here):

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 numpy scipy pillow packaging pycocotools
  /tmp/torchenv/bin/pip install --no-deps torchvision==0.28.0
  git clone https://github.com/facebookresearch/detr /tmp/official_detr && git -C /tmp/official_detr checkout 29901c5
  /tmp/torchenv/bin/python tests/data/make_official_ref.py --official=/tmp/official_detr

It writes tests/data/official_r50.npz and official_r50_features.npz (``np.savez_compressed``, no
pickles). The model is ``build_model`` with main.py's defaults (``--device cpu``), in eval mode (no
dropout), weights ``official_layout.make_state_dict(WEIGHTS_SEED)`` loaded with ``strict=True``.
Inputs: ``official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)`` (not stored: the tests regenerate
them, ``images_sha256`` checks); targets: ``targets(seed)``, the seed of TARGET_SEEDS whose smallest
matching margin is largest. Conventions: images NCHW, masks True on padding, boxes (cx, cy, w, h)
in [0, 1] of the unpadded image, labels raw class indices (logit 91 = no object).

official_r50.npz:
  pred_logits [2, 100, 92], pred_boxes [2, 100, 4]     final decoder layer, float32
  aux_pred_logits [5, 2, 100, 92], aux_pred_boxes       decoder layers 0..4
  <those four>_f64                                      the same model and inputs in float64
                                                        (``model.double()``), stored as float32
  tgt{i}_labels [n_i] int64, tgt{i}_boxes [n_i, 4]      targets (n = 5, 3)
  match/L{l}/img{i}_src, _tgt [n_i] int64               HungarianMatcher (query, target) indices of
                                                        layer l (L0..L4 aux, L5 final)
  match/L5/img{i}_C [100, n_i]                          the cost matrix it solved (float32)
  match_margin/L{l}/img{i}                              second-best minus best assignment cost (f64)
  loss/<name>, weight/<name>, loss_total                every SetCriterion output (float32 values),
                                                        weight_dict, sum of loss * weight
  post_scores, post_labels [2, 100], post_boxes [2, 100, 4]   PostProcess, target_sizes = image_sizes
  grad/<key>                                            d loss_total / d parameter, for GRAD_KEYS
                                                        (of a large one, its first output channels)
  weights_seed, weights_sha256, image_seed, image_sizes [2, 2] (h, w), images_sha256, target_seed,
  layout_sha256/{r50, r101, r50_classes20}              official_layout.layout_sha256 of the
                                                        official model's state_dict layout
  spec                                                  what was run
official_r50_features.npz (the intermediates, float32):
  feat_src [2, 2048, h, w], feat_mask [2, h, w]         layer4 output and its mask (nearest resize)
  pos [2, 256, h, w], proj_src [2, 256, h, w]           sine position embedding, input_proj(feat_src)
  memory [2, 256, h, w]                                 encoder output
  hs [2, 2, 100, 256], hs_layers [2]                   decoder outputs of layers HS_LAYERS (0 and 5),
                                                        after the final decoder norm
"""
import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import official_layout  # noqa: E402
from make_padding_ref import import_official  # noqa: E402

WEIGHTS_SEED, IMAGE_SEED = 2024, 7
IMAGE_SIZES = ((192, 160), (145, 224))  # (h, w); padded to 192 x 224, feature map 6 x 7
TARGET_SEEDS = range(40)
HS_LAYERS = [0, 5]  # decoder layers whose outputs are stored (the others reach the tests through aux_*)
# d loss_total / d parameter is stored for these parameters, from the class head down to the strided
# conv of layer3 (its first 16 output channels: the layer is large). Deeper (layer2), float32 noise in
# the backward pass (ReLUs whose input is within rounding of 0) reaches several 1e-3 of the scale.
GRAD_KEYS = {"backbone.0.body.layer3.0.conv2.weight": 16, "input_proj.bias": None,
             "transformer.encoder.layers.0.self_attn.in_proj_bias": None,
             "transformer.encoder.layers.5.norm2.weight": None,
             "transformer.decoder.layers.0.multihead_attn.in_proj_bias": None,
             "transformer.decoder.layers.3.linear2.bias": None, "transformer.decoder.norm.weight": None,
             "class_embed.bias": None, "bbox_embed.layers.0.bias": None, "bbox_embed.layers.2.weight": None,
             "query_embed.weight": None}


def targets(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels [n] int64 in 0..90, boxes [n, 4] float32 cx cy w h) for n = 5, 3."""
    r = np.random.RandomState(seed)
    return [(r.randint(0, 91, n), np.concatenate([r.uniform(0.2, 0.8, (n, 2)), r.uniform(0.05, 0.4, (n, 2))],
                                                 1).astype(np.float32)) for n in (5, 3)]


def margin(cost: np.ndarray) -> float:
    """Second-best minus best assignment cost of a [queries, targets] matrix (float64): the best
    assignment that avoids one of the optimal pairs."""
    from scipy.optimize import linear_sum_assignment

    cost = cost.astype(np.float64)
    rows, cols = linear_sum_assignment(cost)
    best, second = cost[rows, cols].sum(), np.inf
    for r, c in zip(rows, cols):
        banned = cost.copy()
        banned[r, c] = np.inf
        r2, c2 = linear_sum_assignment(banned)
        second = min(second, banned[r2, c2].sum())
    return float(second - best)


def store_matching(out: dict, tgts: list, matched: list, cost_dtype=np.float32) -> None:
    """tgt{i}_*, match/L{l}/img{i}_src / _tgt, match_margin/L{l}/img{i} and the last layer's cost matrices
    match/L{l}/img{i}_C (as ``cost_dtype``) from the torch targets and ``matched``: per decoder layer
    (the last one final), (the matcher's indices per image, the cost matrix it solved per image)."""
    for i, t in enumerate(tgts):
        out[f"tgt{i}_labels"], out[f"tgt{i}_boxes"] = t["labels"].numpy(), t["boxes"].numpy()
    for layer, (indices, costs) in enumerate(matched):
        for i, ((src, tgt), cost) in enumerate(zip(indices, costs)):
            out[f"match/L{layer}/img{i}_src"], out[f"match/L{layer}/img{i}_tgt"] = src.numpy(), tgt.numpy()
            out[f"match_margin/L{layer}/img{i}"] = np.float64(margin(cost))
            if layer == len(matched) - 1:
                out[f"match/L{layer}/img{i}_C"] = cost.astype(cost_dtype)


def layout(build_model, get_args_parser, *argv) -> dict:
    """The official model's {key: shape} for main.py's defaults plus ``argv``."""
    model = build_model(get_args_parser().parse_args(["--device", "cpu", *argv]))[0]
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def store_outputs(out: dict, layers: list, suffix: str = "") -> None:
    """layers: the official outputs of decoder layers 0..5 -> pred_* (layer 5) and aux_pred_*, float32."""
    for key in ("pred_logits", "pred_boxes"):
        out[key + suffix] = layers[-1][key].detach().numpy().astype(np.float32)
        out[f"aux_{key}{suffix}"] = np.stack([o[key].detach().numpy() for o in layers[:-1]]).astype(np.float32)


def store_losses(out: dict, model, criterion, outputs: dict, targets: list, grad_keys: dict) -> dict:
    """Every SetCriterion output (``loss/<name>``), the weight_dict (``weight/<name>``), ``loss_total``
    (their weighted sum) and, after its backward pass, ``grad/<key>`` (of the first ``rows`` rows,
    None = all) for ``grad_keys`` {key: rows}; returns the model's named parameters."""
    losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    parameters = dict(model.named_parameters())
    out.update({f"grad/{k}": parameters[k].grad.numpy()[:rows].copy() for k, rows in grad_keys.items()})
    out.update({f"loss/{k}": np.float64(v.item()) for k, v in losses.items()})
    out.update({f"weight/{k}": np.float64(w) for k, w in criterion.weight_dict.items()})
    out["loss_total"] = np.float64(total.item())
    return parameters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="an export of facebookresearch/detr")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch, build_model, get_args_parser = import_official(args.official)
    torch.set_num_threads(args.threads)
    import models.matcher
    from util.misc import NestedTensor

    out = {"weights_seed": np.int64(WEIGHTS_SEED), "image_seed": np.int64(IMAGE_SEED),
           "image_sizes": np.array(IMAGE_SIZES, np.int64)}
    for name, argv, kwargs in (("r50", [], {}), ("r101", ["--backbone", "resnet101"], {"backbone": "resnet101"}),
                               ("r50_classes20", ["--dataset_file", "voc"], {"num_classes": 20})):
        official = layout(build_model, get_args_parser, *argv)
        assert list(official.items()) == list(official_layout.state_dict_shapes(**kwargs).items()), name
        out[f"layout_sha256/{name}"] = np.str_(official_layout.layout_sha256(official))

    model, criterion, postprocessors = build_model(get_args_parser().parse_args(["--device", "cpu"]))
    state_dict = official_layout.make_state_dict(WEIGHTS_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    out["weights_sha256"] = np.str_(official_layout.weights_sha256(state_dict))
    images, masks = official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)
    out["images_sha256"] = np.str_(official_layout.array_sha256(images))
    samples = NestedTensor(torch.from_numpy(images), torch.from_numpy(masks))

    captured = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: captured.update(
                 feat_src=o[0][-1].tensors, feat_mask=o[0][-1].mask, pos=o[1][-1])),
             model.input_proj.register_forward_hook(lambda m, i, o: captured.update(proj_src=o)),
             model.transformer.register_forward_hook(lambda m, i, o: captured.update(hs=o[0][HS_LAYERS,], memory=o[1]))]
    outputs = model(samples)  # float32, with gradients
    for hook in hooks:
        hook.remove()
    features = {k: v.detach().numpy() for k, v in captured.items()}
    features["hs_layers"] = np.array(HS_LAYERS, np.int64)
    layers = [*outputs["aux_outputs"], outputs]  # L0..L4, L5
    store_outputs(out, layers)

    solved = []
    real_lsa = models.matcher.linear_sum_assignment
    models.matcher.linear_sum_assignment = lambda c: (solved.append(np.asarray(c)), real_lsa(c))[1]

    def match(seed):
        """(targets, [(indices per image, cost matrices per image)] per layer, smallest margin)."""
        tgts = [{"labels": torch.from_numpy(l), "boxes": torch.from_numpy(b)} for l, b in targets(seed)]
        result = []
        for o in layers:
            solved.clear()
            result.append((criterion.matcher({k: o[k].detach() for k in ("pred_logits", "pred_boxes")}, tgts),
                           list(solved)))
        return tgts, result, min(margin(c) for _, costs in result for c in costs)

    target_seed = max(TARGET_SEEDS, key=lambda s: match(s)[2])
    tgts, matched, smallest = match(target_seed)
    out["target_seed"] = np.int64(target_seed)
    store_matching(out, tgts, matched)
    print(f"target seed {target_seed}: smallest matching margin {smallest:.4f}")

    store_losses(out, model, criterion, outputs, tgts, GRAD_KEYS)
    with torch.no_grad():
        post = postprocessors["bbox"](outputs, torch.as_tensor(IMAGE_SIZES))
        out.update({f"post_{k}": np.stack([p[k].numpy() for p in post]) for k in ("scores", "labels", "boxes")})
        f64 = model.double()(NestedTensor(samples.tensors.double(), samples.mask))
    store_outputs(out, [*f64["aux_outputs"], f64], "_f64")
    out["spec"] = np.str_(f"official DETR (main.py defaults, eval mode, CPU, {args.threads} thread(s)), "
                          f"torch {torch.__version__}; see tests/data/make_official_ref.py")
    for name, arrays in (("official_r50.npz", out), ("official_r50_features.npz", features)):
        path = args.out / name
        np.savez_compressed(path, **arrays)
        print(f"wrote {path} ({path.stat().st_size:,} bytes, {len(arrays)} arrays)")
    gaps = {k: np.abs(out[k] - out[k + "_f64"]).max() for k in ("pred_logits", "pred_boxes", "aux_pred_logits",
                                                                "aux_pred_boxes")}
    print("float32 vs float64: " + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    print("losses: " + ", ".join(f"{k[5:]} {float(v):.4f}" for k, v in out.items() if k.startswith("loss/")))


if __name__ == "__main__":
    main()
