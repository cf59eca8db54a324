"""The official PyTorch DN-DAB-DETR-R50 (denoising training) run on tests/dab_layout.py's weights plus a
``label_enc``: a parity reference for a DN-DETR implementation (the denoising queries, their attention
mask, the matching and denoising outputs, the matcher, every SetCriterion term, some gradients), with
the random noise of ``prepare_for_dn`` fed explicitly from numpy.

Environment (CPU torch, no GPU, nothing downloaded at run time) and an unmodified export of
IDEA-Research/DN-DETR (commit ff3902a here):

  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 numpy scipy pillow packaging
  /work/torchenv/bin/pip install --no-deps torchvision==0.28.0
  git clone https://github.com/IDEA-Research/DN-DETR /tmp/official_dn && git -C /tmp/official_dn checkout ff3902a
  # or from a bare mirror: mkdir -p /tmp/official_dn &&
  #   git -C <mirror> archive ff3902a | tar -x -C /tmp/official_dn
  /work/torchenv/bin/python tests/data/make_dn_ref.py --official=/tmp/official_dn

It writes tests/data/dn_dab_r50.npz (``np.savez_compressed``, no pickles, about 2 MB) in well under two
minutes on 2 CPU threads; the printed report gives the float32-vs-float64 gaps, the matching margins, the
noise and the loss terms. The model and criterion are main.py's ``build_model_main`` (->
``models.DN_DAB_DETR.build_DABDETR``) with ``get_args_parser()``'s defaults plus ``--modelname dn_dab_detr
--use_dn --coco_path unused --device cpu`` (coco_path is not read; the PostProcess is DAB-DETR's and is
not run here), so the denoising arguments are the defaults: scalar 5 groups, label_noise_scale 0.2,
box_noise_scale 0.4, num_patterns 0. Model and criterion in TRAINING mode (dropout is 0 anyway), called
as engine.py's train_one_epoch calls them: ``model(samples, dn_args=(targets, 5, 0.2, 0.4, 0))`` then
``criterion(outputs, targets, mask_dict)``. Weights: ``make_state_dict(WEIGHTS_SEED)`` below, i.e.
``dab_layout.make_state_dict`` (DN-DAB-DETR's state_dict has DAB-DETR's keys, shapes and order plus
``label_enc.weight`` [num_classes + 1, 255] right after ``class_embed.bias``; checked for 91 and 20
classes) plus ``label_enc.weight`` ~ N(0, 1) (torch's nn.Embedding init) from
``official_layout.stream(WEIGHTS_SEED, "label_enc.weight")``, loaded with ``strict=True``. Images, image
seed, sizes and the target recipe are make_dab_ref.py's (``make_dab_ref.targets(seed)``, 5 and 3 boxes);
the target seed is chosen as there (of TARGET_SEEDS, the largest smallest matching margin of the
matching part, which does not depend on the targets: matching queries cannot see the denoising ones).

The noise. ``prepare_for_dn`` draws, on the flat list of the N = 8 boxes repeated G = 5 times (flat
index k = g * N + (boxes of the images before b) + j: group-major, then image, then box):
``p = torch.rand_like(labels)`` (flip where p < 0.2, compared in float32), ``torch.randint_like(chosen,
0, 91)`` (a new label for each flipped entry, in flat order), ``torch.rand_like(boxes)`` (u: box += (2u -
1) * (w/2, h/2, w, h) * 0.4, then clamp to [0, 1]). Here those three draws return ``dn_label_u``,
``dn_new_labels`` (the flipped entries' ones, in order) and ``dn_box_u``, stored in a padded [G, B, S]
layout (S = 5, the most boxes of an image; entries j >= n_b are fillers that are never read), drawn by
``make_noise(NOISE_SEED)``: 24-bit uniforms (exact in float32, in [0, 1)) and labels in 0..90. NOISE_SEED
is the first seed from 0 on such that every image has a flipped label whose new label differs from the
old one and no used p lies within 1e-3 of the threshold. The script checks the official noised labels
and boxes against a numpy transcription of the formula (float32 and float64, bit for bit).

Runtime shims, no official file edited:
- main.py's imports that the model does not use are stubbed: ``datasets``, ``engine``, ``termcolor``,
  ``addict``, ``yapf``, ``timm.models.layers`` and the compiled ``MultiScaleDeformableAttention`` (the
  deformable variants that models/__init__.py imports are not built): make_dab_ref.STUBS;
- ``models.DN_DAB_DETR.backbone.is_main_process`` returns False: the ResNet is built with
  ``pretrained=False`` and nothing is downloaded;
- the torchvision wheel's C ops are absent: the operator schemas of nms and qnms are declared first;
- dn_components.py puts its tensors on the GPU (``.cuda()``, ``.to('cuda')``): while the model and the
  criterion run, ``torch.Tensor.cuda`` returns the tensor itself and ``torch.Tensor.to`` maps a cuda
  device argument to cpu (``on_cpu``);
- the noise: the name ``torch`` inside models.DN_DAB_DETR.dn_components is replaced by ``NoiseTorch``,
  which delegates everything to torch except ``rand_like`` (1-d input: the label draw; 2-d: the box
  draw) and ``randint_like`` (its input is the tensor of flipped flat indices: it returns their new
  labels), which return the numpy noise in the input's dtype;
- observation only: a forward hook on ``label_enc`` records its input (its second call in training mode
  is the noised labels), ``dn_components.inverse_sigmoid`` is wrapped to record its input (the noised,
  clamped boxes), a forward pre-hook on the transformer records the queries and the attention mask, a
  forward hook the anchors;
- float64 run: ``model.double()`` and the whole forward under ``torch.set_default_dtype(torch.float64)``
  (prepare_for_dn makes the indicator columns and padding with ``torch.zeros`` / ``torch.ones`` in the
  default dtype), targets' boxes as float64, the same noise (the label draw stays float32: prepare_for_dn
  compares ``labels.float()``). The same criterion runs on the float64 outputs (``loss_f64/*``).
Side check (printed, not stored): the same model in eval mode with ``label_enc`` zeroed reproduces
tests/data/dab_r50.npz (then every matching query's content starts at zero, as in DAB-DETR): max abs
difference 1.6e-5 in float32 (other tensor layouts; DAB's own float32-vs-float64 gap is 5e-5) and 4.8e-7
in float64 (the float32 storage of dab_r50.npz's float64 outputs).

What the official DN-DAB-DETR does beyond DAB-DETR (models/DN_DAB_DETR against IDEA-Research/DAB-DETR):
- decoder content at the start: matching query = [label_enc.weight[91], 0] for every query (DAB-DETR:
  zeros), in eval mode too; DN slot = [label_enc.weight[noised label], 1]; padding slot (an image with
  fewer than S boxes) = zeros (indicator 0). Anchors (before sigmoid): refpoint_embed; inverse_sigmoid
  (eps 1e-3) of the noised box; 0 (anchor 0.5, 0.5, 0.5, 0.5) for a padding slot;
- the decoder self-attention takes ``attn_mask`` (bool, -inf before the softmax); the cross-attention,
  encoder and heads are unchanged; the iterative anchor update runs on the DN queries too;
- the outputs are split after the heads (dn_post_process): the first P queries of every layer go to
  ``mask_dict['output_known_lbs_bboxes']``, the matcher and the usual losses see only the last Q;
- the DN losses (criterion in training mode, mask_dict given) per layer, the targets being the CLEAN
  labels and boxes, only the real slots (padding slots dropped): tgt_loss_ce = sigmoid focal loss
  (alpha 0.25, gamma 2) summed over the N G slots and 91 classes / num_tgt, tgt_loss_bbox = L1 sum /
  num_tgt, tgt_loss_giou = sum of (1 - GIoU, eps 1e-6) / num_tgt, num_tgt = N G (40 here; not
  all-reduced, not clamped), tgt_class_error = 100 - top-1 accuracy over the slots; weights = those of
  loss_ce / loss_bbox / loss_giou (1, 5, 2), for _0.._4 too.

Conventions: images NCHW, masks True on padding, boxes (cx, cy, w, h) in [0, 1] of the unpadded image,
labels raw class indices (91 sigmoid logits, no no-object logit). Batch of 2 images, valid (h, w)
(192, 160) and (145, 224), padded to 192 x 224; feature map 6 x 7. Q = 300 matching queries, P = G * S =
25 denoising queries in front of them (queries [0, P) denoising, group g at [g S, (g + 1) S), slot j of
a group = box j of the image; [P, P + Q) matching).

dn_dab_r50.npz (float32 unless noted):
  dn_label_u [5, 2, 5], dn_new_labels [5, 2, 5] int64,  the noise (G, B, S), see above; fillers (j >= n_b)
  dn_box_u [5, 2, 5, 4]                                 are drawn too and never used
  dn_known_num [2] int64, dn_single_pad, dn_pad_size    boxes per image, S = 5, P = 25 (int64)
  dn_known_labels_noised [5, 2, 5] int64                the labels after the flip (fillers -1)
  dn_known_boxes_noised [5, 2, 5, 4]                    the boxes after noise and clamp (fillers 0)
  dn_input_query_label [2, 325, 256]                    the decoder's initial content, batch first, as
                                                        prepare_for_dn returns it: DN slot = [label_enc
                                                        (noised label), 1], padding slot = 0 (indicator
                                                        0 too), matching query = [label_enc(91), 0]
  dn_input_query_bbox [2, 325, 4]                       the initial anchors before sigmoid: DN slot =
                                                        inverse_sigmoid(noised box, eps 1e-3), padding
                                                        slot 0, matching query = refpoint_embed
  dn_attn_mask [325, 325] bool                          True = blocked (the decoder self-attention's
                                                        attn_mask, the same for both images): matching
                                                        rows block every DN column; DN rows of group g
                                                        block the other groups' columns and see their own
                                                        group (padding slots included) and every
                                                        matching query (checked against ``attn_mask``)
  references [6, 2, 325, 4]                             the anchors the decoder layers take (after
                                                        sigmoid), every query, as make_dab_ref's
  pred_logits [2, 300, 91], pred_boxes [2, 300, 4]      matching part of the last layer (after
                                                        dn_post_process)
  aux_pred_logits [3, 2, 300, 91], aux_logit_layers [3] the matching logits of decoder layers 0, 2, 4
                                                        only (AUX_LOGIT_LAYERS; 1 and 3 are left out for
                                                        size: the loss_ce_1 / _3 terms cover them)
  aux_pred_boxes [5, 2, 300, 4]                         matching boxes of layers 0..4
  dn_pred_logits [6, 2, 25, 91], dn_pred_boxes          denoising part of every layer (5 = last),
    [6, 2, 25, 4]                                       padding slots included
  <each of those five outputs>_f64                      the float64 run, stored as float32
  tgt{i}_labels [n_i] int64, tgt{i}_boxes [n_i, 4]      targets (n = 5, 3), labels in 1..90
  match/L{l}/img{i}_src, _tgt [n_i] int64               HungarianMatcher indices of the matching part of
                                                        layer l (L0..L4 aux, L5 final)
  match/L5/img{i}_C [300, n_i] float64                  final layer's cost matrix, recomputed in float64
  match_margin/L{l}/img{i} float64                      second-best minus best assignment cost (float64;
                                                        the float32 and float64 matchings agree)
  loss/<name>, weight/<name>, loss_total (float64)      every SetCriterion output of the float32 run:
                                                        loss_ce, class_error, loss_bbox, loss_giou,
                                                        loss_xy, loss_hw, cardinality_error, tgt_loss_ce,
                                                        tgt_class_error, tgt_loss_bbox, tgt_loss_giou and
                                                        their _0.._4 aux terms; the weight_dict; the sum
                                                        of loss * weight over the weight_dict keys
  loss_f64/<name>, loss_total_f64 (float64)             the same criterion on the float64 outputs
  grad/<key>                                            d loss_total / d parameter for GRAD_KEYS (the
                                                        float32 forward + backward; bbox_embed sums its
                                                        decoder-update and head uses)
  grad_f64/<key>                                        the same from the float64 run, stored as float32.
                                                        The float32 gap is about 1e-5 of the largest
                                                        entry, except refpoint_embed.weight: 1.1e-3 (a
                                                        few anchors, e.g. queries 179, 2, 88, differ by
                                                        0.15 to 0.4 % of their row: float32 rounding at
                                                        a kink of the anchor path)
  weights_seed, weights_sha256, layout_sha256, image_seed, image_sizes [2, 2] (h, w), images_sha256,
  target_seed, noise_seed, official_commit, spec        what was run
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import dab_layout  # noqa: E402
import official_layout  # noqa: E402
from make_dab_ref import (IMAGE_SEED, IMAGE_SIZES, TARGET_SEEDS, WEIGHTS_SEED, default_dtype,  # noqa: E402
                          import_official, targets)
from make_official_ref import margin, store_matching  # noqa: E402

OFFICIAL_COMMIT = "ff3902a"
ARGV = ["--modelname", "dn_dab_detr", "--use_dn", "--coco_path", "unused", "--device", "cpu"]
GROUPS, LABEL_NOISE, BOX_NOISE, NUM_CLASSES = 5, 0.2, 0.4, 91  # main.py's --scalar etc. (checked)
NOISE_SEEDS = range(1000)
TIE_MARGIN = 1e-3  # no used label draw this close to the flip threshold
AUX_LOGIT_LAYERS = [0, 2, 4]
GRAD_KEYS = ["label_enc.weight", "refpoint_embed.weight", "transformer.decoder.layers.0.sa_qcontent_proj.bias",
             "transformer.decoder.layers.0.sa_v_proj.bias", "transformer.decoder.layers.2.sa_qpos_proj.bias",
             "transformer.encoder.query_scale.layers.1.bias", "transformer.encoder.layers.5.norm2.weight",
             "transformer.decoder.ref_point_head.layers.0.bias", "transformer.decoder.ref_anchor_head.layers.1.bias",
             "transformer.decoder.layers.3.activation.weight", "transformer.decoder.norm.weight",
             "class_embed.bias", "bbox_embed.layers.2.bias"]


def make_state_dict(seed: int, num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
    """dab_layout's weights with ``label_enc.weight`` [num_classes + 1, 255] ~ N(0, 1) inserted after
    ``class_embed.bias`` (the official order), float32."""
    sd = {}
    for key, value in dab_layout.make_state_dict(seed, num_classes).items():
        sd[key] = value
        if key == "class_embed.bias":
            r = official_layout.stream(seed, "label_enc.weight")
            sd["label_enc.weight"] = r.standard_normal((num_classes + 1, dab_layout.D - 1)).astype(np.float32)
    return sd


def state_dict_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple]:
    shapes = {}
    for key, shape in dab_layout.state_dict_shapes(num_classes).items():
        shapes[key] = shape
        if key == "class_embed.bias":
            shapes["label_enc.weight"] = (num_classes + 1, dab_layout.D - 1)
    return shapes


def attn_mask(single_pad: int, queries: int = 300) -> np.ndarray:
    """[P + Q, P + Q] bool, True = blocked: the layout prepare_for_dn builds."""
    pad = GROUPS * single_pad
    mask = np.zeros((pad + queries,) * 2, bool)
    mask[pad:, :pad] = True
    for g in range(GROUPS):
        rows = slice(g * single_pad, (g + 1) * single_pad)
        mask[rows, :pad] = True
        mask[rows, rows] = False
    return mask


def make_noise(seed: int, counts) -> dict[str, np.ndarray]:
    """dn_label_u [G, B, S], dn_new_labels [G, B, S] int64, dn_box_u [G, B, S, 4]."""
    r = np.random.RandomState(seed)
    shape = (GROUPS, len(counts), max(counts))
    uniform = lambda s: (r.randint(0, 1 << 24, s) / (1 << 24)).astype(np.float32)  # exact, < 1
    label_u = uniform(shape)
    new_labels = r.randint(0, NUM_CLASSES, shape).astype(np.int64)
    return {"dn_label_u": label_u, "dn_new_labels": new_labels, "dn_box_u": uniform(shape + (4,))}


def flat_entries(counts):
    """(g, b, j) of the official flat order."""
    return [(g, b, j) for g in range(GROUPS) for b, n in enumerate(counts) for j in range(n)]


def expected_noised(noise: dict, tgts: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    """numpy transcription of prepare_for_dn's noise -> (labels [G, B, S] int64, fillers -1; boxes
    [G, B, S, 4] in ``dtype``, fillers 0)."""
    counts = [len(l) for l, _ in tgts]
    labels = np.full(noise["dn_label_u"].shape, -1, np.int64)
    boxes = np.zeros(noise["dn_box_u"].shape, dtype)
    for g, b, j in flat_entries(counts):
        flip = noise["dn_label_u"][g, b, j] < np.float32(LABEL_NOISE)  # float32 compare, as torch's
        labels[g, b, j] = noise["dn_new_labels"][g, b, j] if flip else tgts[b][0][j]
        box = tgts[b][1][j].astype(dtype)
        diff = np.concatenate([box[2:] / dtype(2), box[2:]])
        u = noise["dn_box_u"][g, b, j].astype(dtype)
        boxes[g, b, j] = np.clip(box + ((u * dtype(2) - dtype(1)) * diff) * dtype(BOX_NOISE), 0, 1)
    return labels, boxes


def noise_ok(noise: dict, tgts: list) -> bool:
    counts = [len(l) for l, _ in tgts]
    used = flat_entries(counts)
    u = np.array([noise["dn_label_u"][e] for e in used])
    if np.abs(u.astype(np.float64) - np.float64(np.float32(LABEL_NOISE))).min() < TIE_MARGIN:
        return False
    labels, _ = expected_noised(noise, tgts, np.float32)
    return all(any(labels[g, b, j] != tgts[b][0][j] for g in range(GROUPS) for j in range(n))
               for b, n in enumerate(counts))


class NoiseTorch:
    """``torch`` for dn_components: rand_like / randint_like return the numpy noise, in the official
    flat order; everything else is torch's."""

    def __init__(self, torch, noise: dict, counts):
        self._torch, self.counts, self.calls = torch, counts, []
        entries = flat_entries(counts)
        self._label_u = np.array([noise["dn_label_u"][e] for e in entries])
        self._new_labels = np.array([noise["dn_new_labels"][e] for e in entries])
        self._box_u = np.stack([noise["dn_box_u"][e] for e in entries])

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def rand_like(self, x, **kwargs):
        assert not kwargs, kwargs
        value = {1: self._label_u, 2: self._box_u}[x.dim()]
        assert tuple(x.shape) == value.shape, (x.shape, value.shape)
        self.calls.append(f"rand_like{tuple(x.shape)}")
        return self._torch.as_tensor(value).to(x.dtype)

    def randint_like(self, chosen, low, high, **kwargs):
        assert not kwargs and (low, high) == (0, NUM_CLASSES), (low, high, kwargs)
        self.calls.append(f"randint_like{tuple(chosen.shape)}")
        self.chosen = chosen.numpy().copy()
        return self._torch.as_tensor(self._new_labels[self.chosen]).to(chosen.dtype)


@contextlib.contextmanager
def on_cpu(torch):
    """``.cuda()`` returns the tensor, ``.to('cuda' / cuda device)`` goes to the cpu instead."""
    real_cuda, real_to = torch.Tensor.cuda, torch.Tensor.to
    is_cuda = lambda a: (isinstance(a, str) and a.startswith("cuda")) or (isinstance(a, torch.device)
                                                                          and a.type == "cuda")

    def to(self, *args, **kwargs):
        args = tuple("cpu" if is_cuda(a) else a for a in args)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return real_to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = (lambda self, *a, **k: self), to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = real_cuda, real_to


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="an export of IDEA-Research/DN-DETR")
    parser.add_argument("--out", type=Path, default=HERE / "dn_dab_r50.npz")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch, build_model, get_args_parser = import_official(args.official, backbone="models.DN_DAB_DETR.backbone")
    torch.set_num_threads(args.threads)
    import models.DN_DAB_DETR.dn_components as dn_components
    import models.DN_DAB_DETR.matcher
    from util.misc import NestedTensor

    margs = get_args_parser().parse_args(ARGV)
    assert (margs.scalar, margs.label_noise_scale, margs.box_noise_scale, margs.num_patterns) == (
        GROUPS, LABEL_NOISE, BOX_NOISE, 0)
    for argv, classes in ((["--dataset_file", "voc"], 20), ([], 91)):  # the official layout, 91 last
        official = {k: tuple(v.shape) for k, v in build_model(get_args_parser().parse_args(ARGV + argv))[0]
                    .state_dict().items()}
        assert list(official.items()) == list(state_dict_shapes(classes).items()), classes
    model, criterion, _ = build_model(margs)
    state_dict = make_state_dict(WEIGHTS_SEED)
    load = lambda sd: model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    images, masks = official_layout.noise_batch(IMAGE_SEED, IMAGE_SIZES)
    samples = NestedTensor(torch.from_numpy(images), torch.from_numpy(masks))
    out = {"weights_seed": np.int64(WEIGHTS_SEED),
           "weights_sha256": np.str_(official_layout.weights_sha256(state_dict)),
           "layout_sha256": np.str_(official_layout.layout_sha256(official)), "image_seed": np.int64(IMAGE_SEED),
           "image_sizes": np.array(IMAGE_SIZES, np.int64),
           "images_sha256": np.str_(official_layout.array_sha256(images)),
           "official_commit": np.str_(OFFICIAL_COMMIT), "aux_logit_layers": np.array(AUX_LOGIT_LAYERS, np.int64)}
    report = {}

    # side check: label_enc = 0, eval mode (no denoising) is DAB-DETR: compare with dab_r50.npz
    dab_npz = HERE / "dab_r50.npz"
    if dab_npz.exists():
        load({**state_dict, "label_enc.weight": np.zeros_like(state_dict["label_enc.weight"])})
        model.eval()
        dab = official_layout.load_npz(dab_npz)
        for suffix, dtype in (("", torch.float32), ("_f64", torch.float64)):
            with torch.no_grad(), on_cpu(torch), default_dtype(torch, dtype):
                o, mask_dict = model.to(dtype)(NestedTensor(samples.tensors.to(dtype), samples.mask), dn_args=0)
            assert mask_dict is None
            report[f"vs dab_r50.npz{suffix} (label_enc = 0, eval), max abs"] = max(
                max(np.abs(o[k].numpy() - dab[k + suffix]).max(),
                    np.abs(np.stack([a[k].numpy() for a in o["aux_outputs"]]) - dab[f"aux_{k}{suffix}"]).max())
                for k in ("pred_logits", "pred_boxes"))
        model.float()

    load(state_dict)
    # the matching part does not see the denoising queries: the eval-mode forward picks the target seed
    model.eval()
    with torch.no_grad(), on_cpu(torch):
        plain, _ = model(samples, dn_args=0)
    plain_layers = [*plain["aux_outputs"], plain]

    solved = []
    real_lsa = models.DN_DAB_DETR.matcher.linear_sum_assignment
    models.DN_DAB_DETR.matcher.linear_sum_assignment = lambda c: (solved.append(np.asarray(c).copy()), real_lsa(c))[1]

    def match(layers, tgts):
        """[(indices, float64 cost matrices) per layer], smallest float64 margin."""
        result = []
        for o in layers:
            o = {k: o[k].detach() for k in ("pred_logits", "pred_boxes")}
            indices = criterion.matcher(o, tgts)
            solved.clear()
            indices64 = criterion.matcher({k: v.double() for k, v in o.items()},
                                          [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in tgts])
            for (s, t), (s64, t64) in zip(indices, indices64):
                assert s.tolist() == s64.tolist() and t.tolist() == t64.tolist(), "float32 / float64 matchings differ"
            result.append((indices, list(solved)))
        return result, min(margin(c) for _, costs in result for c in costs)

    torch_targets = lambda seed, dtype=torch.float32: [
        {"labels": torch.from_numpy(l), "boxes": torch.from_numpy(b).to(dtype)} for l, b in targets(seed)]
    target_seed = max(TARGET_SEEDS, key=lambda s: match(plain_layers, torch_targets(s))[1])
    np_targets = targets(target_seed)
    counts = [len(l) for l, _ in np_targets]
    S, P = max(counts), GROUPS * max(counts)
    noise_seed = next(s for s in NOISE_SEEDS if noise_ok(make_noise(s, counts), np_targets))
    noise = make_noise(noise_seed, counts)
    out.update(noise)
    out.update(target_seed=np.int64(target_seed), noise_seed=np.int64(noise_seed),
               dn_known_num=np.array(counts, np.int64), dn_single_pad=np.int64(S), dn_pad_size=np.int64(P))

    def dn_forward(tgts, dtype):
        """The training forward with the fed noise -> (outputs, mask_dict, captured, the proxy)."""
        proxy = NoiseTorch(torch, noise, counts)
        captured = {"label_enc_inputs": []}
        real_inverse_sigmoid = dn_components.inverse_sigmoid

        def inverse_sigmoid(x, *a, **k):
            captured["noised_boxes"] = x.detach().clone()
            return real_inverse_sigmoid(x, *a, **k)

        def pre_hook(module, a, kw):
            captured.update(query_bbox=a[2].detach().transpose(0, 1).clone(),
                            query_label=kw["tgt"].detach().transpose(0, 1).clone(), attn_mask=kw["attn_mask"].clone())

        hooks = [model.label_enc.register_forward_hook(lambda m, i, o: captured["label_enc_inputs"].append(i[0])),
                 model.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
                 model.transformer.register_forward_hook(lambda m, i, o: captured.update(references=o[1].detach()))]
        dn_components.torch, dn_components.inverse_sigmoid = proxy, inverse_sigmoid
        try:
            model.train()
            with on_cpu(torch), default_dtype(torch, dtype):
                outputs, mask_dict = model(samples if dtype == torch.float32 else
                                           NestedTensor(samples.tensors.double(), samples.mask),
                                           dn_args=(tgts, GROUPS, LABEL_NOISE, BOX_NOISE, 0))
        finally:
            dn_components.torch, dn_components.inverse_sigmoid = torch, real_inverse_sigmoid
            for hook in hooks:
                hook.remove()
        assert proxy.calls == [f"rand_like({GROUPS * sum(counts)},)", f"randint_like({len(proxy.chosen)},)",
                               f"rand_like({GROUPS * sum(counts)}, 4)"], proxy.calls
        return outputs, mask_dict, captured, proxy

    def padded(flat, filler, entries):
        """flat official-order values -> [G, B, S, ...]."""
        result = np.full((GROUPS, len(counts), S) + flat.shape[1:], filler, flat.dtype)
        for value, entry in zip(flat, entries):
            result[entry] = value
        return result

    def check_noise(captured, proxy, dtype):
        entries = flat_entries(counts)
        labels, boxes = expected_noised(noise, np_targets, dtype)
        got_labels = padded(captured["label_enc_inputs"][1].numpy(), -1, entries)
        got_boxes = padded(captured["noised_boxes"].numpy(), 0, entries)
        chosen = [entries[k] for k in proxy.chosen]
        assert chosen == [e for e in entries if noise["dn_label_u"][e] < np.float32(LABEL_NOISE)]
        assert np.array_equal(got_labels, labels), "noised labels differ from the transcription"
        assert got_boxes.dtype == dtype and np.array_equal(got_boxes, boxes), (
            "noised boxes differ from the transcription", np.abs(got_boxes - boxes).max())
        return got_labels, got_boxes, chosen

    def store(outputs, mask_dict, suffix, store_aux_logits=True):
        layers = [*outputs["aux_outputs"], outputs]
        out["pred_logits" + suffix] = outputs["pred_logits"].detach().numpy().astype(np.float32)
        out["pred_boxes" + suffix] = outputs["pred_boxes"].detach().numpy().astype(np.float32)
        out["aux_pred_boxes" + suffix] = np.stack([o["pred_boxes"].detach().numpy() for o in layers[:-1]]
                                                  ).astype(np.float32)
        out["aux_pred_logits" + suffix] = np.stack([layers[l]["pred_logits"].detach().numpy()
                                                    for l in AUX_LOGIT_LAYERS]).astype(np.float32)
        known_class, known_coord = mask_dict["output_known_lbs_bboxes"]
        out["dn_pred_logits" + suffix] = known_class.detach().numpy().astype(np.float32)
        out["dn_pred_boxes" + suffix] = known_coord.detach().numpy().astype(np.float32)
        return layers

    # float32: forward, matching, criterion, backward
    tgts = torch_targets(target_seed)
    outputs, mask_dict, captured, proxy = dn_forward(tgts, torch.float32)
    labels_noised, boxes_noised, chosen = check_noise(captured, proxy, np.float32)
    assert mask_dict["pad_size"] == P and captured["query_label"].shape == (2, P + 300, dab_layout.D)
    assert np.array_equal(captured["attn_mask"].numpy(), attn_mask(S))
    out.update(dn_known_labels_noised=labels_noised, dn_known_boxes_noised=boxes_noised,
               dn_input_query_label=captured["query_label"].numpy(), dn_input_query_bbox=captured["query_bbox"].numpy(),
               dn_attn_mask=captured["attn_mask"].numpy(), references=captured["references"].numpy())
    layers = store(outputs, mask_dict, "")
    matched, smallest = match(layers, tgts)
    store_matching(out, tgts, matched, np.float64)
    models.DN_DAB_DETR.matcher.linear_sum_assignment = real_lsa
    report["matching part, training vs eval forward"] = max(
        np.abs(a[k].detach().numpy() - b[k].numpy()).max() for a, b in zip(layers, plain_layers)
        for k in ("pred_logits", "pred_boxes"))

    criterion.train()
    with on_cpu(torch):
        losses = criterion(outputs, tgts, mask_dict)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    parameters = dict(model.named_parameters(remove_duplicate=False))
    out.update({f"grad/{k}": parameters[k].grad.numpy().copy() for k in GRAD_KEYS})
    out.update({f"loss/{k}": np.float64(v.item()) for k, v in losses.items()})
    out.update({f"weight/{k}": np.float64(w) for k, w in criterion.weight_dict.items()})
    out["loss_total"] = np.float64(total.item())

    # float64: the same noise
    model.zero_grad()
    model.double()
    tgts64 = torch_targets(target_seed, torch.float64)
    outputs64, mask_dict64, captured64, proxy64 = dn_forward(tgts64, torch.float64)
    check_noise(captured64, proxy64, np.float64)
    store(outputs64, mask_dict64, "_f64")
    with on_cpu(torch):
        losses64 = criterion(outputs64, tgts64, mask_dict64)
    total64 = sum(losses64[k] * w for k, w in criterion.weight_dict.items())
    total64.backward()
    out.update({f"grad_f64/{k}": parameters[k].grad.numpy().astype(np.float32) for k in GRAD_KEYS})
    report["grad f32 vs f64, max abs / max |grad|"] = ", ".join(
        f"{k} {np.abs(out[f'grad/{k}'] - out[f'grad_f64/{k}']).max() / np.abs(out[f'grad_f64/{k}']).max():.1e}"
        for k in GRAD_KEYS)
    out.update({f"loss_f64/{k}": np.float64(v.item()) for k, v in losses64.items()})
    out["loss_total_f64"] = np.float64(total64.item())
    report["attn mask f32 == f64, queries"] = (
        bool(torch.equal(captured64["attn_mask"], captured["attn_mask"])),
        np.abs(captured64["query_bbox"].numpy() - out["dn_input_query_bbox"]).max())
    out["spec"] = np.str_(
        f"official DN-DAB-DETR (IDEA-Research/DN-DETR {OFFICIAL_COMMIT}, build_model_main, main.py defaults + "
        f"{' '.join(ARGV)}; training mode, denoising 5 groups / label 0.2 / box 0.4 with the noise fed from "
        f"numpy (noise seed {noise_seed}), CPU, {args.threads} thread(s)), torch {torch.__version__}; weights "
        f"dab_layout.make_state_dict({WEIGHTS_SEED}) + label_enc N(0, 1); shims: datasets, engine, termcolor, "
        "addict, yapf, timm, MultiScaleDeformableAttention stubbed, is_main_process -> False, torchvision "
        "nms/qnms schemas declared, .cuda()/.to('cuda') kept on the cpu, dn_components.torch -> NoiseTorch, "
        "float64 run under torch.set_default_dtype(float64); see tests/data/make_dn_ref.py")
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {len(out)} arrays)")
    print_report(out, report, smallest, chosen, criterion.weight_dict)


def print_report(out: dict, report: dict, smallest: float, chosen: list, weight_dict: dict) -> None:
    for k, v in report.items():
        print(f"{k}: {v}")
    gaps = {k: np.abs(out[k] - out[k + "_f64"]).max() for k in ("pred_logits", "pred_boxes", "aux_pred_logits",
                                                                "aux_pred_boxes", "dn_pred_logits", "dn_pred_boxes")}
    print("float32 vs float64: " + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    for name in ("dn_pred_logits", "dn_pred_boxes"):
        per_layer = np.abs(out[name] - out[name + "_f64"]).max((1, 2, 3))
        print(f"  {name} gap per layer {np.array2string(per_layer, precision=2)}")
    print(f"target seed {int(out['target_seed'])}: smallest matching margin {smallest:.4f}; margins "
          + " ".join(f"{float(v):.3f}" for k, v in out.items() if k.startswith("match_margin/")))
    print(f"noise seed {int(out['noise_seed'])}: flipped (g, b, j) {chosen}")
    for b in range(2):
        print(f"  image {b}: labels {out[f'tgt{b}_labels'].tolist()} -> noised\n"
              + "\n".join(f"    g{g} {out['dn_known_labels_noised'][g, b].tolist()}" for g in range(GROUPS)))
    boxes = out["dn_known_boxes_noised"][out["dn_known_labels_noised"] >= 0]
    print(f"noised boxes (cx cy w h) min {boxes.min(0).round(3)} max {boxes.max(0).round(3)} (the clamp to "
          f"[0, 1] changes nothing: {bool(((boxes > 0) & (boxes < 1)).all())})")
    rows = np.flatnonzero(np.abs(out["grad/label_enc.weight"]).max(1))
    print(f"label_enc rows with a gradient: {rows.tolist()}")
    hs_spread = out["pred_boxes"].std(1).mean()
    scores = 1 / (1 + np.exp(-out["pred_logits"]))
    print(f"matching part: max score {scores.max():.3f}, sd of final boxes over queries {hs_spread:.3f}")
    dn_scores = 1 / (1 + np.exp(-out["dn_pred_logits"]))
    print(f"dn part: max score per layer {np.round(dn_scores.max((1, 2, 3)), 3)}")
    loss_gap = max(abs(out[f"loss/{k}"] - out[f"loss_f64/{k}"]) / max(abs(out[f"loss_f64/{k}"]), 1e-12)
                   for k in weight_dict)
    print(f"loss_total {float(out['loss_total']):.6f} (f64 {float(out['loss_total_f64']):.6f}), largest relative "
          f"f32-vs-f64 gap of a weighted term {loss_gap:.2e}")
    print("losses: " + ", ".join(f"{k[5:]} {float(v):.4f}" for k, v in out.items() if k.startswith("loss/")))


if __name__ == "__main__":
    main()
