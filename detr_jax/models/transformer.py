"""DETR's transformer: encoder over image features, decoder over learned object queries.

As official (facebookresearch/detr ``models/transformer.py``): position embeddings are added to
queries and keys of every attention (not to values), padded keys are masked, post-norm by default
(pre-norm adds a final encoder norm), and the decoder returns every layer's output after the shared
final decoder norm. ``remat`` recomputes each layer's activations on the backward pass instead of
keeping them (``nn.remat``; same values, less memory, more compute).
"""
import flax.linen as nn
import jax.numpy as jnp

from detr_jax.models.layers import FeedForward, MultiHeadAttention, make_norm


class _Block(nn.Module):
    """Fields shared by encoder and decoder layers."""
    num_heads: int
    ffn_dim: int
    dropout: float
    activation: str
    norm: str
    ffn_type: str
    pre_norm: bool
    dtype: jnp.dtype
    attention_impl: str  # detr_jax.config.ATTENTIONS

    def attention(self, name):
        return MultiHeadAttention(self.num_heads, self.dropout, self.dtype, self.attention_impl, name=name)

    def ffn(self):
        return FeedForward(self.ffn_dim, self.ffn_type, self.activation, self.dropout, self.dtype, name="ffn")

    def residual(self, x, sublayer, norm_name, train):
        """x + dropout(sublayer(norm(x))) for pre-norm, norm(x + dropout(sublayer(x))) for post-norm."""
        norm = make_norm(self.norm, self.dtype, norm_name)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        if self.pre_norm:
            return x + drop(sublayer(norm(x)))
        return norm(x + drop(sublayer(x)))


class EncoderLayer(_Block):
    @nn.compact
    def __call__(self, src, pos, mask, train: bool):  # src, pos: [B, N, d]; mask: [B, N]
        attn = self.attention("self_attn")
        src = self.residual(src, lambda x: attn(x + pos, x + pos, x, mask, train), "norm1", train)
        return self.residual(src, lambda x: self.ffn()(x, train), "norm2", train)


class DecoderLayer(_Block):
    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, mask, train: bool):
        """tgt, query_pos: [B, Q, d]; memory, pos: [B, N, d]; mask: [B, N] -> [B, Q, d]."""
        self_attn, cross_attn = self.attention("self_attn"), self.attention("multihead_attn")
        no_mask = jnp.zeros(tgt.shape[:2], bool)
        tgt = self.residual(tgt, lambda x: self_attn(x + query_pos, x + query_pos, x, no_mask, train), "norm1", train)
        tgt = self.residual(tgt, lambda x: cross_attn(x + query_pos, memory + pos, memory, mask, train), "norm2", train)
        return self.residual(tgt, lambda x: self.ffn()(x, train), "norm3", train)


class Transformer(_Block):
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    remat: bool = False

    @nn.compact
    def __call__(self, src, pos, mask, query_embed, train: bool):
        """src, pos: [B, N, d]; mask: [B, N] (True = padding); query_embed: [Q, d].

        Returns (hs [L, B, Q, d] decoder outputs after the final norm, memory [B, N, d]).
        """
        block = dict(num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout,
                     activation=self.activation, norm=self.norm, ffn_type=self.ffn_type,
                     pre_norm=self.pre_norm, dtype=self.dtype, attention_impl=self.attention_impl)
        # `train` (the last argument; self is argument 0) is a Python bool: static under remat
        encoder_layer = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
        decoder_layer = nn.remat(DecoderLayer, static_argnums=(6,)) if self.remat else DecoderLayer
        memory = src
        for i in range(self.num_encoder_layers):
            memory = encoder_layer(**block, name=f"encoder_layers_{i}")(memory, pos, mask, train)
        if self.pre_norm:
            memory = make_norm(self.norm, self.dtype, "encoder_norm")(memory)

        query_pos = jnp.broadcast_to(query_embed.astype(self.dtype), (src.shape[0], *query_embed.shape))
        decoder_norm = make_norm(self.norm, self.dtype, "decoder_norm")
        tgt, hs = jnp.zeros_like(query_pos), []
        for i in range(self.num_decoder_layers):
            tgt = decoder_layer(**block, name=f"decoder_layers_{i}")(tgt, memory, pos, query_pos, mask, train)
            hs.append(decoder_norm(tgt))
        return jnp.stack(hs), memory
