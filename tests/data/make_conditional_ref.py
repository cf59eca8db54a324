"""The official PyTorch Conditional DETR-R50 run on tests/conditional_layout.py's weights: a
self-contained parity reference (tests/data/conditional_r50.npz).

Environment (CPU torch, no GPU, nothing downloaded at run time) and an unmodified export of
Atten4Vis/ConditionalDETR (commit 8ea7c3f here):

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 numpy scipy pillow
  /tmp/torchenv/bin/pip install --no-deps torchvision==0.28.0
  git clone https://github.com/Atten4Vis/ConditionalDETR /tmp/official_cond
  git -C /tmp/official_cond checkout 8ea7c3f
  /tmp/torchenv/bin/python tests/data/make_conditional_ref.py --official=/tmp/official_cond

The model is the official ``models.build_model(args)`` with ``args`` from the official main.py's
``get_args_parser()`` defaults plus ``--device cpu`` (R50, 300 queries, 6 + 6 layers, FFN 2048, aux
loss, focal loss with 91 logits, matcher costs class 2 / L1 5 / GIoU 2, loss weights 2 / 5 / 2), in
eval mode (no dropout), 2 torch threads, weights ``conditional_layout.make_state_dict(WEIGHTS_SEED)``
loaded with ``strict=True``. Inputs: ``official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)`` (not
stored: the tests regenerate them, ``images_sha256`` checks); targets: ``targets(seed)`` for the seed
of TARGET_SEEDS whose smallest matching margin (all layers and images) is largest.

Runtime shims, no official file edited (``import_conditional``): those of make_padding_ref.py's
``import_official`` (``datasets`` / ``engine`` stubbed, ``models.backbone.is_main_process`` returns
False so that nothing is downloaded, the torchvision nms / qnms schemas declared), plus, because
models/attention.py's torch-version test is also true for torch 2.x, the two names it then imports:
``torch.nn.modules.linear._LinearWithBias`` (= ``NonDynamicallyQuantizableLinear``, what its torch >= 1.9
branch imports) and the module ``torch._overrides`` (= ``torch.overrides``).

Conventions: images NCHW, masks True on padding; boxes (cx, cy, w, h) in [0, 1] of the unpadded
image; focal logits: label c is logit c, there is no no-object logit. B = 2 images, Q = 300 queries,
C = 91 logits, decoder layer L5 = final, L0..L4 = aux; feature map h x w = 6 x 7.

conditional_r50.npz (``np.savez_compressed``, no pickles):
  weights_seed, weights_sha256                   2024, official_layout.weights_sha256 of the weights
  layout_sha256                                  official_layout.layout_sha256 of the official model's
                                                 state_dict layout (= conditional_layout.state_dict_shapes())
  image_seed, image_sizes [2, 2] int64, images_sha256   inputs (valid (h, w) of each image)
  pred_logits [B, Q, C], pred_boxes [B, Q, 4]    final decoder layer, float32 (boxes after sigmoid)
  aux_pred_logits [5, B, Q, C], aux_pred_boxes [5, B, Q, 4]   decoder layers 0..4
  <those four>_f64                               the same model and inputs in float64
                                                 (``model.double()``), stored as float32
  reference_points [B, Q, 2]                     sigmoid(ref_point_head(query_embed)) (x, y), as the
                                                 transformer returns it
  hs [2, B, 100, 256], hs_layers [2], hs_queries [100]   decoder outputs of layers HS_LAYERS (0 and 5),
                                                 after the shared final decoder norm, of queries
                                                 hs_queries (0..99)
  memory [B, h*w, 256]                           encoder output, batch-first (tokens row-major)
  pos [B, 256, h, w]                             sine position embedding of the layer4 features
  feat_mask [B, h, w] bool                       layer4 mask (nearest resize of the image mask)
  target_seed, tgt{i}_labels [n_i] int64, tgt{i}_boxes [n_i, 4] float32   targets (n = 5, 3), raw
                                                 labels in 1..90
  match/L{l}/img{i}_src, _tgt [n_i] int64        official HungarianMatcher (query, target) indices
  match_margin/L{l}/img{i}                       second-best minus best assignment cost, float64
                                                 recomputation of the official focal cost
  loss/<name>                                    every SetCriterion output (float32 values as
                                                 float64): loss_ce, class_error, loss_bbox, loss_giou,
                                                 cardinality_error and their _0.._4 aux terms
  weight/<name>, loss_total                      weight_dict, sum of loss * weight over its keys
  post_scores [B, 100], post_labels [B, 100] int64, post_boxes [B, 100, 4]   official
                                                 postprocessors['bbox'] (sigmoid, top 100 over Q * C),
                                                 target_sizes = image_sizes, boxes absolute (x0, y0, x1, y1)
  post_query_index [B, 100] int64                topk index // C
  post_topk_boundary                             100th minus 101st flat logit, min over images
  argmax_margin/card                             min over layers and queries of |max(logits[:90]) -
                                                 logits[90]| (the official cardinality_error decision)
  argmax_margin/class_error                      min over matched final-layer queries of |target logit
                                                 - best other logit| (class_error's top-1 decision)
  grad/<key>                                     d loss_total / d parameter for GRAD_KEYS, from a
                                                 separate float32 forward and backward pass
                                                 (of a matrix, its first 16 rows)
  grad_gap/<key>                                 max |grad/<key> - the same gradient in float64|: the
                                                 float32 noise (up to ~1e-3 of max |grad| on the
                                                 positional paths, whose attention is sharp)
  spec                                           repo, commit, args, shims, torch version

``--check_shared=DIR`` (not needed to build the dump) checks this harness against a shared
reference directory that holds ``variant_weights.py`` and ``conditional_detr_r50_ref.npz``, made by
another harness from the same official code: its weights and stored images / masks through this
one. The float64 outputs agree to 3e-14 (the same computation); the float32 ones to about 1e-5
(logits) / 8e-7 (boxes), the float32 noise of a different machine's kernels (its own 1-vs-2-thread
noise is 1.1e-5 / 6.9e-7).
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import conditional_layout  # noqa: E402
import official_layout  # noqa: E402
from make_official_ref import margin, store_losses  # noqa: E402
from make_padding_ref import import_official  # noqa: E402

WEIGHTS_SEED, IMAGE_SEED = 2024, 7
IMAGE_SIZES = ((192, 160), (145, 224))  # (h, w); padded to 192 x 224, feature map 6 x 7
TARGET_SEEDS = range(40)
HS_LAYERS = [0, 5]
HS_QUERIES = 100  # hs is stored for queries 0..99 (all 300 would add 0.8 MB)
# d loss_total / d parameter is stored for these parameters (of a matrix, its first 16 rows). No key bias:
# the biases of ca_kcontent_proj, ca_kpos_proj and sa_kcontent_proj / sa_kpos_proj add the same vector to
# every key of a query's softmax, so their gradients are exactly zero (float32 noise of 1e-7 here).
GRAD_KEYS = {"transformer.decoder.ref_point_head.layers.0.bias": None,
             "transformer.decoder.query_scale.layers.1.bias": None,
             "transformer.decoder.layers.0.ca_qpos_proj.bias": None,
             "transformer.decoder.layers.0.ca_qpos_sine_proj.bias": None,
             "transformer.decoder.layers.2.sa_qpos_proj.bias": None,
             "transformer.decoder.layers.3.ca_kcontent_proj.weight": 16,
             "transformer.decoder.layers.3.ca_v_proj.bias": None,
             "transformer.decoder.norm.weight": None, "class_embed.bias": None, "bbox_embed.layers.2.bias": None,
             "query_embed.weight": 16}
COMMIT = "8ea7c3f3fff49cd287855d4f13cc12a6066bc8e9"
SHIMS = ("datasets/engine stubbed; models.backbone.is_main_process -> False (no download); torchvision nms/qnms "
         "schemas declared; torch.nn.modules.linear._LinearWithBias = NonDynamicallyQuantizableLinear and "
         "torch._overrides = torch.overrides (models/attention.py's version test is true for torch 2.x)")


def import_conditional(official: Path):
    """(torch, models.build_model, main.get_args_parser) from an official Conditional DETR export."""
    import torch
    import torch.nn.modules.linear

    torch.nn.modules.linear._LinearWithBias = torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    sys.modules["torch._overrides"] = torch.overrides
    return import_official(official)


def targets(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels [n] int64 in 1..90, boxes [n, 4] float32 cx cy w h) for n = 5, 3."""
    r = np.random.RandomState(seed)
    return [(r.randint(1, 91, n), np.concatenate([r.uniform(0.2, 0.8, (n, 2)), r.uniform(0.05, 0.4, (n, 2))],
                                                 1).astype(np.float32)) for n in (5, 3)]


def _xyxy(b):
    return np.concatenate([b[..., :2] - 0.5 * b[..., 2:], b[..., :2] + 0.5 * b[..., 2:]], -1)


def focal_cost(logits, boxes, labels, tgt_boxes, alpha=0.25, gamma=2.0, weights=(2.0, 5.0, 2.0)):
    """The official HungarianMatcher cost [Q, n] of one image, in float64."""
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    neg = (1 - alpha) * p ** gamma * -np.log(1 - p + 1e-8)
    pos = alpha * (1 - p) ** gamma * -np.log(p + 1e-8)
    cost_class = (pos - neg)[:, labels]
    a, b = _xyxy(boxes.astype(np.float64)), _xyxy(tgt_boxes.astype(np.float64))
    cost_bbox = np.abs(boxes.astype(np.float64)[:, None] - tgt_boxes.astype(np.float64)[None]).sum(-1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None] - inter
    hull = np.clip(np.maximum(a[:, None, 2:], b[None, :, 2:]) - np.minimum(a[:, None, :2], b[None, :, :2]), 0, None)
    hull_area = hull[..., 0] * hull[..., 1]
    giou = inter / union - (hull_area - union) / hull_area
    return weights[1] * cost_bbox + weights[0] * cost_class - weights[2] * giou


def forward(torch, model, images, masks, capture=False):
    """The official model on a padded batch (no grad): outputs of layers 0..5 as numpy
    ([{pred_logits, pred_boxes}] * 6) and, with ``capture``, the intermediates."""
    from util.misc import NestedTensor

    captured, hooks = {}, []
    if capture:
        hooks = [model.backbone.register_forward_hook(lambda m, i, o: captured.update(
                     feat_mask=o[0][-1].mask, pos=o[1][-1])),
                 model.transformer.encoder.register_forward_hook(
                     lambda m, i, o: captured.update(memory=o.transpose(0, 1))),
                 model.transformer.register_forward_hook(
                     lambda m, i, o: captured.update(hs=o[0][HS_LAYERS,], reference_points=o[1]))]
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = model(NestedTensor(torch.from_numpy(images).to(dtype), torch.from_numpy(masks)))
    for hook in hooks:
        hook.remove()
    layers = [{k: o[k].numpy() for k in ("pred_logits", "pred_boxes")} for o in [*out["aux_outputs"], out]]
    return layers, {k: v.numpy() for k, v in captured.items()}


def store_outputs(out: dict, layers: list, suffix: str = "") -> None:
    """layers: the outputs of decoder layers 0..5 -> pred_* (layer 5) and aux_pred_*, float32."""
    for key in ("pred_logits", "pred_boxes"):
        out[key + suffix] = layers[-1][key].astype(np.float32)
        out[f"aux_{key}{suffix}"] = np.stack([o[key] for o in layers[:-1]]).astype(np.float32)


def build(torch, build_model, get_args_parser, state_dict):
    """The official (model in eval mode, criterion, postprocessors) with ``state_dict`` loaded strictly."""
    args = get_args_parser().parse_args(["--device", "cpu"])
    model, criterion, postprocessors = build_model(args)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    return model.eval(), criterion, postprocessors, args


def check_shared(torch, build_model, get_args_parser, shared: Path) -> None:
    """The yardstick of this harness: the shared reference's weights and inputs through it."""
    sys.path.insert(0, str(shared))
    import variant_weights

    ref = official_layout.load_npz(shared / "conditional_detr_r50_ref.npz")
    state_dict = variant_weights.make_state_dict("conditional_detr", int(ref["weights_seed"]))
    assert variant_weights.weights_sha256(state_dict) == str(ref["weights_sha256"])
    model = build(torch, build_model, get_args_parser, state_dict)[0]
    layers, captured = forward(torch, model, ref["images"], ref["masks"], capture=True)
    out = {}
    store_outputs(out, layers)
    out["reference_points"] = captured["reference_points"]
    layers64 = forward(torch, model.double(), ref["images"], ref["masks"])[0]
    for key in ("pred_logits", "pred_boxes"):
        out[key + "_f64"] = layers64[-1][key]
        out[f"aux_{key}_f64"] = np.stack([o[key] for o in layers64[:-1]])
    for key, value in out.items():
        print(f"check_shared {key}: max|diff| {np.abs(value - ref[key]).max():.3g}")
    for key in ("pred_logits", "pred_boxes", "aux_pred_logits", "aux_pred_boxes"):
        print(f"check_shared {key}: float32 of this run vs the reference's float64 "
              f"{np.abs(out[key] - ref[key + '_f64']).max():.3g} (the reference's own "
              f"{np.abs(ref[key] - ref[key + '_f64']).max():.3g})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="an export of Atten4Vis/ConditionalDETR")
    parser.add_argument("--out", type=Path, default=HERE / "conditional_r50.npz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check_shared", type=Path, help="only check the harness against a shared reference dir")
    args = parser.parse_args()
    torch, build_model, get_args_parser = import_conditional(args.official)
    torch.set_num_threads(args.threads)
    if args.check_shared:
        return check_shared(torch, build_model, get_args_parser, args.check_shared)
    import models.matcher

    state_dict = conditional_layout.make_state_dict(WEIGHTS_SEED)
    model, criterion, postprocessors, main_args = build(torch, build_model, get_args_parser, state_dict)
    official = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(official.items()) == list(conditional_layout.state_dict_shapes().items())
    twenty = build_model(get_args_parser().parse_args(["--device", "cpu", "--dataset_file", "voc"]))[0]
    assert [(k, tuple(v.shape)) for k, v in twenty.state_dict().items()] == list(
        conditional_layout.state_dict_shapes(num_classes=20).items())
    del twenty
    out = {"weights_seed": np.int64(WEIGHTS_SEED),
           "weights_sha256": np.str_(official_layout.weights_sha256(state_dict)),
           "layout_sha256": np.str_(official_layout.layout_sha256(official)),
           "image_seed": np.int64(IMAGE_SEED), "image_sizes": np.array(IMAGE_SIZES, np.int64)}
    images, masks = official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)
    out["images_sha256"] = np.str_(official_layout.array_sha256(images))

    layers, captured = forward(torch, model, images, masks, capture=True)
    store_outputs(out, layers)
    out.update(reference_points=captured["reference_points"], hs=captured["hs"][:, :, :HS_QUERIES],
               hs_layers=np.array(HS_LAYERS, np.int64), hs_queries=np.arange(HS_QUERIES, dtype=np.int64),
               memory=captured["memory"], pos=captured["pos"],
               feat_mask=captured["feat_mask"])

    def match(seed):
        """(torch targets, official indices per layer, float64 margins per layer and image)."""
        tgts = [{"labels": torch.from_numpy(l), "boxes": torch.from_numpy(b)} for l, b in targets(seed)]
        indices, margins = [], []
        for o in layers:
            indices.append(criterion.matcher({k: torch.from_numpy(v) for k, v in o.items()}, tgts))
            margins.append([])
            for i, t in enumerate(tgts):
                cost = focal_cost(o["pred_logits"][i], o["pred_boxes"][i], t["labels"].numpy(), t["boxes"].numpy())
                margins[-1].append(margin(cost))
                src, tgt = models.matcher.linear_sum_assignment(cost)
                assert (src == indices[-1][i][0].numpy()).all() and (tgt == indices[-1][i][1].numpy()).all()
        return tgts, indices, margins

    target_seed = max(TARGET_SEEDS, key=lambda s: min(map(min, match(s)[2])))
    tgts, indices, margins = match(target_seed)
    out["target_seed"] = np.int64(target_seed)
    for i, t in enumerate(tgts):
        out[f"tgt{i}_labels"], out[f"tgt{i}_boxes"] = t["labels"].numpy(), t["boxes"].numpy()
    for layer in range(len(layers)):
        for i, (src, tgt) in enumerate(indices[layer]):
            out[f"match/L{layer}/img{i}_src"], out[f"match/L{layer}/img{i}_tgt"] = src.numpy(), tgt.numpy()
            out[f"match_margin/L{layer}/img{i}"] = np.float64(margins[layer][i])

    # how far the argmax decisions of the logged losses are from flipping (for tolerances)
    logits = np.stack([o["pred_logits"] for o in layers]).astype(np.float64)
    out["argmax_margin/card"] = np.float64(np.abs(logits[..., :-1].max(-1) - logits[..., -1]).min())
    gaps = []
    for i, (src, tgt) in enumerate(indices[-1]):
        matched = logits[-1, i, src.numpy()]
        label = tgts[i]["labels"].numpy()[tgt.numpy()]
        target = matched[np.arange(len(label)), label]
        matched[np.arange(len(label)), label] = -np.inf
        gaps.append(np.abs(target - matched.max(-1)))
    out["argmax_margin/class_error"] = np.float64(np.concatenate(gaps).min())

    with torch.no_grad():
        torch_out = {k: torch.from_numpy(v) for k, v in layers[-1].items()}
        torch_out["aux_outputs"] = [{k: torch.from_numpy(v) for k, v in o.items()} for o in layers[:-1]]
        post = postprocessors["bbox"](torch_out, torch.as_tensor(IMAGE_SIZES))
    out.update({f"post_{k}": np.stack([p[k].numpy() for p in post]) for k in ("scores", "labels", "boxes")})
    num_classes = out["pred_logits"].shape[-1]
    flat = -np.sort(-out["pred_logits"].reshape(len(IMAGE_SIZES), -1).astype(np.float64), 1)
    out["post_topk_boundary"] = np.float64((flat[:, 99] - flat[:, 100]).min())
    # the official PostProcess's topk index // C (its labels are that index % C)
    topk = torch.topk(torch.from_numpy(out["pred_logits"]).sigmoid().view(2, -1), 100, dim=1)[1].numpy()
    assert (topk % num_classes == out["post_labels"]).all()
    out["post_query_index"] = topk // num_classes

    # a separate float32 forward and backward pass for the losses and gradients
    from util.misc import NestedTensor

    outputs = model(NestedTensor(torch.from_numpy(images), torch.from_numpy(masks)))
    assert np.array_equal(outputs["pred_logits"].detach().numpy(), out["pred_logits"])
    parameters = store_losses(out, model, criterion, outputs, tgts, GRAD_KEYS)

    model.zero_grad(set_to_none=True)
    layers64 = forward(torch, model.double(), images, masks)[0]
    store_outputs(out, layers64, "_f64")
    # the float32 noise of the stored gradients: the same backward pass in float64
    outputs = model(NestedTensor(torch.from_numpy(images).double(), torch.from_numpy(masks)))
    losses = criterion(outputs, [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in tgts])
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    for key, rows in GRAD_KEYS.items():
        out[f"grad_gap/{key}"] = np.float64(np.abs(parameters[key].grad.numpy()[:rows] - out[f"grad/{key}"]).max())
    try:
        commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = COMMIT + " (an export; not checked)"
    out["spec"] = np.str_(
        f"official Atten4Vis/ConditionalDETR @{commit}, models.build_model(args), args = main.py "
        f"get_args_parser() defaults + --device cpu: {vars(main_args)}; eval mode, CPU, {args.threads} thread(s), "
        f"torch {torch.__version__}; shims: {SHIMS}; weights conditional_layout.make_state_dict({WEIGHTS_SEED}); "
        "see tests/data/make_conditional_ref.py")
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {len(out)} arrays)")
    report(out)


def report(out: dict) -> None:
    gaps = {k: np.abs(out[k] - out[k + "_f64"]).max() for k in ("pred_logits", "pred_boxes", "aux_pred_logits",
                                                                "aux_pred_boxes")}
    print("float32 vs float64: " + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    margins = {k: float(v) for k, v in out.items() if k.startswith("match_margin/")}
    smallest = min(margins, key=margins.get)
    print(f"target seed {int(out['target_seed'])}: smallest matching margin {margins[smallest]:.4f} ({smallest})")
    print(f"post top-k boundary {float(out['post_topk_boundary']):.3g}; argmax margins: cardinality "
          f"{float(out['argmax_margin/card']):.3g}, class_error {float(out['argmax_margin/class_error']):.3g}")
    print("gradients, max|f32 - f64| / max|grad|: " + ", ".join(
        f"{k[9:]} {float(v) / np.abs(out['grad/' + k[9:]]).max():.1e}"
        for k, v in out.items() if k.startswith("grad_gap/")))
    print("losses: " + ", ".join(f"{k[5:]} {float(v):.4f}" for k, v in out.items() if k.startswith("loss/")
                                 and k[-2] != "_") + f"; total {float(out['loss_total']):.4f}")


if __name__ == "__main__":
    main()
