"""ResNet backbones in the torchvision layout, with FrozenBatchNorm, as DETR uses them.

Stride sits on the 3x3 conv of a bottleneck (torchvision "ResNet v1.5"); padding is explicit as in
torch (Flax 'SAME' pads stride-2 convs asymmetrically). DC5 (``dilation=True``) replaces the stride
of the last stage by dilation 2. The network returns the last stage's feature map, stride 32 (16 with
DC5). FrozenBatchNorm statistics and affine terms live in the ``buffers`` collection and are never
updated; which convs are trained is decided by ``detr_jax.models.detr.trainable_mask``. ``remat``
recomputes each residual block's activations on the backward pass (``nn.remat``).

Padding (``config.model.padding``). An image of valid size (h, w) sits at the top left of a larger
canvas. "official" (``ResNet()(images)``) convolves the whole canvas, as official DETR does with its
padded batches: features near the image's bottom and right borders see the padding, so they depend on
the canvas. "exact" (``ResNet()(images, valid_hw)``) computes what the network computes on the image
alone, unpadded, whatever the canvas, by one rule:

  every feature map the backbone passes on is zero beyond its valid size, so every conv and
  pooling layer reads, beyond the image, the zeros that torch's own padding would give it;
  a stride-2 conv or pool (kernel k, padding k // 2) maps a valid size n to ceil(n / 2);
  stride 1, dilated or not, keeps n; GroupNorm takes its statistics over the valid region only.

So a feature map of stride s (C2..C5, and the DC5 C5 at stride 16) has valid size
``output_valid_hw`` of the input's, and the padding mask at any level is "beyond that size" (not
the nearest-neighbour resize of the pixel mask, which official DETR uses and "official" keeps).
Max pooling follows a ReLU, so its zeros act like torch's -inf padding.
"""
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.conv import Conv

# torchvision's conv init: Kaiming normal, fan_out, relu gain.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Spec(NamedTuple):
    block: str  # "basic" (2 convs) or "bottleneck" (3 convs, x4 expansion)
    depths: tuple[int, ...]
    width: int  # channels of the stem and of stage 1


BACKBONES = {
    "resnet18": Spec("basic", (2, 2, 2, 2), 64),
    "resnet34": Spec("basic", (3, 4, 6, 3), 64),
    "resnet50": Spec("bottleneck", (3, 4, 6, 3), 64),
    "resnet101": Spec("bottleneck", (3, 4, 23, 3), 64),
    # A small ResNet for CPU work and tests: one basic block per stage, 16..128 channels.
    "resnet_tiny": Spec("basic", (1, 1, 1, 1), 16),
}


def halve(valid_hw):
    """Valid size [B, 2] (h, w) after a stride-2 conv or pool with torch's padding: ceil(n / 2)
    (None, "official" padding: None)."""
    return None if valid_hw is None else (valid_hw + 1) // 2


def valid_region(valid_hw, hw: tuple[int, int]):
    """valid_hw [B, 2] int (h, w) -> [B, H, W] bool, True at rows < h and columns < w of an H x W map."""
    rows = jnp.arange(hw[0])[None, :] < valid_hw[:, :1]
    cols = jnp.arange(hw[1])[None, :] < valid_hw[:, 1:]
    return rows[:, :, None] & cols[:, None, :]


def zero_beyond(x, valid_hw):
    """x [B, H, W, C] with everything beyond the valid size [B, 2] set to 0 (valid_hw None: x as is)."""
    if valid_hw is None:
        return x
    return jnp.where(valid_region(valid_hw, x.shape[1:3])[..., None], x, jnp.zeros((), x.dtype))


class FrozenBatchNorm(nn.Module):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, with fixed buffers.
    ``mask`` is accepted for the interface of GroupNorm and unused (the op is per position)."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, mask=None):
        c = x.shape[-1]
        ones, zeros = (lambda: jnp.ones((c,), jnp.float32)), (lambda: jnp.zeros((c,), jnp.float32))
        weight = self.variable("buffers", "weight", ones).value
        bias = self.variable("buffers", "bias", zeros).value
        mean = self.variable("buffers", "running_mean", zeros).value
        var = self.variable("buffers", "running_var", ones).value
        scale = weight * jax.lax.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


NORMS = ("frozen_bn", "group_norm")


def backbone_norm(kind: str, channels: int, name: str) -> nn.Module:
    """FrozenBatchNorm (official; fixed buffers) or GroupNorm (trainable and batch-independent, for
    a backbone trained from scratch, which has no pretrained statistics to freeze)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm(name=name)
    if kind == "group_norm":
        return nn.GroupNorm(num_groups=min(32, max(1, channels // 8)), epsilon=1e-5, name=name)
    raise ValueError(f"config.model.backbone_norm = {kind!r}; expected one of {', '.join(NORMS)}")


def conv_layer(features, kernel, stride=1, dilation=1, dtype=jnp.float32, name=None, impl="xla"):
    """Bias-free conv with torch's symmetric padding (dilation * (kernel // 2)); ``impl``: see
    ``detr_jax.models.conv.conv2d``."""
    return Conv(features, kernel, stride, dilation * (kernel // 2), dilation, impl=impl, dtype=dtype,
                kernel_init=kaiming_fan_out, name=name)


def normalize(norm: nn.Module, x, valid_hw):
    """norm(x), GroupNorm's statistics taken over the valid region when valid_hw [B, 2] is given."""
    if valid_hw is None:
        return norm(x)
    return norm(x, mask=jnp.broadcast_to(valid_region(valid_hw, x.shape[1:3])[..., None], x.shape))


class Block(nn.Module):
    """A basic or bottleneck residual block; ``stride`` and ``dilation`` apply to the 3x3 conv.

    (x [B, H, W, C], valid_hw [B, 2] or None) -> (out, valid size of out); with valid_hw given,
    out is zero beyond it (the module docstring's "exact" rule)."""
    kind: str
    width: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    norm: str = "frozen_bn"
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, valid_hw=None):
        out_hw = halve(valid_hw) if self.stride == 2 else valid_hw
        norm = lambda channels, name, y, hw: normalize(backbone_norm(self.norm, channels, name), y, hw)
        conv = functools.partial(conv_layer, impl=self.conv_impl)
        if self.kind == "bottleneck":
            out_ch = 4 * self.width
            y = conv(self.width, 1, dtype=self.dtype, name="conv1")(x)
            y = zero_beyond(nn.relu(norm(self.width, "bn1", y, valid_hw)), valid_hw)
            y = conv(self.width, 3, self.stride, self.dilation, self.dtype, "conv2")(y)
            y = zero_beyond(nn.relu(norm(self.width, "bn2", y, out_hw)), out_hw)
            y = norm(out_ch, "bn3", conv(out_ch, 1, dtype=self.dtype, name="conv3")(y), out_hw)
        else:
            out_ch = self.width
            y = conv(self.width, 3, self.stride, self.dilation, self.dtype, "conv1")(x)
            y = zero_beyond(nn.relu(norm(self.width, "bn1", y, out_hw)), out_hw)
            y = norm(self.width, "bn2", conv(self.width, 3, 1, self.dilation, self.dtype, "conv2")(y), out_hw)
        if self.downsample:
            x = norm(out_ch, "downsample_bn", conv(out_ch, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x),
                     out_hw)
        return zero_beyond(nn.relu(x + y), out_hw), out_hw


class ResNet(nn.Module):
    """(images [B, H, W, 3], valid_hw [B, 2] int (h, w) of each image, or None) -> last-stage
    features [B, ceil(H/32), ceil(W/32), C] (H/16 with DC5). With valid_hw, "exact" padding (module
    docstring): the features are zero beyond ``output_valid_hw(valid_hw)``; None: "official", the
    whole canvas is convolved. ``num_outputs`` > 1: the list of the last ``num_outputs`` stages'
    features, shallowest first (Deformable DETR's C3, C4, C5 at strides 8, 16, 32)."""
    spec: Spec
    dilation: bool = False
    norm: str = "frozen_bn"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "xla"  # detr_jax.models.conv.conv2d's impl ("xla" or "gemm")
    num_outputs: int = 1

    def stage_valid_hw(self, valid_hw, stage: int):
        """Valid size [B, 2] of stage ``stage``'s (1-based) features for images of valid size
        valid_hw [B, 2]: ceil(n / 2) for the stem conv, the max pool and each strided stage."""
        strided = stage - 1 - int(self.dilation and stage == len(self.spec.depths))
        for _ in range(2 + strided):
            valid_hw = halve(valid_hw)
        return valid_hw

    def output_valid_hw(self, valid_hw):
        """Valid size [B, 2] of the last stage's features (``stage_valid_hw``)."""
        return self.stage_valid_hw(valid_hw, len(self.spec.depths))

    @nn.compact
    def __call__(self, x, valid_hw=None):
        kind, depths, width = self.spec
        block = nn.remat(Block) if self.remat else Block
        if self.dilation and kind == "basic":
            raise ValueError("config.model.dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), "
                             "as in torchvision")
        x = conv_layer(width, 7, 2, dtype=self.dtype, name="conv1", impl=self.conv_impl)(
            zero_beyond(x.astype(self.dtype), valid_hw))
        valid_hw = halve(valid_hw)
        x = zero_beyond(nn.relu(normalize(backbone_norm(self.norm, width, "bn1"), x, valid_hw)), valid_hw)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        valid_hw = halve(valid_hw)
        x = zero_beyond(x, valid_hw)
        in_ch, cur_dilation, outputs = width, 1, []
        for stage, depth in enumerate(depths, start=1):
            stage_width = width * 2 ** (stage - 1)
            out_ch = stage_width * (4 if kind == "bottleneck" else 1)
            stride = 1 if stage == 1 else 2
            first_dilation = cur_dilation
            if self.dilation and stage == len(depths):
                cur_dilation, stride = cur_dilation * stride, 1
            for i in range(depth):
                x, valid_hw = block(kind, stage_width,
                                    stride=stride if i == 0 else 1,
                                    dilation=first_dilation if i == 0 else cur_dilation,
                                    downsample=i == 0 and (stride != 1 or in_ch != out_ch),
                                    norm=self.norm, dtype=self.dtype, conv_impl=self.conv_impl,
                                    name=f"layer{stage}_{i}")(x, valid_hw)
                in_ch = out_ch
            outputs.append(x)
        return x if self.num_outputs == 1 else outputs[-self.num_outputs:]
