"""Synthetic Conditional DETR weights in the official PyTorch state_dict layout: numpy only,
deterministic from a seed (the weights of tests/data/conditional_r50.npz, made by
tests/data/make_conditional_ref.py).

``make_state_dict(seed, num_classes=91)`` gives a float32 array for every key of
Atten4Vis/ConditionalDETR's ``build_model`` with main.py defaults (FrozenBatchNorm ResNet-50, 6 + 6
post-norm layers, d_model 256, 8 heads, FFN 2048, 300 queries, ``num_classes`` sigmoid focal-loss
logits and no no-object logit), with the official key names, order and shapes, so the official model
loads it with ``strict=True`` (make_conditional_ref.py checks the layout against the official code,
also for ``--dataset_file voc``, 20 classes). The decoder's attentions have no ``in_proj``: the
``sa_*`` / ``ca_*`` Linear projections replace it, and ``ca_qpos_proj`` exists in layer 0 only.

The values are not a trained model. They are drawn at initialisation-like scales, with a few gains
chosen on the official model so that its outputs are healthy and its matching is robust:

- every array has its own stream, ``official_layout.stream(seed, key)`` (legacy RandomState seeded
  with sha256("{seed}/{key}"), frozen across numpy versions), drawn in float64, cast to float32;
- backbone (``backbone.0.body.*``): ``official_layout``'s, bit for bit (He-normal convs,
  FrozenBatchNorm statistics from a mean-field estimate); input_proj N(0, 1 / (3 fan_in)), its bias
  N(0, 0.02^2) minus weight @ (estimated mean of the layer4 features), as official_layout does;
- transformer matrices Xavier-uniform (the official ``_reset_parameters``), other biases
  N(0, 0.02^2), LayerNorm weight 1 + N(0, 0.1^2), bias N(0, 0.05^2); query_embed N(0, 1) (official);
- the decoder content starts at zero, so the 300 queries differ only through where they attend:
  the positional projections are Xavier x SA_POS_GAIN (4: ``sa_qpos_proj``, ``sa_kpos_proj``),
  x CA_POS_GAIN (6: ``ca_qpos_proj``, ``ca_kpos_proj``) and x SINE_GAIN (12: ``ca_qpos_sine_proj``),
  so that the attention differs across queries (without them the queries nearly collapse); the
  self-attention gain is lower, as sharper softmaxes make the float32 gradients noisy; the cross-attention
  ``out_proj`` is x 2 in decoder layer 0 and x 0.5 in layers 1..5 (CROSS_ATTENTION_GAIN): the
  later cross-attentions average the memory more broadly, and at full scale they wash out the
  queries' differences;
- ``ref_point_head.layers.1.bias`` also subtracts weight @ (mean over the 300 queries of its hidden
  layer, computed from query_embed in float64): the reference points are centred, in (0.08, 0.94);
- class_embed weight N(0, CLASS_STD^2 / 256) (CLASS_STD 0.6, which keeps the float32-vs-float64 gap
  of the logits near 1e-5), bias N(0, 0.02^2) + CLASS_BIAS (the official focal-loss prior -log(99) =
  -4.595, raised by 2.8: the best scores are near 0.6, none saturated);
- bbox_embed hidden layers He-normal, last layer N(0, BOX_STD^2 / 256) by row (cx, cy 0.5; w, h
  1.25), bias N(0, 0.02^2) + BOX_BIAS, which centres the mean over the 6 decoder layers of the
  pre-sigmoid offsets at (0, 0) for (cx, cy) (added to inverse_sigmoid(reference point)) and at
  -1.4 for (w, h) (boxes near 0.2); BOX_BIAS was measured on the official model with seed 2024 and
  the dump's images, and is hard-coded.

With seed 2024 on the dump's batch: float32 vs float64 logits 9.9e-6 (final) / 1.5e-5 (aux), boxes
2.7e-6 / 6.0e-6; scores in (0.02, 0.62); all boxes in [0.03, 0.97]; 6 to 11 argmax classes per
layer; matching margins >= 0.027 (make_conditional_ref.py prints them).
"""
import math

import numpy as np

import official_layout
from official_layout import BACKBONE, _backbone, stream

D, FFN, QUERIES, LAYERS = 256, 2048, 300, 6
SA_POS_GAIN, CA_POS_GAIN, SINE_GAIN = 4.0, 6.0, 12.0
CROSS_ATTENTION_GAIN = (2.0, 0.5)  # decoder layer 0, layers 1..5
CLASS_STD = 0.6
CLASS_BIAS = -math.log((1 - 0.01) / 0.01) + 2.8  # the official prior -4.595, raised by 2.8
BOX_STD = (0.5, 0.5, 1.25, 1.25)  # rows cx, cy, w, h of the last bbox_embed layer
BOX_BIAS = (0.22, 0.89, -1.88, -2.27)
DECODER_LINEARS = ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                   "self_attn.out_proj", "ca_qcontent_proj", "ca_qpos_proj", "ca_kcontent_proj", "ca_kpos_proj",
                   "ca_v_proj", "ca_qpos_sine_proj", "cross_attn.out_proj")


def state_dict_shapes(num_classes: int = 91) -> dict[str, tuple[int, ...]]:
    """{official key: shape} in the official state_dict order (transformer, heads, input_proj, backbone)."""
    shapes = {}

    def linear(name, n_out, n_in):
        shapes.update({f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)})

    def norm(name):
        shapes.update({f"{name}.weight": (D,), f"{name}.bias": (D,)})

    for i in range(LAYERS):
        layer = f"transformer.encoder.layers.{i}"
        shapes.update({f"{layer}.self_attn.in_proj_weight": (3 * D, D), f"{layer}.self_attn.in_proj_bias": (3 * D,)})
        linear(f"{layer}.self_attn.out_proj", D, D)
        linear(f"{layer}.linear1", FFN, D)
        linear(f"{layer}.linear2", D, FFN)
        norm(f"{layer}.norm1")
        norm(f"{layer}.norm2")
    for i in range(LAYERS):
        layer = f"transformer.decoder.layers.{i}"
        for name in DECODER_LINEARS:
            if name != "ca_qpos_proj" or i == 0:  # set to None in layers 1..5
                linear(f"{layer}.{name}", D, D)
        linear(f"{layer}.linear1", FFN, D)
        linear(f"{layer}.linear2", D, FFN)
        for n in (1, 2, 3):
            norm(f"{layer}.norm{n}")
    norm("transformer.decoder.norm")
    for head, n_out in (("query_scale", D), ("ref_point_head", 2)):
        linear(f"transformer.decoder.{head}.layers.0", D, D)
        linear(f"transformer.decoder.{head}.layers.1", n_out, D)
    linear("class_embed", num_classes, D)
    for i, n_out in enumerate((D, D, 4)):
        linear(f"bbox_embed.layers.{i}", n_out, D)
    shapes["query_embed.weight"] = (QUERIES, D)
    shapes.update({"input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,)})
    shapes.update({k: v for k, v in official_layout.state_dict_shapes().items() if k.startswith(BACKBONE)})
    return shapes


def _matrix_gain(key: str) -> float:
    """The factor on a transformer matrix's Xavier draw."""
    name = key[: -len(".weight")]
    if name.endswith(("sa_qpos_proj", "sa_kpos_proj")):
        return SA_POS_GAIN
    if name.endswith(("ca_qpos_proj", "ca_kpos_proj")):
        return CA_POS_GAIN
    if name.endswith("ca_qpos_sine_proj"):
        return SINE_GAIN
    if name.endswith("cross_attn.out_proj"):
        return CROSS_ATTENTION_GAIN[name != "transformer.decoder.layers.0.cross_attn.out_proj"]
    return 1.0


def make_state_dict(seed: int, num_classes: int = 91) -> dict[str, np.ndarray]:
    """float32 {official key: array} (see the module docstring for the recipe)."""
    shapes = state_dict_shapes(num_classes)
    sd = {}
    for key, shape in shapes.items():
        if key.startswith(BACKBONE):
            continue
        r = stream(seed, key)
        if key == "query_embed.weight":
            sd[key] = r.standard_normal(shape)
        elif ".norm" in key:
            sd[key] = 1 + 0.1 * r.standard_normal(shape) if key.endswith("weight") else 0.05 * r.standard_normal(shape)
        elif key.startswith("transformer.") and len(shape) == 2:
            bound = math.sqrt(6 / (shape[0] + shape[1]))
            sd[key] = r.uniform(-bound, bound, shape) * _matrix_gain(key)
        elif len(shape) == 1:
            sd[key] = 0.02 * r.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            std = {"class_embed.weight": CLASS_STD, "bbox_embed.layers.2.weight": np.array(BOX_STD)[:, None],
                   "input_proj.weight": 3 ** -0.5}.get(key, math.sqrt(2))  # else He-normal
            sd[key] = r.standard_normal(shape) * std / math.sqrt(fan_in)
    sd["class_embed.bias"] += CLASS_BIAS
    sd["bbox_embed.layers.2.bias"] += BOX_BIAS
    # centre the reference points: the ref_point_head's input is the query_embed weight itself
    head = "transformer.decoder.ref_point_head.layers"
    f64 = {k: sd[k].astype(np.float32).astype(np.float64) for k in ("query_embed.weight", f"{head}.0.weight",
                                                                  f"{head}.0.bias", f"{head}.1.weight")}
    hidden = np.maximum(f64["query_embed.weight"] @ f64[f"{head}.0.weight"].T + f64[f"{head}.0.bias"], 0)
    sd[f"{head}.1.bias"] -= f64[f"{head}.1.weight"] @ hidden.mean(0)
    backbone_sd, features = _backbone(seed, "resnet50")
    sd.update(backbone_sd)
    sd["input_proj.bias"] -= sd["input_proj.weight"][:, :, 0, 0].astype(np.float64) @ features.mean
    return {key: np.ascontiguousarray(sd[key], np.float32) for key in shapes}
