"""Deformable DETR (fundamentalvision/Deformable-DETR): multi-scale deformable attention, its
encoder and decoder, iterative box refinement and two-stage proposals.

**Multi-scale deformable attention** (``MSDeformAttn``). Each query, at a reference point (or box)
of every feature level, predicts per head, level and point an offset and an attention weight (a
softmax over levels x points). It reads the value map of each level by bilinear interpolation at the
reference plus the offset, and sums the samples with those weights. The sampling is the official
``ms_deform_attn_core_pytorch``: ``F.grid_sample`` with ``align_corners=False`` and zero padding, so
a location x in [0, 1] of a level of width w reads pixel coordinate ``x * w - 0.5`` and the corners
outside the map read 0. ``msda_impl`` picks how the samples are read (``MSDA_IMPLS``), with the
same values:

- "gather": the 4 bilinear corners of every point of every level as one gather of value rows (of
  head_dim values, from value read as [B * N * heads, head_dim]), then a weighted sum; memory
  O(Q * heads * levels * points * 4 * head_dim).
- "dense": per level, the sampling weights scattered into a [Q, h * w] matrix per (image, head)
  and one matrix product with the value map; memory O(Q * h * w * heads), for small maps (the
  decoder's 300 queries) where matrix units beat gathers.

**Encoder**: 6 post-norm layers of deformable self-attention over the flattened levels (each token's
reference is its own cell centre, in every level) and an FFN. The learned ``level_embed`` is added
to each level's sine position embedding.

**Decoder**: self-attention between the queries (torch ``nn.MultiheadAttention``), deformable
cross-attention to the memory at each query's reference, an FFN. Its queries are
``query_embed`` [Q, 2 d] split into position and content, the reference points
``sigmoid(reference_points(position))``. With box refinement each layer's box head (the model's
layer-``l`` head) refines the reference, detached for the next layer. Two-stage: the encoder
output becomes a proposal per token (``enc_output`` + ``enc_output_norm``, scored and refined by the
extra heads L); the top-Q proposals by their class-0 score are the decoder's reference boxes, and
their sine embedding through ``pos_trans`` + ``pos_trans_norm`` the queries.

Every parameter is named as the official state_dict key (``detr_jax.convert``).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.config import MSDA_IMPLS
from detr_jax.models.layers import dense, inverse_sigmoid, make_norm, xavier_uniform
from detr_jax.models.transformer import EncoderDecoder, _Block

INVERSE_SIGMOID_EPS = 1e-5  # official util.misc.inverse_sigmoid


def level_starts(spatial_shapes) -> list[int]:
    """((h, w), ...) -> the offset of each level in the flattened sequence."""
    return [int(s) for s in np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1]]


def bilinear_corners(locations, hw: tuple[int, int]):
    """locations [..., 2] (x, y), 0..1 spanning an h x w map -> (index [..., 4] int32, row-major
    cell of each bilinear corner; weight [..., 4] float32, 0 for corners outside the map), as
    ``grid_sample(align_corners=False, padding_mode='zeros')``."""
    h, w = hw
    locations = locations.astype(jnp.promote_types(locations.dtype, jnp.float32))
    x = locations[..., 0] * w - 0.5
    y = locations[..., 1] * h - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], -1)
    ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], -1)
    weights = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    index = jnp.clip(ys, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xs, 0, w - 1).astype(jnp.int32)
    return index, jnp.where(inside, weights, 0.0)


def _corners(spatial_shapes, locations, weights):
    """Per level: (index [B, Q, H, P, 4] into the level's map, weight [B, Q, H, P, 4] = attention
    weight x bilinear weight)."""
    out = []
    for level, hw in enumerate(spatial_shapes):
        index, bilinear = bilinear_corners(locations[:, :, :, level], hw)
        out.append((index, bilinear * weights[:, :, :, level, :, None]))
    return out


def msda_gather(value, spatial_shapes, locations, weights):
    """value [B, N, H, c] (levels flattened and concatenated); locations [B, Q, H, L, P, 2] (x, y)
    in [0, 1]; weights [B, Q, H, L, P] -> [B, Q, H * c]. One gather of the c-wide rows of value,
    read as [B * N * H, c], at every corner of every point of every level, then their weighted sum."""
    b, n, heads, c = value.shape
    q = locations.shape[1]
    corners = _corners(spatial_shapes, locations, weights)
    cell = jnp.concatenate([i + start for (i, _), start in zip(corners, level_starts(spatial_shapes))], axis=-1)
    weight = jnp.concatenate([w for _, w in corners], axis=-1)  # [B, Q, H, P, 4 L]
    row = ((jnp.arange(b)[:, None, None, None, None] * n + cell) * heads
           + jnp.arange(heads)[None, None, :, None, None])
    rows = jnp.take(value.reshape(b * n * heads, c), row.reshape(-1), axis=0).reshape(b, q, heads, -1, c)
    out = jnp.einsum("bqhk,bqhkc->bqhc", weight.reshape(b, q, heads, -1).astype(rows.dtype), rows,
                     preferred_element_type=jnp.promote_types(rows.dtype, jnp.float32))
    return out.reshape(b, q, heads * c).astype(value.dtype)


def msda_dense(value, spatial_shapes, locations, weights):
    """``msda_gather``'s result through one sampling matrix [B, H, Q, h * w] per level (the
    weights scattered onto the map's cells) and a matrix product with the level's values."""
    b, _, heads, c = value.shape
    q = locations.shape[1]
    accumulate = jnp.promote_types(value.dtype, jnp.float32)
    out = jnp.zeros((b, q, heads, c), accumulate)
    batch = jnp.arange(b)[:, None, None, None, None]
    head = jnp.arange(heads)[None, None, :, None, None]
    query = jnp.arange(q)[None, :, None, None, None]
    for (index, weight), start, (h, w) in zip(_corners(spatial_shapes, locations, weights),
                                              level_starts(spatial_shapes), spatial_shapes):
        matrix = jnp.zeros((b, heads, q, h * w), weight.dtype).at[batch, head, query, index].add(weight)
        level_value = value[:, start:start + h * w]  # [B, hw, H, c]
        out = out + jnp.einsum("bhqn,bnhc->bqhc", matrix.astype(value.dtype), level_value,
                               preferred_element_type=accumulate)
    return out.reshape(b, q, heads * c).astype(value.dtype)


MSDA = {"gather": msda_gather, "dense": msda_dense}


def grid_bias_init(num_heads: int, num_levels: int, num_points: int):
    """The official ``sampling_offsets`` bias: head h's points along the angle 2 pi h / heads,
    scaled so the larger coordinate is 1, times the point index + 1; flat (H, L, P, 2)."""
    def init(key, shape, dtype=jnp.float32):
        del key
        theta = np.arange(num_heads, dtype=np.float32) * np.float32(2.0 * math.pi / num_heads)
        grid = np.stack([np.cos(theta), np.sin(theta)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
        grid = grid * (np.arange(num_points, dtype=np.float32) + 1)[None, None, :, None]
        return jnp.asarray(grid.reshape(shape), dtype)
    return init


class MSDeformAttn(nn.Module):
    """query [B, Q, d], reference [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h) in [0, 1] of
    each level's canvas, value [B, N, d] (levels flattened), padding_mask [B, N] (True = padding)
    -> [B, Q, d]. With ``mutable=["intermediates"]`` sows the sampling locations [B, Q, H, L, P, 2]
    and attention weights [B, Q, H, L, P] (``sampling_weights``)."""
    num_heads: int
    num_levels: int
    num_points: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "gather"  # MSDA_IMPLS

    @nn.compact
    def __call__(self, query, reference, value, spatial_shapes, padding_mask):
        if self.impl not in MSDA:
            raise ValueError(f"config.model.msda_impl = {self.impl!r}; expected one of {', '.join(MSDA_IMPLS)}")
        (b, q, d), n = query.shape, value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        zeros = nn.initializers.zeros
        value = nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, bias_init=zeros, name="value_proj")(value)
        value = jnp.where(padding_mask[..., None], jnp.zeros((), value.dtype), value).reshape(b, n, heads, d // heads)
        # offsets and weights in float32: sampling locations need more precision than bfloat16
        offsets = nn.Dense(heads * levels * points * 2, kernel_init=zeros, name="sampling_offsets",
                           bias_init=grid_bias_init(heads, levels, points))(query.astype(jnp.float32))
        offsets = offsets.reshape(b, q, heads, levels, points, 2)
        logits = nn.Dense(heads * levels * points, kernel_init=zeros, bias_init=zeros,
                          name="attention_weights")(query.astype(jnp.float32))
        weights = jax.nn.softmax(logits.reshape(b, q, heads, levels * points), -1).reshape(b, q, heads, levels, points)
        reference = reference.astype(jnp.float32)[:, :, None, :, None, :]  # [B, Q, 1, L, 1, R]
        if reference.shape[-1] == 2:
            normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)[None, None, None, :, None, :]
            locations = reference + offsets / normalizer
        else:
            locations = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
        self.sow("intermediates", "sampling_locations", locations)
        self.sow("intermediates", "sampling_weights", weights)
        out = MSDA[self.impl](value, spatial_shapes, locations, weights)
        return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, bias_init=zeros, name="output_proj")(out)


def valid_ratios(mask, spatial_shapes):
    """mask [B, N] (levels flattened, True = padding) -> [B, L, 2] float32, (w, h) fraction of each
    level that is unpadded, counted along the first row and column as official ``get_valid_ratio``."""
    ratios = []
    for start, (h, w) in zip(level_starts(spatial_shapes), spatial_shapes):
        level = ~mask[:, start:start + h * w].reshape(-1, h, w)
        ratios.append(jnp.stack([level[:, 0, :].sum(1) / w, level[:, :, 0].sum(1) / h], -1))
    return jnp.stack(ratios, 1).astype(jnp.float32)


def encoder_reference_points(spatial_shapes, ratios):
    """The encoder's references: every token's cell centre, as a fraction of its level's valid
    size, then scaled to each level's canvas: [B, N, L, 2] (x, y) (official ``get_reference_points``)."""
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        y, x = jnp.meshgrid(jnp.linspace(0.5, h - 0.5, h, dtype=jnp.float32),
                            jnp.linspace(0.5, w - 0.5, w, dtype=jnp.float32), indexing="ij")
        y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(jnp.stack([x, y], -1))
    return jnp.concatenate(points, 1)[:, :, None] * ratios[:, None]


def proposal_pos_embed(proposals, num_feats: int = 128, temperature: float = 10000.0):
    """Official ``get_proposal_pos_embed``: proposals [B, Q, 4] before the sigmoid -> [B, Q, 4 *
    num_feats], sigmoid(coordinate) * 2 pi embedded (sin, cos interleaved) in the order x, y, w, h."""
    dim_t = np.float32(temperature) ** (2 * (np.arange(num_feats, dtype=np.float32) // 2) / np.float32(num_feats))
    pos = jax.nn.sigmoid(proposals.astype(jnp.float32))[..., None] * np.float32(2 * math.pi) / dim_t
    pos = jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1)  # [B, Q, 4, F/2, 2]
    return pos.reshape(*proposals.shape[:-1], 4 * num_feats)


def encoder_proposals(memory, mask, spatial_shapes):
    """Official ``gen_encoder_output_proposals`` without its projection: memory [B, N, d], mask
    [B, N] -> (memory zeroed at padded and invalid tokens [B, N, d], proposals [B, N, 4] before the
    sigmoid, +inf at padded and invalid tokens). A token's proposal is its cell centre over the
    level's valid size and a side 0.05 * 2^level; invalid: any coordinate outside (0.01, 0.99)."""
    proposals = []
    for level, (start, (h, w)) in enumerate(zip(level_starts(spatial_shapes), spatial_shapes)):
        valid = ~mask[:, start:start + h * w].reshape(-1, h, w)
        valid_h, valid_w = valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)
        y, x = jnp.meshgrid(jnp.linspace(0, h - 1, h, dtype=jnp.float32),
                            jnp.linspace(0, w - 1, w, dtype=jnp.float32), indexing="ij")
        scale = jnp.stack([valid_w, valid_h], -1).astype(jnp.float32)[:, None, None, :]
        grid = (jnp.stack([x, y], -1)[None] + 0.5) / scale  # [B, h, w, 2]
        wh = jnp.full_like(grid, 0.05 * 2.0 ** level)
        proposals.append(jnp.concatenate([grid, wh], -1).reshape(grid.shape[0], h * w, 4))
    proposals = jnp.concatenate(proposals, 1)
    usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~mask
    proposals = jnp.where(usable[..., None], jnp.log(proposals / (1 - proposals)), jnp.inf)
    return jnp.where(usable[..., None], memory, jnp.zeros((), memory.dtype)), proposals


class DeformableEncoderLayer(_Block):
    num_levels: int = 4
    num_points: int = 4
    msda_impl: str = "gather"

    @nn.compact
    def __call__(self, src, pos, reference, mask, spatial_shapes, train: bool):
        """src, pos [B, N, d]; reference [B, N, L, 2]; mask [B, N] -> [B, N, d]."""
        attn = MSDeformAttn(self.num_heads, self.num_levels, self.num_points, self.dtype, self.msda_impl,
                            name="self_attn")
        src = self.residual(src, lambda x: attn(x + pos, reference, x, spatial_shapes, mask), "norm1", train)
        return self.residual(src, lambda x: self.ffn()(x, train), "norm2", train)


class DeformableDecoderLayer(_Block):
    num_levels: int = 4
    num_points: int = 4
    msda_impl: str = "gather"

    @nn.compact
    def __call__(self, tgt, query_pos, reference, memory, mask, spatial_shapes, train: bool):
        """tgt, query_pos [B, Q, d]; reference [B, Q, L, 2 or 4]; memory [B, N, d]; mask [B, N]."""
        self_attn = self.attention("self_attn")
        cross_attn = MSDeformAttn(self.num_heads, self.num_levels, self.num_points, self.dtype, self.msda_impl,
                                  name="cross_attn")
        no_mask = jnp.zeros(tgt.shape[:2], bool)
        tgt = self.residual(tgt, lambda x: self_attn(x + query_pos, x + query_pos, x, no_mask, train), "norm2", train)
        tgt = self.residual(tgt, lambda x: cross_attn(x + query_pos, reference, memory, spatial_shapes, mask),
                            "norm1", train)
        return self.residual(tgt, lambda x: self.ffn()(x, train), "norm3", train)


class DeformableTransformer(EncoderDecoder):
    """Deformable DETR's encoder-decoder (the decoder contract, ``detr_jax.models.decoders``).

    ``with_box_refine``: layer l's box head refines the reference boxes. ``two_stage``: encoder
    proposals give the queries (``queries`` is None; the heads have one more entry, the proposals').
    ``padding`` "exact": the proposals on padding are never among the top Q (official: they
    compete with the score of a zero memory)."""
    num_feature_levels: int = 4
    num_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    num_queries: int = 300  # two_stage: the number of proposals kept
    msda_impl: str = "gather"
    padding: str = "exact"

    @nn.compact
    def __call__(self, src, pos, mask, spatial_shapes, queries, class_heads, box_heads, train: bool):
        """-> (hs [L, B, Q, d], references: L arrays [B, Q, 2 or 4] that layer l's boxes are relative
        to, memory [B, N, d], encoder outputs {"pred_logits" [B, N, C], "pred_boxes" [B, N, 4]} or None)."""
        d, b = src.shape[-1], src.shape[0]
        levels = self.num_feature_levels
        if len(spatial_shapes) != levels:
            raise ValueError(f"deformable transformer: {len(spatial_shapes)} feature levels, expected {levels}")
        level_embed = self.param("level_embed", nn.initializers.normal(1.0), (levels, d))
        level_of_token = np.repeat(np.arange(levels), [h * w for h, w in spatial_shapes])
        pos = pos + level_embed[level_of_token].astype(pos.dtype)[None]
        ratios = valid_ratios(mask, spatial_shapes)
        layer_args = dict(**self.block(), num_levels=levels, num_points=self.num_points,
                          msda_impl=self.msda_impl)

        encoder_layer = self.layer(DeformableEncoderLayer, (5, 6))  # spatial_shapes, train
        memory, reference = src, encoder_reference_points(spatial_shapes, ratios)
        for i in range(self.num_encoder_layers):
            memory = encoder_layer(**layer_args, name=f"encoder_layers_{i}")(
                memory, pos, reference, mask, spatial_shapes, train)

        encoder_outputs = None
        if self.two_stage:
            query_pos, tgt, reference, encoder_outputs = self.proposals(memory, mask, spatial_shapes, class_heads[-1],
                                                                        box_heads[-1])
        else:
            query_pos, tgt = jnp.split(jnp.broadcast_to(queries.astype(self.dtype), (b, *queries.shape)), 2, axis=-1)
            reference = jax.nn.sigmoid(nn.Dense(2, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                                                name="reference_points")(query_pos.astype(jnp.float32)))

        decoder_layer = self.layer(DeformableDecoderLayer, (6, 7))  # spatial_shapes, train
        hs, references = [], []
        for i in range(self.num_decoder_layers):
            scale = jnp.tile(ratios, (1, 1, reference.shape[-1] // 2))  # [B, L, R]
            tgt = decoder_layer(**layer_args, name=f"decoder_layers_{i}")(
                tgt, query_pos, reference[:, :, None] * scale[:, None], memory, mask, spatial_shapes, train)
            hs.append(tgt)
            references.append(reference)
            if self.with_box_refine:
                raw = box_heads[i](tgt.astype(jnp.float32))
                offset = inverse_sigmoid(reference, INVERSE_SIGMOID_EPS)
                raw = raw.at[..., :offset.shape[-1]].add(offset) if offset.shape[-1] == 2 else raw + offset
                reference = jax.lax.stop_gradient(jax.nn.sigmoid(raw))
        return jnp.stack(hs), references, memory, encoder_outputs

    def proposals(self, memory, mask, spatial_shapes, class_head, box_head):
        """Two-stage: memory [B, N, d] -> (query_pos, tgt [B, Q, d], reference boxes [B, Q, 4] (the
        top-Q proposals by their class-0 score, refined by the box head, without gradient), the
        encoder outputs {"pred_logits" [B, N, C], "pred_boxes" [B, N, 4]})."""
        d = memory.shape[-1]
        output_memory, proposals = encoder_proposals(memory, mask, spatial_shapes)
        output_memory = make_norm("layer_norm", jnp.float32, "enc_output_norm")(
            dense(d, d, jnp.float32, "enc_output", xavier_uniform)(output_memory.astype(jnp.float32)))
        logits = class_head(output_memory)
        coords = box_head(output_memory) + proposals  # [B, N, 4] before the sigmoid
        score = logits[..., 0]
        if score.shape[1] < self.num_queries:
            raise ValueError(f"two-stage Deformable DETR keeps num_queries = {self.num_queries} proposals, but these "
                             f"images give only {score.shape[1]} feature cells over the {len(spatial_shapes)} levels: use larger images "
                             "or fewer queries (config.model.num_queries)")
        if self.padding == "exact":  # an image's proposals do not depend on its canvas
            score = jnp.where(mask, -jnp.inf, score)
        top = jax.lax.top_k(score, self.num_queries)[1]  # [B, Q]
        self.sow("intermediates", "topk_proposals", top)
        chosen = jax.lax.stop_gradient(jnp.take_along_axis(coords, top[..., None], axis=1))
        embed = make_norm("layer_norm", jnp.float32, "pos_trans_norm")(
            dense(2 * d, 2 * d, jnp.float32, "pos_trans", xavier_uniform)(proposal_pos_embed(chosen, d // 2)))
        query_pos, tgt = jnp.split(embed.astype(self.dtype), 2, axis=-1)
        return query_pos, tgt, jax.nn.sigmoid(chosen), {"pred_logits": logits, "pred_boxes": jax.nn.sigmoid(coords)}
