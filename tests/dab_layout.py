"""Synthetic DAB-DETR weights in the official PyTorch state_dict layout: numpy only, deterministic from
a seed (the reference of tests/data/dab_r50.npz, made by tests/data/make_dab_ref.py).

``make_state_dict(seed, num_classes=91)`` gives a float32 array for every key of IDEA-Research/DAB-DETR's
``build_DABDETR`` (``--modelname dab_detr``) with main.py defaults: FrozenBatchNorm ResNet-50, 6 + 6
post-norm layers, d_model 256, 8 heads, FFN 2048, PReLU activations, 300 queries with 4-d anchors,
``num_classes`` focal-loss logits (no no-object logit), in the official order, so that the official model
loads it with ``strict=True`` (make_dab_ref.py checks the layout against the official code). The
``transformer.decoder.bbox_embed.*`` keys are the same module as ``bbox_embed.*`` (the iterative anchor
update uses the prediction head): both keys get the same array, drawn from the ``bbox_embed.*`` stream.

The values are not a trained model. The recipe (initialisation-like scales; the same as
Conditional DETR's reference weights for the analogous parts):

- every array has its own stream, ``official_layout.stream(seed, key)`` (legacy RandomState, frozen
  across numpy versions);
- the backbone (``backbone.0.body.*``) and ``input_proj`` are DETR's, ``official_layout``'s recipe:
  the backbone arrays are bit-identical to ``official_layout.make_state_dict(seed)``'s, input_proj is
  N(0, 1 / (3 fan_in)) with a bias that centres the projected layer4 features on their estimated mean;
- transformer matrices (the encoder's nn.MultiheadAttention in/out projections, the decoder's
  ``sa_*`` / ``ca_*`` projections and attention out_proj, FFNs, the encoder and decoder
  ``query_scale``, ``ref_point_head``, ``ref_anchor_head`` MLPs): Xavier uniform, as the official
  ``Transformer._reset_parameters``;
- the decoder's cross-attention query positional projections ``ca_qpos_proj`` (layer 0 only) and
  ``ca_qpos_sine_proj`` (weights): Xavier x POS_SCALE (8). The decoder content starts at zero, so the
  queries differ only through where their anchors make them look; with plain Xavier they nearly
  collapse (the decoder outputs' spread over queries falls to a fifth). Scaling the keys'
  ``ca_kpos_proj`` or the self-attention ``sa_qpos_proj`` / ``sa_kpos_proj`` as well adds float32
  rounding (about x40 on the logits at 8) but not spread, so they keep Xavier. The cross-attention
  ``out_proj.weight`` is Xavier x CROSS_ATTENTION_GAIN (2, like official_layout's DETR weights), which
  spreads the queries a little more;
- every bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm weight U(0.8, 1.2), bias U(-0.1, 0.1);
- PReLU slopes (``*.activation.weight``, one per encoder and decoder layer) 0.25 + U(-0.1, 0.1)
  (the official init is exactly 0.25);
- ``refpoint_embed.weight`` (the unsigmoided anchors, cx cy w h): inverse sigmoid of U(0.1, 0.9) for
  the centre and of U(ANCHOR_WH) for the size, so that the 300 anchors are spread over the image;
- heads: ``class_embed.weight`` U(-1, 1) * CLASS_SCALE / sqrt(fan_in), bias U(-1/sqrt(fan_in), ...)
  + CLASS_BIAS (-log(99), the official focal-loss prior); ``bbox_embed`` layers 0, 1 torch default
  U(-1/sqrt(fan_in), ...), layer 2 weight U(-1, 1) * BOX_SCALE / sqrt(fan_in) and bias
  U(-1/sqrt(fan_in), ...) + BOX_BIAS. The anchors are refined by the same head in every decoder layer
  (the logit deltas add up over 6 layers), so BOX_BIAS cancels the head's mean delta (measured on the
  official model with seed 2024 and the dump's batch) and BOX_SCALE (2) keeps the per-layer deltas
  moderate (sd 0.06 to 0.17 in logit space).

These constants were chosen on the official model (make_dab_ref.py prints the numbers): on the dump's
batch its float32-vs-float64 gap is about 5e-5 on the logits (3e-5 of it is already there after the
first decoder layer: the encoder's own rounding, as in the DETR reference) and 1.4e-6 on the boxes,
the largest sigmoid score is 0.7 to 0.99 per layer, the boxes stay within about (0.06, 0.93), the
refined anchors keep their spread (mean cx cy w h within 0.06 of the initial ones in every layer)
and the dump's matching margins are above 0.03. The sha256 of ``make_state_dict(2024)`` is stored in
the dump (``weights_sha256``).
"""
import math

import numpy as np

import official_layout

D, FFN, QUERIES, LAYERS, QUERY_DIM = 256, 2048, 300, 6, 4
POS_SCALE, CLASS_SCALE, BOX_SCALE = 8.0, 4.0, 2.0
CLASS_BIAS = -math.log((1 - 0.01) / 0.01)
# minus the mean anchor update (pre-sigmoid bbox_embed output) over the 6 layers, seed 2024, the dump's batch
BOX_BIAS = (-0.001, -0.056, 0.003, 0.135)
ANCHOR_WH = (0.08, 0.35)
PRELU = (0.25, 0.1)  # centre, half-width
POS_KEYS = ("ca_qpos_proj.weight", "ca_qpos_sine_proj.weight")
CROSS_ATTENTION_GAIN = 2.0
DECODER_BOX = "transformer.decoder.bbox_embed."  # alias of bbox_embed.*


def state_dict_shapes(num_classes: int = 91) -> dict[str, tuple[int, ...]]:
    """{official key: shape} in the official state_dict order (transformer, heads, anchors, input_proj,
    backbone)."""
    shapes = {}

    def linear(name, n_out, n_in):
        shapes.update({f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)})

    def norm(name):
        shapes.update({f"{name}.weight": (D,), f"{name}.bias": (D,)})

    def mlp(name, *dims):
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
            linear(f"{name}.layers.{i}", n_out, n_in)

    def ffn_norms_prelu(layer, *norms):  # how both kinds of layer end
        linear(f"{layer}.linear1", FFN, D)
        linear(f"{layer}.linear2", D, FFN)
        for name in norms:
            norm(f"{layer}.{name}")
        shapes[f"{layer}.activation.weight"] = (1,)  # nn.PReLU()

    for i in range(LAYERS):
        layer = f"transformer.encoder.layers.{i}"
        shapes.update({f"{layer}.self_attn.in_proj_weight": (3 * D, D), f"{layer}.self_attn.in_proj_bias": (3 * D,)})
        linear(f"{layer}.self_attn.out_proj", D, D)
        ffn_norms_prelu(layer, "norm1", "norm2")
    mlp("transformer.encoder.query_scale", D, D, D)
    for i in range(LAYERS):
        layer = f"transformer.decoder.layers.{i}"
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "self_attn.out_proj"):
            linear(f"{layer}.{name}", D, D)
        norm(f"{layer}.norm1")
        for name in ("ca_qcontent_proj",) + (("ca_qpos_proj",) if i == 0 else ()) + (
                "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj", "cross_attn.out_proj"):
            linear(f"{layer}.{name}", D, D)
        ffn_norms_prelu(layer, "norm2", "norm3")
    norm("transformer.decoder.norm")
    mlp("transformer.decoder.query_scale", D, D, D)
    mlp("transformer.decoder.ref_point_head", QUERY_DIM // 2 * D, D, D)
    mlp("transformer.decoder.ref_anchor_head", D, D, 2)
    mlp(DECODER_BOX[:-1], D, D, D, 4)
    linear("class_embed", num_classes, D)
    mlp("bbox_embed", D, D, D, 4)
    shapes["refpoint_embed.weight"] = (QUERIES, QUERY_DIM)
    shapes.update({"input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,)})
    shapes.update({k: v for k, v in official_layout.state_dict_shapes().items()
                   if k.startswith(official_layout.BACKBONE)})
    return shapes


def _uniform(r, shape, bound):
    return r.uniform(-bound, bound, shape)


def _logit(p):
    return np.log(p / (1 - p))


def _value(seed: int, key: str, shape: tuple, shapes: dict) -> np.ndarray:
    """float64 value of one non-backbone, non-input_proj key."""
    r = official_layout.stream(seed, key)
    if key == "refpoint_embed.weight":
        centre, size = r.uniform(0.1, 0.9, (shape[0], 2)), r.uniform(*ANCHOR_WH, (shape[0], 2))
        return _logit(np.concatenate([centre, size], 1))
    if key.endswith("activation.weight"):
        return PRELU[0] + _uniform(r, shape, PRELU[1])
    if ".norm" in key:
        return r.uniform(0.8, 1.2, shape) if key.endswith("weight") else r.uniform(-0.1, 0.1, shape)
    if key.endswith("bias"):
        fan_in = shapes[key[:-len("bias")] + "weight"][1]  # x.bias -> x.weight, in_proj_bias -> in_proj_weight
        value = _uniform(r, shape, 1 / math.sqrt(fan_in))
        if key == "class_embed.bias":
            value += CLASS_BIAS
        elif key == "bbox_embed.layers.2.bias":
            value += BOX_BIAS
        return value
    fan_in = shape[1]
    if key == "class_embed.weight":
        return _uniform(r, shape, CLASS_SCALE / math.sqrt(fan_in))
    if key.startswith("bbox_embed."):
        return _uniform(r, shape, (BOX_SCALE if ".layers.2." in key else 1.0) / math.sqrt(fan_in))
    assert key.startswith("transformer."), key
    value = _uniform(r, shape, math.sqrt(6 / (shape[0] + shape[1])))  # Xavier
    if key.endswith("cross_attn.out_proj.weight"):
        return value * CROSS_ATTENTION_GAIN
    return value * POS_SCALE if key.endswith(POS_KEYS) else value


def make_state_dict(seed: int, num_classes: int = 91) -> dict[str, np.ndarray]:
    """float32 {official key: array} (see the module docstring for the recipe)."""
    shapes = state_dict_shapes(num_classes)
    sd = {}
    for key, shape in shapes.items():
        if key.startswith(official_layout.BACKBONE) or key.startswith("input_proj."):
            continue
        canonical = key[len("transformer.decoder."):] if key.startswith(DECODER_BOX) else key
        sd[key] = _value(seed, canonical, shape, shapes)
    backbone, features = official_layout._backbone(seed, "resnet50")
    sd.update(backbone)
    weight = official_layout.stream(seed, "input_proj.weight").standard_normal(shapes["input_proj.weight"])
    sd["input_proj.weight"] = weight * (3 * 2048) ** -0.5
    sd["input_proj.bias"] = (0.02 * official_layout.stream(seed, "input_proj.bias").standard_normal(D)
                             - sd["input_proj.weight"][:, :, 0, 0] @ features.mean)
    return {key: np.ascontiguousarray(sd[key], np.float32) for key in shapes}
