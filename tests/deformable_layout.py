"""Synthetic Deformable DETR weights in the official PyTorch state_dict layout: numpy only,
deterministic from a seed (the weights of tests/data/deformable_r50.npz and
deformable_r50_refine_twostage.npz, made by tests/data/make_deformable_ref.py).

``make_state_dict(seed, num_classes=91, with_box_refine=False, two_stage=False)`` gives a float32 array
for every key of fundamentalvision/Deformable-DETR's ``build_model`` (@11169a6) with main.py defaults
(FrozenBatchNorm ResNet-50 whose layer2/3/4 feed 4 feature levels, the 4th a 3x3 stride-2 conv of
layer4, each level through a conv + GroupNorm(32) ``input_proj``; 6 + 6 post-norm layers, d_model 256,
8 heads, 4 sampling points per level and head, FFN 1024, 300 queries, ``num_classes`` sigmoid
focal-loss logits and no no-object logit), with the official key names, order and shapes, so the
official model loads it with ``strict=True`` (make_deformable_ref.py checks the layout against the
official code, also with 20 classes).

Keys that are one tensor in the official model hold one array, drawn from the stream of a canonical
key (``canonical_key``):

- plain model: ``class_embed.{0..5}`` is one nn.Linear and ``bbox_embed.{0..5}`` one MLP (a ModuleList
  of the same module six times): every index holds index 0's array;
- ``--with_box_refine``: 6 independent heads (7 with ``--two_stage``, index 6 the encoder's proposal
  head), and ``transformer.decoder.bbox_embed.i`` is ``bbox_embed.i``; ``--two_stage``:
  ``transformer.decoder.class_embed.i`` is ``class_embed.i`` (the canonical key is the top-level one).
  Two-stage has no ``query_embed`` nor ``transformer.reference_points``, but ``enc_output`` (+ norm)
  and ``pos_trans`` (+ norm).

The values are not a trained model. They are drawn at initialisation-like scales, with the gains that
make the official model's outputs healthy (scores not saturated, queries not collapsed, several
argmax classes, matching margins well above the float32 noise):

- every array has its own stream, ``official_layout.stream(seed, canonical key)`` (legacy RandomState
  seeded with sha256("{seed}/{key}"), frozen across numpy versions), drawn in float64, cast to float32;
- backbone (``backbone.0.body.*``): ``official_layout``'s, bit for bit (He-normal convs,
  FrozenBatchNorm statistics from a mean-field estimate);
- matrices of the transformer (MSDeformAttn ``value_proj`` / ``output_proj``, the decoder's
  nn.MultiheadAttention ``in_proj_weight`` (one [768, 256] Xavier draw) and ``out_proj``, FFNs,
  ``enc_output``, ``pos_trans``) and the ``input_proj`` convs: Xavier uniform (the official init);
- every other bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default); LayerNorm and GroupNorm weight
  U(0.8, 1.2), bias U(-0.1, 0.1);
- ``transformer.level_embed`` N(0, 1) and ``query_embed.weight`` N(0, 1) (the official inits);
- MSDeformAttn: ``sampling_offsets.weight`` U(-1, 1) * SAMPLING_OFFSET_GAIN (0.5) / sqrt(256) (the
  official init is 0: the queries would all sample the same pattern around their reference point),
  ``sampling_offsets.bias`` the official grid init (head h points along the angle 2 pi h / 8, scaled to
  max |coordinate| 1, times point index + 1, equal for all levels) + U(-GRID_NOISE, GRID_NOISE) (0.25);
  ``attention_weights.weight`` U(-1, 1) * ATTENTION_WEIGHT_GAIN (1) / sqrt(256) (official: 0, uniform
  weights);
- plain: ``transformer.reference_points.weight`` Xavier x REFERENCE_GAIN (0.6): the reference points
  sigmoid(W query_pos + b) then stay inside about (0.05, 0.95);
- heads: ``class_embed.weight`` U(-1, 1) * CLASS_GAIN (3) / sqrt(256), bias U(-1/16, 1/16) + CLASS_BIAS
  (-log(99) = -4.595, the official focal-loss prior; the shared reference's gain 4 gives scores up to
  0.993..0.999 with this backbone); ``bbox_embed`` layers 0 and 1 torch default
  U(-1/16, 1/16), layer 2 weight U(-1, 1) * BOX_GAIN (2) / sqrt(256), bias U(-1/16, 1/16) + BOX_BIAS:
  (0, 0, -1.5, -1.5) for the plain model and box refine (the official init sets w, h to -2), (0, 0,
  0.3, 0.3) for two-stage (whose proposals already carry w, h; the official init sets 0).

The other gains are those of the project's shared Deformable DETR reference (measured there on the
official model). With seed 2027 on the dumps' batch (make_deformable_ref.py prints these; with 2024 and
about half of the seeds 2025..2045 the two-stage proposal head ranks image 1's padded tokens, which all share
one logit, among the 300 proposals, and 2025's backbone differs by one ulp between numpy 1.26 and 2.4):
float32 vs float64 logits 1.0e-5 / 1.4e-5 (plain / refine + two-stage), boxes 2.4e-7 / 8.6e-7; scores up
to 0.982 / 0.877; boxes in [0.052, 0.937] / [0.010, 0.991]; 14 / 6 argmax classes in the final layer (64 /
5 in layer 0); matching margins >= 0.067 / 0.034; the 300th proposal 2.5 above the padded tokens.
The sha256 of ``make_state_dict(2027, ...)`` is the same with numpy 1.26.4 and 2.4.6.
"""
import math

import numpy as np

import official_layout
from official_layout import BACKBONE, _backbone, stream

D, FFN, QUERIES, LAYERS, HEADS, LEVELS, POINTS = 256, 1024, 300, 6, 8, 4, 4
BACKBONE_CHANNELS = (512, 1024, 2048)  # layer2, layer3, layer4
SAMPLING_OFFSET_GAIN, GRID_NOISE, ATTENTION_WEIGHT_GAIN = 0.5, 0.25, 1.0
REFERENCE_GAIN = 0.6
CLASS_GAIN, BOX_GAIN = 3.0, 2.0
CLASS_BIAS = -math.log((1 - 0.01) / 0.01)  # -4.595, the official focal-loss prior (prior_prob 0.01)
BOX_BIAS = {False: (0.0, 0.0, -1.5, -1.5), True: (0.0, 0.0, 0.3, 0.3)}  # by two_stage


def state_dict_shapes(num_classes: int = 91, with_box_refine: bool = False,
                      two_stage: bool = False) -> dict[str, tuple[int, ...]]:
    """{official key: shape} in the official state_dict order (transformer, heads, query_embed,
    input_proj, backbone), aliases of one module included."""
    shapes = {}
    num_pred = LAYERS + 1 if two_stage else LAYERS

    def linear(name, n_out, n_in):
        shapes.update({f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)})

    def norm(name, n=D):
        shapes.update({f"{name}.weight": (n,), f"{name}.bias": (n,)})

    def msdeform(name):
        linear(f"{name}.sampling_offsets", HEADS * LEVELS * POINTS * 2, D)
        linear(f"{name}.attention_weights", HEADS * LEVELS * POINTS, D)
        linear(f"{name}.value_proj", D, D)
        linear(f"{name}.output_proj", D, D)

    def box_mlp(name):
        for i, n_out in enumerate((D, D, 4)):
            linear(f"{name}.layers.{i}", n_out, D)

    shapes["transformer.level_embed"] = (LEVELS, D)
    for i in range(LAYERS):
        layer = f"transformer.encoder.layers.{i}"
        msdeform(f"{layer}.self_attn")
        norm(f"{layer}.norm1")
        linear(f"{layer}.linear1", FFN, D)
        linear(f"{layer}.linear2", D, FFN)
        norm(f"{layer}.norm2")
    for i in range(LAYERS):
        layer = f"transformer.decoder.layers.{i}"
        msdeform(f"{layer}.cross_attn")
        norm(f"{layer}.norm1")
        shapes.update({f"{layer}.self_attn.in_proj_weight": (3 * D, D), f"{layer}.self_attn.in_proj_bias": (3 * D,)})
        linear(f"{layer}.self_attn.out_proj", D, D)
        norm(f"{layer}.norm2")
        linear(f"{layer}.linear1", FFN, D)
        linear(f"{layer}.linear2", D, FFN)
        norm(f"{layer}.norm3")
    if with_box_refine:  # registered on the decoder after its layers: bbox_embed, then class_embed
        for i in range(num_pred):
            box_mlp(f"transformer.decoder.bbox_embed.{i}")
    if two_stage:
        for i in range(num_pred):
            linear(f"transformer.decoder.class_embed.{i}", num_classes, D)
        linear("transformer.enc_output", D, D)
        norm("transformer.enc_output_norm")
        linear("transformer.pos_trans", 2 * D, 2 * D)
        norm("transformer.pos_trans_norm", 2 * D)
    else:
        linear("transformer.reference_points", 2, D)
    for i in range(num_pred):
        linear(f"class_embed.{i}", num_classes, D)
    for i in range(num_pred):
        box_mlp(f"bbox_embed.{i}")
    if not two_stage:
        shapes["query_embed.weight"] = (QUERIES, 2 * D)
    for level, c_in in enumerate(BACKBONE_CHANNELS):
        shapes.update({f"input_proj.{level}.0.weight": (D, c_in, 1, 1), f"input_proj.{level}.0.bias": (D,)})
        norm(f"input_proj.{level}.1")
    shapes.update({"input_proj.3.0.weight": (D, BACKBONE_CHANNELS[-1], 3, 3), "input_proj.3.0.bias": (D,)})
    norm("input_proj.3.1")
    shapes.update({k: v for k, v in official_layout.state_dict_shapes().items() if k.startswith(BACKBONE)})
    return shapes


def canonical_key(key: str, with_box_refine: bool = False) -> str:
    """The key whose stream gives ``key``'s array: keys of one official tensor share it."""
    for head in ("bbox_embed.", "class_embed."):
        if key.startswith("transformer.decoder." + head):
            key = key[len("transformer.decoder."):]
        if key.startswith(head) and not with_box_refine:
            _, _, rest = key.split(".", 2)
            key = f"{head}0.{rest}"
    return key


def _xavier(r: np.random.RandomState, shape: tuple) -> np.ndarray:
    receptive = int(np.prod(shape[2:]))
    bound = math.sqrt(6 / ((shape[0] + shape[1]) * receptive))
    return r.uniform(-bound, bound, shape)


def _grid_init() -> np.ndarray:
    """The official sampling_offsets.bias init, [HEADS * LEVELS * POINTS * 2] (float64)."""
    theta = np.arange(HEADS) * (2 * math.pi / HEADS)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = grid[:, None, None, :] * (np.arange(POINTS) + 1)[None, None, :, None]
    return np.broadcast_to(grid, (HEADS, LEVELS, POINTS, 2)).reshape(-1)


def _draw(seed: int, key: str, shapes: dict, two_stage: bool) -> np.ndarray:
    """The float64 array of a canonical key."""
    r, shape = stream(seed, key), shapes[key]
    name, _, leaf = key.rpartition(".")
    is_norm = ".norm" in key or name.endswith("_norm") or (key.startswith("input_proj.") and name.endswith(".1"))
    if is_norm:
        return r.uniform(0.8, 1.2, shape) if leaf == "weight" else r.uniform(-0.1, 0.1, shape)
    if key in ("transformer.level_embed", "query_embed.weight"):
        return r.standard_normal(shape)
    if leaf in ("bias", "in_proj_bias"):
        fan_in = shapes[key[: -len("bias")] + "weight"][1:]
        bound = 1 / math.sqrt(int(np.prod(fan_in)))
        if key.endswith("sampling_offsets.bias"):
            return _grid_init() + r.uniform(-GRID_NOISE, GRID_NOISE, shape)
        value = r.uniform(-bound, bound, shape)
        if key.startswith("class_embed."):
            value += CLASS_BIAS
        elif key.startswith("bbox_embed.") and name.endswith("layers.2"):
            value += BOX_BIAS[two_stage]
        return value
    gain = 1.0
    if key.startswith("class_embed."):
        gain = CLASS_GAIN
    elif key.startswith("bbox_embed."):
        gain = BOX_GAIN if name.endswith("layers.2") else 1.0
    elif name.endswith("sampling_offsets"):
        gain = SAMPLING_OFFSET_GAIN
    elif name.endswith("attention_weights"):
        gain = ATTENTION_WEIGHT_GAIN
    else:  # transformer matrices and the input_proj convs: Xavier uniform
        return _xavier(r, shape) * (REFERENCE_GAIN if key == "transformer.reference_points.weight" else 1.0)
    return r.uniform(-1, 1, shape) * gain / math.sqrt(shape[1])


def make_state_dict(seed: int, num_classes: int = 91, with_box_refine: bool = False,
                    two_stage: bool = False) -> dict[str, np.ndarray]:
    """float32 {official key: array} (see the module docstring for the recipe)."""
    shapes = state_dict_shapes(num_classes, with_box_refine, two_stage)
    backbone_sd, _ = _backbone(seed, "resnet50")
    drawn = {}
    sd = {}
    for key in shapes:
        if key.startswith(BACKBONE):
            sd[key] = np.asarray(backbone_sd[key], np.float32)
            continue
        canonical = canonical_key(key, with_box_refine)
        if canonical not in drawn:
            drawn[canonical] = np.asarray(_draw(seed, canonical, shapes, two_stage), np.float32)
        sd[key] = drawn[canonical].copy()
    return {key: np.ascontiguousarray(sd[key]) for key in shapes}
