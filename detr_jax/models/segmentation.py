"""DETR's panoptic mask head, as official (facebookresearch/detr ``models/segmentation.py``).

``config.model.masks``: the DETR model also returns ``pred_masks`` [B, Q, H4, W4] float32, mask
logits of every query at the backbone's stride 4 (C2):

- ``MHAttentionMap`` (``bbox_attention``): each query's last-decoder-layer output attends over the
  encoder memory with each head; the softmax weights [B, Q, heads, h, w] (one softmax over heads and
  cells together, as official; not multiplied by values);
- ``MaskHeadSmallConv`` (``mask_head``): the projected C5 features, repeated per query, with the
  query's attention maps as extra channels, through 3x3 convs + GroupNorm(8) + ReLU, upsampled
  (nearest) FPN-style with 1x1 adapters of C4, C3, C2 added, to one logit per pixel.

Padding, as the rest of the model (``detr_jax.models.resnet``): "official" convolves the whole
canvas (GroupNorm statistics over it, nearest upsampling between whole feature maps: torch's
``floor(dst * in / out)`` rule); "exact" computes what the image alone gives: every map is zero
beyond its valid size, GroupNorm takes its statistics over the valid region, and each image is
upsampled from its own valid size to the next one's. Mask logits beyond the valid C2 size carry no
meaning (``valid_mask_hw`` gives the size to read).

``resize`` is torch's ``F.interpolate`` (nearest, or bilinear with ``align_corners=False``, no
antialiasing) with each image's own input and output sizes; the mask loss and post-processing use it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.layers import xavier_uniform
from detr_jax.models.resnet import valid_region, zero_beyond

# official: nn.init.kaiming_uniform_(weight, a=1), bias 0: U(+-sqrt(3 / fan_in))
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
GROUPS = 8


def _source_index(out_len: int, in_hw, out_hw, method: str):
    """Per image, the source positions of output positions 0..out_len-1 along one axis.

    in_hw, out_hw [B] int: the input and output lengths of each image. -> nearest: (index [B, out_len]
    int32,); bilinear: (index0, index1 [B, out_len] int32, weight1 [B, out_len] float32), as torch
    computes them in float32 (scale = in / out; bilinear source = max(scale * (dst + 0.5) - 0.5, 0)).
    """
    dst = jnp.arange(out_len, dtype=jnp.float32)[None]
    size_in = in_hw.astype(jnp.float32)[:, None]
    scale = size_in / out_hw.astype(jnp.float32)[:, None]
    last = in_hw[:, None].astype(jnp.int32) - 1
    if method == "nearest":
        return (jnp.minimum(jnp.floor(dst * scale).astype(jnp.int32), last),)
    src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    i1 = jnp.minimum(i0 + 1, last)
    return i0, i1, src - i0.astype(jnp.float32)


def resize(x, in_hw, out_hw, out_shape: tuple[int, int], method: str):
    """torch's ``F.interpolate`` of each image over its own sizes.

    x [B, ..., H, W, C]; in_hw [B, 2] int: each image's input (h, w), read from the top left of x;
    out_hw [B, 2]: its output size; out_shape (H', W') >= every out_hw -> [B, ..., H', W', C]
    (beyond an image's out_hw: its edge values repeated; meaningless). method: "nearest" or "bilinear".
    """
    batch_take = jax.vmap(lambda xi, idx, axis: jnp.take(xi, idx, axis=axis), in_axes=(0, 0, None))
    lead = x.ndim - 4  # axes between the batch and H
    for axis, (length, size_in, size_out) in enumerate(zip(out_shape, in_hw.T, out_hw.T)):
        take_axis = lead + axis  # H or W within one image
        found = _source_index(length, size_in, size_out, method)
        if method == "nearest":
            x = batch_take(x, found[0], take_axis)
            continue
        i0, i1, w1 = found
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[1 + take_axis] = length
        w1 = w1.reshape(shape).astype(x.dtype)
        x = batch_take(x, i0, take_axis) * (1 - w1) + batch_take(x, i1, take_axis) * w1
    return x


def full_hw(batch: int, hw: tuple[int, int]):
    """[B, 2] int32: the size (h, w) for every image."""
    return jnp.broadcast_to(jnp.asarray(hw, jnp.int32), (batch, 2))


class MHAttentionMap(nn.Module):
    """query [B, Q, d], memory [B, h, w, d], mask [B, h, w] (True = padding) -> attention weights
    [B, Q, heads, h, w]: the scaled ((hidden_dim / heads) ** -0.5) dot products of each head, one
    softmax per query over every head's unpadded cells together (official: each query's weights
    sum to 1 over heads x cells, not per head)."""
    hidden_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, query, memory, mask):
        project = lambda name: nn.Dense(self.hidden_dim, dtype=jnp.float32, kernel_init=xavier_uniform,
                                        bias_init=nn.initializers.zeros, name=name)
        head_dim = self.hidden_dim // self.num_heads
        q = project("q_linear")(query.astype(jnp.float32))
        k = project("k_linear")(memory.astype(jnp.float32))
        qh = q.reshape(*q.shape[:2], self.num_heads, head_dim) * float(head_dim) ** -0.5
        kh = k.reshape(*k.shape[:3], self.num_heads, head_dim)
        weights = jnp.einsum("bqnc,bhwnc->bqnhw", qh, kh)
        weights = jnp.where(mask[:, None, None], -jnp.inf, weights)
        # one softmax over heads and positions together, as official (``weights.flatten(2)``)
        return jax.nn.softmax(weights.reshape(*weights.shape[:2], -1), axis=-1).reshape(weights.shape)


class MaskHeadSmallConv(nn.Module):
    """The FPN-style mask head.

    src [B, h, w, d] (the projected C5), bbox_mask [B, Q, heads, h, w], fpns [C4, C3, C2] (NHWC, the
    backbone's stages), valid [C5, C4, C3, C2 valid sizes [B, 2]] or None ("official" padding)
    -> mask logits [B, Q, H4, W4] (H4, W4: C2's grid).
    Channels: d + heads, d/2, d/4, d/8, d/16 (official ``inter_dims``), then 1.
    """
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, src, bbox_mask, fpns, valid=None):
        b, nq = bbox_mask.shape[:2]
        ctx = self.hidden_dim
        dims = [ctx + bbox_mask.shape[2], ctx // 2, ctx // 4, ctx // 8, ctx // 16]
        conv = lambda features, kernel, name: nn.Conv(
            features, (kernel, kernel), padding=[(kernel // 2, kernel // 2)] * 2, dtype=self.dtype,
            kernel_init=kaiming_uniform_a1, bias_init=nn.initializers.zeros, name=name)
        per_query = lambda x: x.reshape(b * nq, *x.shape[2:])  # [B, Q, ...] <-> [B * Q, ...]
        per_image = lambda x: x.reshape(b, nq, *x.shape[1:])
        level_hw = [None] * 4 if valid is None else valid
        repeat = lambda hw: None if hw is None else jnp.repeat(hw, nq, axis=0)

        def block(x, index, hw):
            """conv 3x3 -> GroupNorm(8) (over the valid region) -> ReLU, x [B * Q, h, w, c]."""
            x = conv(dims[index], 3, f"lay{index + 1}")(zero_beyond(x, hw))
            norm = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-5, dtype=self.dtype, name=f"gn{index + 1}")
            x = norm(x) if hw is None else norm(x, mask=jnp.broadcast_to(valid_region(hw, x.shape[1:3])[..., None],
                                                                       x.shape))
            return zero_beyond(nn.relu(x), hw)

        maps = jnp.moveaxis(bbox_mask, 2, -1).astype(self.dtype)  # [B, Q, h, w, heads]
        x = jnp.concatenate([jnp.broadcast_to(src[:, None].astype(self.dtype), (b, nq, *src.shape[1:])), maps], -1)
        hw5 = repeat(level_hw[0])
        x = block(block(per_query(x), 0, hw5), 1, hw5)
        for level, fpn in enumerate(fpns, start=1):
            hw_in, hw_out = level_hw[level - 1], level_hw[level]
            adapter = conv(dims[level], 1, f"adapter{level}")(fpn.astype(self.dtype))
            in_hw = full_hw(b * nq, x.shape[1:3]) if hw_in is None else repeat(hw_in)
            out_hw = full_hw(b * nq, adapter.shape[1:3]) if hw_out is None else repeat(hw_out)
            up = resize(x, in_hw, out_hw, adapter.shape[1:3], "nearest")
            x = block(per_query(adapter[:, None] + per_image(up)), level + 1, repeat(hw_out))
        out = conv(1, 3, "out_lay")(x)
        return per_image(out[..., 0]).astype(jnp.float32)
