"""Synthetic DETR weights in the official PyTorch state_dict layout, and the inputs of the official
dumps in tests/data: numpy only, deterministic from a seed.

``make_state_dict(seed, num_classes=91, backbone="resnet50")`` gives a float32 array for every key
of facebookresearch/detr's ``build_model`` with main.py defaults (FrozenBatchNorm ResNet-50/101, the
DC5 variants have the same keys, 6 + 6 post-norm layers, d_model 256, 8 heads, FFN 2048, 100
queries), in the official order, so the official model loads it with ``strict=True``
(tests/data/make_official_ref.py checks the layout against the official code). The values are not a
trained model; they are drawn at initialisation-like scales so that activations stay near unit scale
(layer4 features of N(0, 1) images: mean 0.5, sd 0.7, max 7 for both ResNets) and the 100 queries
differ in class and box:

- every array has its own stream, ``RandomState`` seeded with sha256("{seed}/{key}") (legacy
  RandomState streams do not change across numpy versions);
- backbone convs He-normal (fan_out); transformer matrices Xavier-uniform; other biases N(0, 0.02);
  LayerNorm weight 1 + N(0, 0.1), bias N(0, 0.05);
- FrozenBatchNorm (weight, bias, running_mean, running_var): the running statistics are a mean-field
  estimate of each channel's mean and variance when the images are N(0, 1) (``_Moments``), with
  noise; weight U(0.6, 1.4), or U(0.2, 0.5) at the last BN of each residual branch so that the
  residual stream grows slowly with depth;
- input_proj N(0, 1 / (3 fan_in)) (torch's default variance), its bias centring the projected
  features on their estimated mean, so that the encoder's tokens differ;
- queries N(0, QUERY_STD^2) and the decoder's cross-attention out_proj x CROSS_ATTENTION_GAIN, so
  that the queries look at different tokens; class_embed N(0, CLASS_STD^2 / 256), its no-object bias
  raised so that about half the queries predict an object; bbox_embed He-normal hidden layers, last
  layer N(0, BOX_STD^2 / 256) with bias BOX_BIAS (w, h near 0.2 after the sigmoid).

These constants were chosen on the official model: they keep its float32-vs-float64 gap near
3e-5 (logits) / 3e-6 (boxes) while the matching margins of the dump stay above 0.017. The sha256
of ``make_state_dict(2024)`` is the same with numpy 1.26.0 and 2.4.6.
"""
import hashlib
import math

import numpy as np

D, FFN, QUERIES, LAYERS = 256, 2048, 100, 6
DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
QUERY_STD, CLASS_STD, BOX_STD, CROSS_ATTENTION_GAIN = 6.0, 2.0, 1.0, 2.0
BOX_BIAS = (0.0, 0.0, -1.4, -1.4)
BACKBONE = "backbone.0.body"


def state_dict_shapes(num_classes: int = 91, backbone: str = "resnet50") -> dict[str, tuple[int, ...]]:
    """{official key: shape} in the official state_dict order (transformer, heads, backbone)."""
    shapes = {}
    linear = lambda name, n_out, n_in: shapes.update({f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)})
    norm = lambda name: shapes.update({f"{name}.weight": (D,), f"{name}.bias": (D,)})

    def attention(name):
        shapes.update({f"{name}.in_proj_weight": (3 * D, D), f"{name}.in_proj_bias": (3 * D,)})
        linear(f"{name}.out_proj", D, D)

    for part, attentions, norms in (("encoder", ["self_attn"], 2), ("decoder", ["self_attn", "multihead_attn"], 3)):
        for i in range(LAYERS):
            layer = f"transformer.{part}.layers.{i}"
            for a in attentions:
                attention(f"{layer}.{a}")
            linear(f"{layer}.linear1", FFN, D)
            linear(f"{layer}.linear2", D, FFN)
            for n in range(1, norms + 1):
                norm(f"{layer}.norm{n}")
    norm("transformer.decoder.norm")
    linear("class_embed", num_classes + 1, D)
    for i, n_out in enumerate((D, D, 4)):
        linear(f"bbox_embed.layers.{i}", n_out, D)
    shapes["query_embed.weight"] = (QUERIES, D)
    shapes.update({"input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,)})
    for conv, bn, c_in, c_out, k in resnet_convs(backbone):
        shapes[conv] = (c_out, c_in, k, k)
        shapes.update({f"{bn}.{s}": (c_out,) for s in ("weight", "bias", "running_mean", "running_var")})
    return shapes


def resnet_convs(backbone: str):
    """(conv key, its FrozenBatchNorm prefix, c_in, c_out, kernel) of the ResNet in forward order;
    within a bottleneck: conv1, conv2, conv3, then the downsample of the first block."""
    yield f"{BACKBONE}.conv1.weight", f"{BACKBONE}.bn1", 3, 64, 7
    c_in = 64
    for stage, depth in enumerate(DEPTHS[backbone], start=1):
        width = 64 << (stage - 1)
        for block in range(depth):
            p = f"{BACKBONE}.layer{stage}.{block}"
            for i, (a, b, k) in enumerate(((c_in, width, 1), (width, width, 3), (width, 4 * width, 1)), start=1):
                yield f"{p}.conv{i}.weight", f"{p}.bn{i}", a, b, k
            if block == 0:
                yield f"{p}.downsample.0.weight", f"{p}.downsample.1", c_in, 4 * width, 1
            c_in = 4 * width


def stream(seed: int, key: str) -> np.random.RandomState:
    """The random stream of one state_dict entry."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return np.random.RandomState(np.frombuffer(digest, "<u4"))


def make_state_dict(seed: int, num_classes: int = 91, backbone: str = "resnet50") -> dict[str, np.ndarray]:
    """float32 {official key: array} (see the module docstring for the recipe)."""
    shapes = state_dict_shapes(num_classes, backbone)
    sd = {}
    for key, shape in shapes.items():
        if key.startswith(BACKBONE):
            continue  # below, in forward order
        r = stream(seed, key)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
        if key == "query_embed.weight":
            sd[key] = QUERY_STD * r.standard_normal(shape)
        elif ".norm" in key:
            sd[key] = 1 + 0.1 * r.standard_normal(shape) if key.endswith("weight") else 0.05 * r.standard_normal(shape)
        elif key.startswith("transformer.") and len(shape) == 2:
            bound = math.sqrt(6 / (shape[0] + shape[1]))
            sd[key] = r.uniform(-bound, bound, shape)
        elif len(shape) == 1:
            sd[key] = 0.02 * r.standard_normal(shape)
        else:
            std = {"class_embed.weight": CLASS_STD, "bbox_embed.layers.2.weight": BOX_STD,
                   "input_proj.weight": 3 ** -0.5}.get(key, math.sqrt(2))  # else He-normal
            sd[key] = r.standard_normal(shape) * std / math.sqrt(fan_in)
    # about half the queries: max of 91 N(0, CLASS_STD^2) logits is near 2.4 sd
    sd["class_embed.bias"][-1] += 2.4 * CLASS_STD
    sd["bbox_embed.layers.2.bias"] += BOX_BIAS
    for i in range(LAYERS):
        sd[f"transformer.decoder.layers.{i}.multihead_attn.out_proj.weight"] *= CROSS_ATTENTION_GAIN
    backbone_sd, features = _backbone(seed, backbone)
    sd.update(backbone_sd)
    # centre the projected layer4 features on their estimated mean, so that tokens differ
    sd["input_proj.bias"] -= sd["input_proj.weight"][:, :, 0, 0].astype(np.float64) @ features.mean
    return {key: np.ascontiguousarray(sd[key], np.float32) for key in shapes}


class _Moments:
    """Per-channel (mean, variance) of activations, Gaussian mean-field (channels and positions taken
    as independent); what the FrozenBatchNorm running statistics are drawn around."""

    _erf = np.frompyfunc(math.erf, 1, 1)

    def __init__(self, mean, var):
        self.mean, self.var = np.asarray(mean, np.float64), np.maximum(np.asarray(var, np.float64), 1e-12)

    def conv(self, w: np.ndarray) -> "_Moments":
        """w [c_out, c_in, k, k]: mean sum(w) @ mean, variance sum(w^2) @ variance (zero padding ignored)."""
        w = w.astype(np.float64)
        return _Moments(w.sum((2, 3)) @ self.mean, (w * w).sum((2, 3)) @ self.var)

    def relu(self) -> "_Moments":
        s = np.sqrt(self.var)
        a = self.mean / s
        phi = np.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + self._erf(a / math.sqrt(2)).astype(np.float64))
        mean = self.mean * cdf + s * phi
        second = (self.mean ** 2 + self.var) * cdf + self.mean * s * phi
        return _Moments(mean, second - mean * mean)

    def max_pool(self) -> "_Moments":
        """The stem's 3x3 / 2 max pool: mean + 1.8 sd, variance kept (its neighbours are strongly
        correlated; both factors measured on the official stem with these weights)."""
        return _Moments(self.mean + 1.8 * np.sqrt(self.var), self.var)

    def __add__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.mean + other.mean, self.var + other.var)


def _frozen_bn(seed: int, prefix: str, x: _Moments, last_of_branch: bool) -> tuple[dict, _Moments]:
    """Buffers of a FrozenBatchNorm whose input has moments ``x``, and the moments of its output."""
    draw = lambda s: stream(seed, f"{prefix}.{s}")
    n = len(x.mean)
    weight = draw("weight").uniform(*((0.2, 0.5) if last_of_branch else (0.6, 1.4)), n)
    bias = 0.1 * draw("bias").standard_normal(n)
    mean = x.mean + 0.2 * np.sqrt(x.var) * draw("running_mean").standard_normal(n)
    var = x.var * np.exp(draw("running_var").uniform(-0.3, 0.3, n))
    scale = weight / np.sqrt(var + 1e-5)
    buffers = {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
    return buffers, _Moments((x.mean - mean) * scale + bias, x.var * scale * scale)


def _backbone(seed: int, backbone: str) -> tuple[dict[str, np.ndarray], _Moments]:
    """Conv weights (He normal, fan_out) and FrozenBatchNorm buffers, walked in forward order, and
    the estimated moments of the layer4 output."""
    sd = {}

    def conv_bn(conv, bn, c_in, c_out, k, x, last_of_branch=False):
        sd[conv] = stream(seed, conv).standard_normal((c_out, c_in, k, k)) * math.sqrt(2 / (c_out * k * k))
        buffers, y = _frozen_bn(seed, bn, x.conv(sd[conv]), last_of_branch)
        sd.update({f"{bn}.{s}": v for s, v in buffers.items()})
        return y

    convs = resnet_convs(backbone)
    x = conv_bn(*next(convs), _Moments(np.zeros(3), np.ones(3))).relu().max_pool()
    block_in = branch = pre = None  # block input, residual branch, pre-ReLU residual stream
    for conv, bn, c_in, c_out, k in convs:
        role = conv.split(".")[-2]  # conv1, conv2, conv3 or the downsample's "0"
        if role == "conv1":
            block_in, branch = x, x
        if role in ("conv1", "conv2"):
            branch = conv_bn(conv, bn, c_in, c_out, k, branch).relu()
        elif role == "conv3":
            branch = conv_bn(conv, bn, c_in, c_out, k, branch, last_of_branch=True)
            if c_out == len(block_in.mean):  # identity shortcut, the block ends here:
                pre = pre + branch  # relu(relu(pre) + branch) taken as relu(pre + branch)
                x = pre.relu()
        else:  # the downsample shortcut ends the first block of a stage
            pre = conv_bn(conv, bn, c_in, c_out, k, block_in) + branch
            x = pre.relu()
    return sd, x


def weights_sha256(state_dict: dict[str, np.ndarray]) -> str:
    """sha256 over each key and its float32 little-endian bytes, in dict order."""
    h = hashlib.sha256()
    for key, value in state_dict.items():
        h.update(key.encode())
        h.update(np.ascontiguousarray(value, "<f4").tobytes())
    return h.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's float32 little-endian bytes."""
    return hashlib.sha256(np.ascontiguousarray(array, "<f4").tobytes()).hexdigest()


def layout_sha256(shapes: dict[str, tuple]) -> str:
    """sha256 of the "key shape" lines of a layout, in order."""
    return hashlib.sha256("".join(f"{k} {tuple(s)}\n" for k, s in shapes.items()).encode()).hexdigest()


def noise_batch(seed: int, sizes) -> tuple[np.ndarray, np.ndarray]:
    """N(0, 1) noise standing in for normalised images of valid (h, w) ``sizes``, zero-padded at the
    bottom / right as ``nested_tensor_from_tensor_list`` does -> (images [B, 3, H, W] float32,
    masks [B, H, W] bool, True on padding)."""
    sizes = np.asarray(sizes)
    H, W = sizes.max(0)
    noise = np.random.RandomState(seed).standard_normal((len(sizes), 3, H, W)).astype(np.float32)
    masks = np.ones((len(sizes), H, W), bool)
    for i, (h, w) in enumerate(sizes):
        masks[i, :h, :w] = False
    return np.where(masks[:, None], np.float32(0), noise), masks


def load_npz(path) -> dict[str, np.ndarray]:
    """An npz's arrays as a plain dict (0-d arrays for scalars); no pickles."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
