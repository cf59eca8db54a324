"""ResNet backbones in the torchvision layout, with FrozenBatchNorm, as DETR uses them.

Stride sits on the 3x3 conv of a bottleneck (torchvision "ResNet v1.5"); padding is explicit as in
torch (Flax 'SAME' pads stride-2 convs asymmetrically). DC5 (``dilation=True``) replaces the stride
of the last stage by dilation 2. The network returns the last stage's feature map, stride 32 (16 with
DC5). FrozenBatchNorm statistics and affine terms live in the ``buffers`` collection and are never
updated; which convs are trained is decided by ``detr_jax.models.detr.trainable_mask``. ``remat``
recomputes each residual block's activations on the backward pass (``nn.remat``).
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class FrozenBatchNorm(nn.Module):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, with fixed buffers."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
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


def conv(features, kernel, stride=1, dilation=1, dtype=jnp.float32, name=None):
    """Bias-free conv with torch's symmetric padding (dilation * (kernel // 2))."""
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype,
                   kernel_init=kaiming_fan_out, name=name)


class Block(nn.Module):
    """A basic or bottleneck residual block; ``stride`` and ``dilation`` apply to the 3x3 conv."""
    kind: str
    width: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    norm: str = "frozen_bn"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = lambda channels, name: backbone_norm(self.norm, channels, name)
        if self.kind == "bottleneck":
            out_ch = 4 * self.width
            y = nn.relu(norm(self.width, "bn1")(conv(self.width, 1, dtype=self.dtype, name="conv1")(x)))
            y = conv(self.width, 3, self.stride, self.dilation, self.dtype, "conv2")(y)
            y = nn.relu(norm(self.width, "bn2")(y))
            y = norm(out_ch, "bn3")(conv(out_ch, 1, dtype=self.dtype, name="conv3")(y))
        else:
            out_ch = self.width
            y = conv(self.width, 3, self.stride, self.dilation, self.dtype, "conv1")(x)
            y = nn.relu(norm(self.width, "bn1")(y))
            y = norm(self.width, "bn2")(conv(self.width, 3, 1, self.dilation, self.dtype, "conv2")(y))
        if self.downsample:
            x = norm(out_ch, "downsample_bn")(conv(out_ch, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """images [B, H, W, 3] -> last-stage features [B, ceil(H/32), ceil(W/32), C] (H/16 with DC5)."""
    spec: Spec
    dilation: bool = False
    norm: str = "frozen_bn"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        kind, depths, width = self.spec
        block = nn.remat(Block) if self.remat else Block
        if self.dilation and kind == "basic":
            raise ValueError("config.model.dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), "
                             "as in torchvision")
        x = conv(width, 7, 2, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        x = nn.relu(backbone_norm(self.norm, width, "bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        in_ch, cur_dilation = width, 1
        for stage, depth in enumerate(depths, start=1):
            stage_width = width * 2 ** (stage - 1)
            out_ch = stage_width * (4 if kind == "bottleneck" else 1)
            stride = 1 if stage == 1 else 2
            first_dilation = cur_dilation
            if self.dilation and stage == len(depths):
                cur_dilation, stride = cur_dilation * stride, 1
            for i in range(depth):
                x = block(kind, stage_width,
                          stride=stride if i == 0 else 1,
                          dilation=first_dilation if i == 0 else cur_dilation,
                          downsample=i == 0 and (stride != 1 or in_ch != out_ch),
                          norm=self.norm, dtype=self.dtype, name=f"layer{stage}_{i}")(x)
                in_ch = out_ch
        return x
