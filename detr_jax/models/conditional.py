"""Conditional DETR (Atten4Vis/ConditionalDETR) and DAB-DETR (IDEA-Research/DAB-DETR) decoders.

Both keep DETR's encoder (DAB scales its position embedding per layer) and change the decoder:

- **Conditional DETR**: each query has a reference point, ``sigmoid(ref_point_head(query_embed))``
  [B, Q, 2]. The cross-attention concatenates, per head, a content part (``ca_qcontent_proj``
  of the decoder state; the keys ``ca_kcontent_proj`` of the memory) and a spatial part: for
  queries the sine embedding of the reference point (``sine_embed_points``) times
  ``query_scale(state)`` (1 in layer 0), through ``ca_qpos_sine_proj``; for keys
  ``ca_kpos_proj`` of the position embedding. Layer 0 also adds ``ca_qpos_proj(query_embed)`` and
  the key position to the content parts. Boxes are predicted relative to the reference point.
- **DAB-DETR**: the queries are 4-d anchor boxes (``refpoint_embed``, pre-sigmoid). Each layer
  embeds its anchor (x, y, w, h), derives the positional query with ``ref_point_head``, modulates
  the x / y halves of the spatial query by the predicted width / height ratios
  (``ref_anchor_head``), and after the layer refines the anchor with the shared box head
  (``bbox_embed``, iterative update; the next layer sees it without gradient). Boxes of layer l
  are predicted relative to the anchor layer l started from.

The attentions have no in-projections (``MultiHeadAttention(project=False)``): the
``sa_*`` / ``ca_*`` Linear layers project, as the official ``attention.py`` expects. Every
parameter is named as the official state_dict key, so ``detr_jax.convert`` maps checkpoints by name.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.layers import MLP, dense, inverse_sigmoid, make_norm, xavier_uniform
from detr_jax.models.position import sine_embed_points
from detr_jax.models.transformer import EncoderDecoder, _Block


def concat_heads(x, y, num_heads: int):
    """[..., d], [..., d] -> [..., 2 d], each head's slice of x followed by that of y (the official
    ``torch.cat([q.view(..., heads, d / heads), ...], dim=3)``)."""
    split = lambda t: t.reshape(*t.shape[:-1], num_heads, t.shape[-1] // num_heads)
    both = jnp.concatenate([split(x), split(y)], axis=-1)
    return both.reshape(*x.shape[:-1], 2 * x.shape[-1])


class ConditionalDecoderLayer(_Block):
    """One decoder layer of Conditional DETR / DAB-DETR (post-norm as official; ``pre_norm`` also
    works, through ``_Block.residual``)."""

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, query_sine_embed, mask, is_first: bool, train: bool, self_mask):
        """tgt, query_pos, query_sine_embed [B, Q, d]; memory, pos [B, N, d]; mask [B, N]; self_mask: the
        self-attention's key mask [B, Q] or attention mask [B, Q, Q] (True = blocked) -> [B, Q, d]."""
        d = tgt.shape[-1]
        linear = lambda name: dense(d, d, self.dtype, name, xavier_uniform)
        attention = lambda name: self.attention(name, project=False)

        def self_attention(x):
            q = linear("sa_qcontent_proj")(x) + linear("sa_qpos_proj")(query_pos)
            k = linear("sa_kcontent_proj")(x) + linear("sa_kpos_proj")(query_pos)
            return attention("self_attn")(q, k, linear("sa_v_proj")(x), self_mask, train)

        def cross_attention(x):
            q, k = linear("ca_qcontent_proj")(x), linear("ca_kcontent_proj")(memory)
            k_pos = linear("ca_kpos_proj")(pos)
            if is_first:  # later layers have no ca_qpos_proj (official: set to None)
                q, k = q + linear("ca_qpos_proj")(query_pos), k + k_pos
            q = concat_heads(q, linear("ca_qpos_sine_proj")(query_sine_embed), self.num_heads)
            k = concat_heads(k, k_pos, self.num_heads)
            return attention("cross_attn")(q, k, linear("ca_v_proj")(memory), mask, train)

        tgt = self.residual(tgt, self_attention, "norm1", train)
        tgt = self.residual(tgt, cross_attention, "norm2", train)
        return self.residual(tgt, lambda x: self.ffn()(x, train), "norm3", train)


class ConditionalTransformer(EncoderDecoder):
    """Conditional DETR's encoder-decoder. queries: ``query_embed`` [Q, d]."""

    @nn.compact
    def __call__(self, src, pos, mask, spatial_shapes, queries, class_heads, box_heads, train: bool):
        """The decoder contract (``detr_jax.models.decoders``) -> (hs [L, B, Q, d] after the final
        decoder norm, reference points [L, B, Q, 2] (x, y) in (0, 1), the same for every layer,
        memory [B, N, d], None)."""
        del spatial_shapes, class_heads, box_heads  # one level, read as a sequence; references not refined
        d, b = src.shape[-1], src.shape[0]
        memory = self.encode(src, pos, mask, train)
        query_pos = jnp.broadcast_to(queries.astype(self.dtype), (b, *queries.shape))
        reference = jax.nn.sigmoid(MLP(d, 2, 2, self.dtype, name="decoder_ref_point_head")(query_pos)
                                   .astype(jnp.float32))
        query_scale = MLP(d, d, 2, self.dtype, name="decoder_query_scale")
        decoder_layer = self.layer(ConditionalDecoderLayer, (7, 8))
        decoder_norm = make_norm(self.norm, self.dtype, "decoder_norm")
        sine = sine_embed_points(reference, d // 2).astype(self.dtype)
        tgt, hs = jnp.zeros_like(query_pos), []
        for i in range(self.num_decoder_layers):
            query_sine_embed = sine if i == 0 else sine * query_scale(tgt)
            tgt = decoder_layer(**self.block(), name=f"decoder_layers_{i}")(
                tgt, memory, pos, query_pos, query_sine_embed, mask, i == 0, train, jnp.zeros(tgt.shape[:2], bool))
            hs.append(decoder_norm(tgt))
        return jnp.stack(hs), jnp.broadcast_to(reference, (len(hs), *reference.shape)), memory, None


DAB_INVERSE_SIGMOID_EPS = 1e-3


class DABTransformer(EncoderDecoder):
    """DAB-DETR's encoder-decoder. queries: ``refpoint_embed`` [Q, 4], anchors before the sigmoid."""

    @nn.compact
    def __call__(self, src, pos, mask, spatial_shapes, queries, class_heads, box_heads, train: bool, content=None):
        """The decoder contract (``detr_jax.models.decoders``); box_heads: the model's box MLP, one
        module shared by every layer (official ``transformer.decoder.bbox_embed``); content: None
        (content queries start at 0, DAB-DETR) or DN-DETR's ({"content" [B, P + Q, d], "anchors"
        [B, P, 4] before the sigmoid, "mask" [B, P + Q, P + Q] or None}, ``DETR.content_queries``):
        P denoising queries first, then the Q matching queries.
        -> (hs [L, B, P + Q, d] after the final decoder norm, anchors [L, B, P + Q, 4] (x, y, w, h)
        in (0, 1) that each layer started from, memory [B, N, d], None)."""
        del spatial_shapes, class_heads  # one level, read as a sequence
        d, b = src.shape[-1], src.shape[0]
        memory = self.encode(src, pos, mask, train, pos_scale=MLP(d, d, 2, self.dtype, name="encoder_query_scale"))
        anchor = jnp.broadcast_to(queries.astype(jnp.float32), (b, *queries.shape))
        tgt = jnp.zeros((b, queries.shape[0], d), self.dtype)
        if content is not None:
            anchor = jnp.concatenate([content["anchors"].astype(jnp.float32), anchor], axis=1)
            tgt = content["content"].astype(self.dtype)
        self_mask = jnp.zeros(tgt.shape[:2], bool) if content is None or content["mask"] is None else content["mask"]
        anchor = jax.nn.sigmoid(anchor)
        ref_point_head = MLP(d, d, 2, self.dtype, name="decoder_ref_point_head")
        query_scale = MLP(d, d, 2, self.dtype, name="decoder_query_scale")
        ref_anchor_head = MLP(d, 2, 2, self.dtype, name="decoder_ref_anchor_head")
        decoder_layer = self.layer(ConditionalDecoderLayer, (7, 8))
        decoder_norm = make_norm(self.norm, self.dtype, "decoder_norm")
        hs, anchors = [], [anchor]
        for i in range(self.num_decoder_layers):
            sine = sine_embed_points(anchor, d // 2)  # [B, Q, 2 d]: y, x, w, h
            query_pos = ref_point_head(sine.astype(self.dtype))
            spatial = sine[..., :d] * (1.0 if i == 0 else query_scale(tgt).astype(jnp.float32))
            ratio = jax.nn.sigmoid(ref_anchor_head(tgt).astype(jnp.float32))  # predicted (w, h) / anchor (w, h)
            spatial = jnp.concatenate([spatial[..., :d // 2] * (ratio[..., 1] / anchor[..., 3])[..., None],
                                       spatial[..., d // 2:] * (ratio[..., 0] / anchor[..., 2])[..., None]], axis=-1)
            tgt = decoder_layer(**self.block(), name=f"decoder_layers_{i}")(
                tgt, memory, pos, query_pos, spatial.astype(self.dtype), mask, i == 0, train, self_mask)
            refined = jax.nn.sigmoid(box_heads[i](tgt.astype(jnp.float32))
                                     + inverse_sigmoid(anchor, DAB_INVERSE_SIGMOID_EPS))
            if i < self.num_decoder_layers - 1:
                anchors.append(refined)  # the heads of layer i + 1 predict relative to it, with gradient
            anchor = jax.lax.stop_gradient(refined)  # official: the next layer's input is detached
            hs.append(decoder_norm(tgt))
        return jnp.stack(hs), jnp.stack(anchors), memory, None
