"""Synthetic DETR panoptic-segmentation weights (the official ``DETRsegm``) in the official PyTorch
state_dict layout, numpy only, deterministic from a seed.

``make_state_dict(seed)`` gives a float32 array for every key of facebookresearch/detr's
``build_model`` with main.py defaults plus ``--masks --dataset_file coco_panoptic`` (num_classes
250), in the official order, so the official model loads it with ``strict=True``
(tests/data/make_panoptic_ref.py checks the layout against the official code):

- ``detr.<key>``: the detector, ``official_layout.make_state_dict(seed, num_classes=250)`` (see
  tests/official_layout.py for its recipe);
- ``bbox_attention.{q,k}_linear``: the MHAttentionMap projections, 256 -> 256, Xavier-uniform weights
  (the official init);
- ``mask_head.lay1..lay5, out_lay, adapter1..3``: MaskHeadSmallConv's convs, kaiming_uniform(a=1)
  weights (the official init: U(+-sqrt(3 / fan_in)));
- ``mask_head.gn1..gn5``: GroupNorm(8, c) affine parameters, weight U(0.8, 1.2), bias U(-0.1, 0.1).

The official init zeroes every bias and sets GroupNorm to (1, 0); here the biases are U(-0.1, 0.1)
and GroupNorm is perturbed, so that a port that drops or swaps any parameter fails the parity
test. Every entry has its own stream, ``official_layout.stream(seed, key)``.
"""
import math

import numpy as np

import official_layout

NUM_CLASSES, D, HEADS = 250, official_layout.D, 8
FPN_DIMS = (1024, 512, 256)  # layer3, layer2, layer1 channels of ResNet-50


def _mask_head_convs() -> list[tuple[str, int, int, int]]:
    """(name, c_out, c_in, kernel) of MaskHeadSmallConv's convs, in registration order (lay1, lay2, ...,
    out_lay, adapter1..3); GroupNorm gn<i> follows lay<i> in the state_dict."""
    dim = D + HEADS
    widths = [dim, dim, D // 2, D // 4, D // 8, D // 16]  # lay<i> maps widths[i - 1] to widths[i]
    convs = [(f"lay{i}", widths[i], widths[i - 1], 3) for i in range(1, 6)]
    convs.append(("out_lay", 1, widths[5], 3))
    convs += [(f"adapter{i + 1}", widths[i + 2], c_in, 1) for i, c_in in enumerate(FPN_DIMS)]
    return convs


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """{official key: shape} in the official state_dict order (detr.*, bbox_attention.*, mask_head.*)."""
    shapes = {f"detr.{k}": s for k, s in official_layout.state_dict_shapes(num_classes=NUM_CLASSES).items()}
    for name in ("q_linear", "k_linear"):
        shapes.update({f"bbox_attention.{name}.weight": (D, D), f"bbox_attention.{name}.bias": (D,)})
    for name, c_out, c_in, k in _mask_head_convs():
        shapes.update({f"mask_head.{name}.weight": (c_out, c_in, k, k), f"mask_head.{name}.bias": (c_out,)})
        if name.startswith("lay"):
            gn = f"mask_head.gn{name[3:]}"
            shapes.update({f"{gn}.weight": (c_out,), f"{gn}.bias": (c_out,)})
    return shapes


NUM_KEYS = len(state_dict_shapes())


def _draw(seed: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """One segmentation-head entry (see the module docstring)."""
    r = official_layout.stream(seed, key)
    if key.startswith("mask_head.gn"):
        return r.uniform(0.8, 1.2, shape) if key.endswith("weight") else r.uniform(-0.1, 0.1, shape)
    if len(shape) == 1:
        return r.uniform(-0.1, 0.1, shape)
    if len(shape) == 2:  # Xavier-uniform
        bound = math.sqrt(6 / (shape[0] + shape[1]))
    else:  # kaiming_uniform(a=1): gain 1, bound sqrt(3 / fan_in)
        bound = math.sqrt(3 / np.prod(shape[1:]))
    return r.uniform(-bound, bound, shape)


def make_state_dict(seed: int) -> dict[str, np.ndarray]:
    """float32 {official key: array} of the official DETRsegm (see the module docstring)."""
    detr = official_layout.make_state_dict(seed, num_classes=NUM_CLASSES)
    sd = {f"detr.{k}": v for k, v in detr.items()}
    sd.update({k: np.ascontiguousarray(_draw(seed, k, s), np.float32)
               for k, s in state_dict_shapes().items() if not k.startswith("detr.")})
    return sd
