"""The official PyTorch DETR panoptic model (DETRsegm, R50) on tests/panoptic_layout.py's weights, and
the official segmentation post-processors on crafted inputs: the reference of the mask-head, mask-loss
and post-processing parity tests (tests/test_panoptic_postprocess.py, ...).

Environment (CPU torch, no GPU, nothing downloaded at run time) and an unmodified export of
facebookresearch/detr (commit 29901c5 here):

  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 numpy scipy pillow packaging pycocotools
  /work/torchenv/bin/pip install --no-deps torchvision==0.28.0
  git clone https://github.com/facebookresearch/detr /tmp/official_detr && git -C /tmp/official_detr checkout 29901c5
  /work/torchenv/bin/python tests/data/make_panoptic_ref.py --official=/tmp/official_detr

It writes tests/data/detr_panoptic_r50.npz (``np.savez_compressed``, no pickles). The model is
``build_model`` with main.py's defaults plus ``--masks --dataset_file coco_panoptic --device cpu``
(num_classes 250, logit 250 = no object; DETRsegm; PostProcessPanoptic with is_thing_map
{i: i <= 90 for i in range(201)}, threshold 0.85), in eval mode (no dropout), 2 threads, weights
``panoptic_layout.make_state_dict(WEIGHTS_SEED)`` loaded with ``strict=True``. Inputs:
``official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)`` (not stored, ``images_sha256`` checks); both
images are padded, and neither the images nor the canvas (139 x 166) are multiples of 32, so the mask
head's nearest upsamplings are not all 2x (5 -> 9 -> 18 -> 35 rows, 6 -> 11 -> 21 -> 42 columns).
Targets: ``targets(seed)`` (a random panoptic map per image: a stuff background and rectangles /
ellipses painted in order), the seed of TARGET_SEEDS whose smallest matching margin is largest.
Conventions: images NCHW, masks at the unpadded image size, boxes (cx, cy, w, h) in [0, 1] of the
unpadded image from the official ``masks_to_boxes`` (inclusive pixel maxima) as the official Normalize
transform makes them, labels raw class ids.

The official panopticapi is not installed: ``panopticapi.utils`` is registered as a stub module with
``id2rgb`` / ``rgb2id`` written from their published definition (id = R + 256 G + 256^2 B); the other
shims are make_padding_ref.py's ``import_official``.

Keys of detr_panoptic_r50.npz (float32 unless said otherwise):
  pred_logits [2, 100, 251], pred_boxes [2, 100, 4]     final decoder layer
  aux_pred_logits [5, 2, 100, 251], aux_pred_boxes      decoder layers 0..4
  bbox_mask [2, 100, 8, 5, 6]                           MHAttentionMap output (0 on padding)
  pred_masks [2, 100, 35, 42]                           mask logits (1/4 of the canvas)
  <those six but aux_pred_logits>_f64                  the same model and inputs in float64
                                                        (``model.double()``), stored as float32
                                                        (aux_pred_logits_f64 is left out: 1 MB; its
                                                        yardstick is stored)
  yardstick/<name>                                      max |float32 - float64| of each of the six,
                                                        of each loss (yardstick/loss/<name>,
                                                        yardstick/loss_total) and each gradient
                                                        (yardstick/grad/<key>), float64
  feature_shapes [4, 4] int64                           (B, C, H, W) of the backbone's layer1..layer4
  tgt{i}_labels [n_i] int64, tgt{i}_boxes [n_i, 4]      targets (n = 5, 3)
  tgt{i}_masks [n_i, h_i, w_i] uint8                    target masks, unpadded, non-overlapping,
                                                        covering the image
  match/L{l}/img{i}_src, _tgt [n_i] int64               HungarianMatcher (query, target) indices of
                                                        layer l (L0..L4 aux, L5 final); the float64 run
                                                        matches the same
  match/L5/img{i}_C [100, n_i]                          the cost matrix it solved
  match_margin/L{l}/img{i}                              second-best minus best assignment cost (f64)
  loss/<name>, weight/<name>, loss_total                every SetCriterion output (loss_mask: sigmoid
                                                        focal, loss_dice; the official pads the target
                                                        masks to the batch maximum 139 x 166 and
                                                        upsamples the predictions to it; masks only for
                                                        the final layer), the whole weight_dict (it also
                                                        names loss_mask_<i> / loss_dice_<i>, never
                                                        computed), sum of loss * weight over the losses
                                                        (engine.py's rule) (float64 scalars)
  loss_f64/<name>, loss_total_f64                       the same in the float64 run
  grad/<key>, grad_f64/<key>                            d loss_total / d parameter for GRAD_KEYS (of a
                                                        large one, its first output channels), float32
                                                        and float64 runs (both stored as float32)
  weights_seed, weights_sha256, num_keys, image_seed, image_sizes [2, 2] (h, w), images_sha256,
  target_seed, spec
Post-processor references on crafted inputs (``crafted(PP_SEED)``; 3 images: images 0 and 1 with 9
confident queries each (PP_CONFIDENT: stuff classes repeated, things repeated, one query per image
whose mask wins <= 4 pixels (PP_SMALL), in image 1 a thing whose mask never wins (PP_NEVER)), image 2
with none: the official then emits an all-0 PNG and NO segment):
  pp_logits [3, 100, 251] float16                       multiples of 1/16 (the official ran on them as
                                                        float32); confident queries score
                                                        > 0.95; about half the others predict no object
                                                        with probability > 0.85, the rest an object
                                                        below the threshold
  pp_masks [3, 100, 40, 48] float16                     mask logits (sums of Gaussian blobs, minus 2),
                                                        multiples of 1/32 (PostProcessSegm's bilinear 4x
                                                        resize to the canvas is exact on them)
  pp_confident [18, 2] int64, pp_masks_confident [18, 40, 48]   (image, query) of the confident queries
                                                        and their masks in float32, which replace those
                                                        rows of pp_masks (``pp_masks(arrays)``): a
                                                        coarser grid makes exact ties between masks,
                                                        which float32 rounding then breaks either way;
                                                        the official ran on the result as float32
  pp_gap/img{i}                                         the smallest gap between the best and second
                                                        best kept mask logit over the pixels, after the
                                                        bilinear resize in float64 (float64; the first
                                                        assignment pass: asserted > 1e-5)
  pp_boxes [3, 100, 4]                                  (cx, cy, w, h), for PostProcess (bbox)
  pp_processed_sizes, pp_target_sizes [3, 2] int64      (h, w): PostProcessPanoptic(processed_sizes,
                                                        target_sizes); PostProcessSegm's
                                                        max_target_sizes / orig_target_sizes
  pp_kept/img{i} [K] int64                              the queries the official keeps (before the
                                                        area loop)
  pano/img{i}_ids [Ht, Wt] int32                        rgb2id of the decoded png_string
  pano/img{i}_id, _category_id, _isthing, _area [n] int64   segments_info as arrays
  segm/img{i}_masks [ceil(100 Ht Wt / 8)] uint8          results[i]["masks"] [100, 1, Ht, Wt] uint8
                                                        (0 / 1), np.packbits of its [100, Ht, Wt]
  segm/img{i}_shape [3] int64                           (100, Ht, Wt)
"""
import argparse
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import official_layout  # noqa: E402
import panoptic_layout  # noqa: E402
from make_official_ref import margin, store_matching, store_outputs  # noqa: E402
from make_padding_ref import import_official  # noqa: E402

WEIGHTS_SEED, IMAGE_SEED, PP_SEED = 2024, 11, 5
IMAGE_SIZES = ((139, 150), (131, 166))  # (h, w); padded to 139 x 166, masks 35 x 42, features 5 x 6
SEGMENTS = (5, 3)  # per image; the first one is the stuff background
TARGET_SEEDS = range(40)
ARGV = ["--device", "cpu", "--masks", "--dataset_file", "coco_panoptic"]
# d loss_total / d parameter is stored for these mask-head parameters: {key: first rows, None = all}.
# bbox_attention.k_linear.bias gets none: q . b is constant over the positions a query attends to,
# and the softmax over positions removes it (its stored gradient is float rounding).
GRAD_KEYS = {"bbox_attention.q_linear.weight": 32, "bbox_attention.k_linear.bias": None,
             "mask_head.lay1.weight": 4, "mask_head.gn2.weight": None, "mask_head.adapter1.weight": 8,
             "mask_head.adapter3.bias": None, "mask_head.lay5.weight": None, "mask_head.out_lay.bias": None}
OUTPUTS = ("pred_logits", "pred_boxes", "aux_pred_logits", "aux_pred_boxes", "bbox_mask", "pred_masks")
STORED_F64 = ("pred_logits", "pred_boxes", "aux_pred_boxes", "bbox_mask", "pred_masks")  # aux_pred_logits: 1 MB

PP_MASK_HW = (40, 48)
PP_PROCESSED = ((160, 150), (131, 192), (150, 170))  # canvas 160 x 192 = 4 x PP_MASK_HW
PP_TARGET = ((200, 187), (170, 250), (120, 136))
# (query, label) of the confident queries of images 0 and 1; things are 1..90, stuff 91..200.
# Image 0: stuff 120 three times (merged), thing 17 twice (not merged); image 1: stuff 100 twice.
PP_CONFIDENT = ([(3, 120), (10, 120), (41, 120), (7, 5), (22, 17), (58, 17), (66, 60), (80, 150), (91, 33)],
                [(0, 100), (12, 100), (30, 185), (33, 1), (47, 44), (52, 90), (75, 200), (88, 70), (99, 95)])
PP_SMALL = {0: 91, 1: 99}  # a query whose mask beats the others only around one cell (area <= 4)
PP_SMALL_CELL = {0: (20, 24), 1: (15, 30)}  # that cell of the 40 x 48 grid
PP_SMALL_BUMP = 0.35  # by how much it beats the best other mask at that cell (it is 1 below elsewhere)
PP_NEVER = {1: 88}  # a thing whose mask never wins


def id2rgb(id_map):
    """panopticapi.utils.id2rgb: ids [...] -> uint8 [..., 3], id = R + 256 G + 256^2 B."""
    ids = np.asarray(id_map, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def rgb2id(color):
    """panopticapi.utils.rgb2id: uint8 [H, W, 3] -> int32 ids [H, W]."""
    color = np.asarray(color).astype(np.int32)
    return color[..., 0] + 256 * color[..., 1] + 65536 * color[..., 2]


def panoptic_map(r: np.random.RandomState, h: int, w: int, n: int) -> np.ndarray:
    """int64 [h, w] segment indices 0..n-1: 0 the background, then n - 1 rectangles / ellipses (odd /
    even index) painted in order; redrawn until every segment covers >= 2% of the image."""
    yy, xx = np.mgrid[:h, :w]
    while True:
        ids = np.zeros((h, w), np.int64)
        for k in range(1, n):
            cy, cx, ry, rx = r.uniform(0, h), r.uniform(0, w), r.uniform(0.1, 0.35) * h, r.uniform(0.1, 0.35) * w
            if k % 2:
                inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            ids[inside] = k
        if np.bincount(ids.ravel(), minlength=n).min() >= 0.02 * h * w:
            return ids


def targets(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image of IMAGE_SIZES: (labels [n] int64, masks [n, h, w] uint8); segment 0 and every third
    one are stuff (91..199), the others things (1..90)."""
    r = np.random.RandomState(seed)
    out = []
    for (h, w), n in zip(IMAGE_SIZES, SEGMENTS):
        ids = panoptic_map(r, h, w, n)
        labels = np.array([r.randint(91, 200) if k % 3 == 0 else r.randint(1, 91) for k in range(n)], np.int64)
        out.append((labels, (ids[None] == np.arange(n)[:, None, None]).astype(np.uint8)))
    return out


def blobs(r: np.random.RandomState, n: int, h: int, w: int) -> np.ndarray:
    """float64 [n, h, w]: per map three Gaussian blobs (sd 3..10 cells, height 1.5..5) minus 2."""
    yy, xx = np.mgrid[:h, :w]
    centre = r.uniform(0, 1, (n, 3, 2)) * (h, w)
    sd, height = r.uniform(3, 10, (n, 3)), r.uniform(1.5, 5, (n, 3))
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    return (height[..., None, None] * np.exp(-d2 / (2 * sd[..., None, None] ** 2))).sum(1) - 2


def crafted(seed: int) -> dict[str, np.ndarray]:
    """pp_logits, pp_masks, pp_boxes, pp_processed_sizes, pp_target_sizes (see the module docstring)."""
    r = np.random.RandomState(seed)
    batch, queries, classes = len(PP_PROCESSED), 100, panoptic_layout.NUM_CLASSES + 1
    logits = r.standard_normal((batch, queries, classes))
    no_object = r.uniform(0, 1, (batch, queries)) < 0.5
    logits[no_object, -1] += 8  # probability about 0.9 of no object
    logits[~no_object, r.randint(1, 201, (batch, queries))[~no_object]] += 5  # an object, about 0.3
    masks = blobs(r, batch * queries, *PP_MASK_HW).reshape(batch, queries, *PP_MASK_HW)
    masks = np.round(masks * 32) / 32  # the confident queries' masks are redrawn below, in float32
    for i, confident in enumerate(PP_CONFIDENT):
        for q, label in confident:
            logits[i, q] = r.standard_normal(classes)
            logits[i, q, label] += 11 + r.uniform()
            masks[i, q] = blobs(r, 1, *PP_MASK_HW)[0]
        if i in PP_NEVER:
            masks[i, PP_NEVER[i]] -= 20
        if i in PP_SMALL:
            others = [q for q, _ in confident if q not in (PP_SMALL[i], PP_NEVER.get(i))]
            best = masks[i, others].max(0)
            masks[i, PP_SMALL[i]] = best - 1
            masks[i, PP_SMALL[i]][PP_SMALL_CELL[i]] = best[PP_SMALL_CELL[i]] + PP_SMALL_BUMP
    boxes = np.concatenate([r.uniform(0.2, 0.8, (batch, queries, 2)), r.uniform(0.05, 0.4, (batch, queries, 2))], -1)
    confident = np.array([(i, q) for i, c in enumerate(PP_CONFIDENT) for q, _ in c], np.int64)
    return {"pp_logits": (np.round(logits * 16) / 16).astype(np.float16), "pp_masks": masks.astype(np.float16),
            "pp_confident": confident, "pp_masks_confident": masks[tuple(confident.T)].astype(np.float32),
            "pp_boxes": boxes.astype(np.float32), "pp_processed_sizes": np.array(PP_PROCESSED, np.int64),
            "pp_target_sizes": np.array(PP_TARGET, np.int64)}


def pp_masks(arrays: dict) -> np.ndarray:
    """The crafted mask logits the official ran on: float32 [3, 100, 40, 48], pp_masks with the rows
    pp_confident (image, query) replaced by pp_masks_confident."""
    masks = arrays["pp_masks"].astype(np.float32)
    masks[tuple(arrays["pp_confident"].T)] = arrays["pp_masks_confident"]
    return masks


def register_panopticapi() -> None:
    """The ``panopticapi.utils`` stub (id2rgb, rgb2id) that models/segmentation.py imports."""
    utils = types.ModuleType("panopticapi.utils")
    utils.id2rgb, utils.rgb2id = id2rgb, rgb2id
    sys.modules["panopticapi"] = types.ModuleType("panopticapi")
    sys.modules["panopticapi"].utils = utils
    sys.modules["panopticapi.utils"] = utils


def torch_targets(torch, seed: int, dtype) -> list[dict]:
    """The official target dicts of ``targets(seed)``: labels, masks (uint8), boxes (masks_to_boxes, then
    cxcywh / (w, h, w, h) as the official Normalize)."""
    from util.box_ops import box_xyxy_to_cxcywh, masks_to_boxes

    out = []
    for labels, masks in targets(seed):
        masks = torch.from_numpy(masks)
        h, w = masks.shape[-2:]
        boxes = box_xyxy_to_cxcywh(masks_to_boxes(masks)) / torch.tensor([w, h, w, h], dtype=torch.float32)
        out.append({"labels": torch.from_numpy(labels), "masks": masks, "boxes": boxes.to(dtype)})
    return out


def run(model, samples) -> tuple[dict, dict]:
    """(model outputs, {"bbox_mask", "feature_shapes"}) of one forward pass."""
    captured = {}
    hooks = [model.detr.backbone.register_forward_hook(
                 lambda m, i, o: captured.update(feature_shapes=[tuple(f.tensors.shape) for f in o[0]])),
             model.bbox_attention.register_forward_hook(lambda m, i, o: captured.update(bbox_mask=o))]
    outputs = model(samples)
    for hook in hooks:
        hook.remove()
    return outputs, captured


def losses_and_grads(model, criterion, outputs: dict, tgts: list) -> tuple[dict, float, dict]:
    """({name: value} of every SetCriterion output, their weighted sum as engine.py forms it (over the
    outputs that have a weight: weight_dict also names loss_mask_<i> / loss_dice_<i> of the auxiliary
    layers, which the criterion never computes), {key: d sum / d parameter} for GRAD_KEYS) after a
    backward pass from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    losses = criterion(outputs, tgts)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    parameters = dict(model.named_parameters())
    grads = {k: parameters[k].grad.numpy()[:rows].copy() for k, rows in GRAD_KEYS.items()}
    return {k: np.float64(v.item()) for k, v in losses.items()}, np.float64(total.item()), grads


def postprocess_reference(torch, postprocessors) -> dict[str, np.ndarray]:
    """The crafted inputs and the official PostProcessPanoptic / PostProcessSegm outputs on them."""
    import io

    from PIL import Image

    out = crafted(PP_SEED)
    outputs = {"pred_logits": torch.from_numpy(out["pp_logits"].astype(np.float32)),
               "pred_boxes": torch.from_numpy(out["pp_boxes"]), "pred_masks": torch.from_numpy(pp_masks(out))}
    processed, target = torch.from_numpy(out["pp_processed_sizes"]), torch.from_numpy(out["pp_target_sizes"])
    threshold = postprocessors["panoptic"].threshold
    for i, (logits, masks) in enumerate(zip(outputs["pred_logits"], outputs["pred_masks"])):
        scores, labels = logits.softmax(-1).max(-1)
        kept = torch.nonzero((labels != logits.shape[-1] - 1) & (scores > threshold))[:, 0]
        out[f"pp_kept/img{i}"] = kept.numpy()
        if len(kept) > 1:
            resized = torch.nn.functional.interpolate(masks[kept, None].double(), tuple(PP_PROCESSED[i]),
                                                      mode="bilinear", align_corners=False)[:, 0]
            top = resized.topk(2, dim=0).values
            out[f"pp_gap/img{i}"] = np.float64((top[0] - top[1]).min().item())
            assert out[f"pp_gap/img{i}"] > 1e-5, (i, out[f"pp_gap/img{i}"])
    for i, pred in enumerate(postprocessors["panoptic"](outputs, processed, target)):
        out[f"pano/img{i}_ids"] = rgb2id(np.asarray(Image.open(io.BytesIO(pred["png_string"])).convert("RGB")))
        for field in ("id", "category_id", "isthing", "area"):
            out[f"pano/img{i}_{field}"] = np.array([s[field] for s in pred["segments_info"]], np.int64)
    results = postprocessors["bbox"](outputs, target)
    for i, result in enumerate(postprocessors["segm"](results, outputs, target, processed)):
        masks = result["masks"][:, 0].numpy()
        out[f"segm/img{i}_masks"], out[f"segm/img{i}_shape"] = np.packbits(masks), np.array(masks.shape, np.int64)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="an export of facebookresearch/detr")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    register_panopticapi()
    torch, build_model, get_args_parser = import_official(args.official)
    torch.set_num_threads(args.threads)
    import models.matcher
    from util.misc import NestedTensor

    model, criterion, postprocessors = build_model(get_args_parser().parse_args(ARGV))
    official = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(official.items()) == list(panoptic_layout.state_dict_shapes().items())
    state_dict = panoptic_layout.make_state_dict(WEIGHTS_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    out = {"weights_seed": np.int64(WEIGHTS_SEED),
           "weights_sha256": np.str_(official_layout.weights_sha256(state_dict)),
           "num_keys": np.int64(len(state_dict)), "image_seed": np.int64(IMAGE_SEED),
           "image_sizes": np.array(IMAGE_SIZES, np.int64)}
    images, pad = official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)
    out["images_sha256"] = np.str_(official_layout.array_sha256(images))

    outputs, captured = run(model, NestedTensor(torch.from_numpy(images), torch.from_numpy(pad)))
    out["feature_shapes"] = np.array(captured["feature_shapes"], np.int64)
    layers = [*outputs["aux_outputs"], outputs]
    store_outputs(out, layers)
    out["bbox_mask"] = captured["bbox_mask"].detach().numpy()
    out["pred_masks"] = outputs["pred_masks"].detach().numpy()

    solved = []
    real_lsa = models.matcher.linear_sum_assignment
    models.matcher.linear_sum_assignment = lambda c: (solved.append(np.asarray(c)), real_lsa(c))[1]

    def match(seed, layers, dtype=torch.float32):
        """(targets, [(indices per image, cost matrices per image)] per layer, smallest margin)."""
        tgts = torch_targets(torch, seed, dtype)
        result = []
        for o in layers:
            solved.clear()
            result.append((criterion.matcher({k: o[k].detach() for k in ("pred_logits", "pred_boxes")}, tgts),
                           list(solved)))
        return tgts, result, min(margin(c) for _, costs in result for c in costs)

    target_seed = max(TARGET_SEEDS, key=lambda s: match(s, layers)[2])
    tgts, matched, smallest = match(target_seed, layers)
    out["target_seed"] = np.int64(target_seed)
    store_matching(out, tgts, matched)
    for i, (_, masks) in enumerate(targets(target_seed)):
        out[f"tgt{i}_masks"] = masks
    print(f"target seed {target_seed}: smallest matching margin {smallest:.4f}")
    losses, out["loss_total"], grads = losses_and_grads(model, criterion, outputs, tgts)
    out.update({f"loss/{k}": v for k, v in losses.items()})
    out.update({f"weight/{k}": np.float64(w) for k, w in criterion.weight_dict.items()})
    out.update({f"grad/{k}": v for k, v in grads.items()})

    model.double()
    criterion.double()
    outputs64, captured64 = run(model, NestedTensor(torch.from_numpy(images).double(), torch.from_numpy(pad)))
    layers64 = [*outputs64["aux_outputs"], outputs64]
    tgts64, matched64, _ = match(target_seed, layers64, torch.float64)
    for (indices, _), (indices64, _) in zip(matched, matched64):
        assert all((a == c).all() and (b == d).all() for (a, b), (c, d) in zip(indices, indices64))
    f64 = {}
    store_outputs(f64, layers64, "_f64")
    f64["bbox_mask_f64"] = captured64["bbox_mask"].detach().numpy().astype(np.float32)
    f64["pred_masks_f64"] = outputs64["pred_masks"].detach().numpy().astype(np.float32)
    losses64, out["loss_total_f64"], grads64 = losses_and_grads(model, criterion, outputs64, tgts64)
    out.update({f"loss_f64/{k}": v for k, v in losses64.items()})
    out.update({f"grad_f64/{k}": v.astype(np.float32) for k, v in grads64.items()})
    out.update({f"yardstick/{k}": np.float64(np.abs(out[k] - f64[k + "_f64"]).max()) for k in OUTPUTS})
    out.update({k + "_f64": f64[k + "_f64"] for k in STORED_F64})
    out.update({f"yardstick/loss/{k}": np.float64(abs(v - losses64[k])) for k, v in losses.items()})
    out["yardstick/loss_total"] = np.float64(abs(out["loss_total"] - out["loss_total_f64"]))
    out.update({f"yardstick/grad/{k}": np.float64(np.abs(v - grads64[k]).max()) for k, v in grads.items()})

    out.update(postprocess_reference(torch, postprocessors))
    out["spec"] = np.str_(f"official DETRsegm (main.py defaults + {' '.join(ARGV)}, eval mode, CPU, "
                          f"{args.threads} thread(s)), torch {torch.__version__}; see tests/data/make_panoptic_ref.py")
    path = args.out / "detr_panoptic_r50.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes, {len(out)} arrays)")
    print("feature shapes:", [tuple(s) for s in out["feature_shapes"]], "pred_masks", out["pred_masks"].shape)
    print("yardsticks: " + ", ".join(f"{k[10:]} {float(v):.2e}" for k, v in out.items() if k.startswith("yardstick/")))
    print("losses: " + ", ".join(f"{k[5:]} {float(v):.4f}" for k, v in out.items() if k.startswith("loss/"))
          + f"; total {float(out['loss_total']):.4f}")
    for i in range(len(PP_PROCESSED)):
        print(f"pp image {i}: kept {out[f'pp_kept/img{i}'].tolist()}, segments (category, area) "
              f"{list(zip(out[f'pano/img{i}_category_id'].tolist(), out[f'pano/img{i}_area'].tolist()))}")


if __name__ == "__main__":
    main()
