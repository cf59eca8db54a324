"""DETR's transformer: encoder over image features, decoder over learned object queries.

As official (facebookresearch/detr ``models/transformer.py``): position embeddings are added to
queries and keys of every attention (not to values), padded keys are masked, post-norm by default
(pre-norm adds a final encoder norm), and the decoder returns every layer's output after the shared
final decoder norm. The encoder is shared by the other decoders (``detr_jax.models.decoders``).
``remat`` recomputes each layer's activations on the backward pass instead of
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

    def attention(self, name, project: bool = True):
        return MultiHeadAttention(self.num_heads, self.dropout, self.dtype, self.attention_impl, project, name=name)

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


class EncoderDecoder(_Block):
    """What every transformer variant shares (``detr_jax.models.decoders``): its fields, the encoder
    (DETR's, with an optional learned scaling of the position embedding), and remat."""
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    remat: bool = False

    def block(self) -> dict:
        return dict(num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout,
                    activation=self.activation, norm=self.norm, ffn_type=self.ffn_type,
                    pre_norm=self.pre_norm, dtype=self.dtype, attention_impl=self.attention_impl)

    def layer(self, cls, static_argnums: tuple[int, ...]):
        """``cls``, under ``nn.remat`` with the Python (bool) arguments static when ``remat`` is on
        (argument 0 is the module itself)."""
        return nn.remat(cls, static_argnums=static_argnums) if self.remat else cls

    def encode(self, src, pos, mask, train: bool, pos_scale=None):
        """src, pos [B, N, d], mask [B, N] -> memory [B, N, d]. ``pos_scale``: a module of the
        current tokens [B, N, d] -> [B, N, d] that scales the position embedding before each layer
        (DAB-DETR's encoder ``query_scale``); None: the position embedding as it is (DETR)."""
        encoder_layer = self.layer(EncoderLayer, (4,))
        memory = src
        for i in range(self.num_encoder_layers):
            layer_pos = pos if pos_scale is None else pos * pos_scale(memory)
            memory = encoder_layer(**self.block(), name=f"encoder_layers_{i}")(memory, layer_pos, mask, train)
        if self.pre_norm:
            memory = make_norm(self.norm, self.dtype, "encoder_norm")(memory)
        return memory


class DETRTransformer(EncoderDecoder):
    """Official DETR's encoder-decoder: learned query embeddings [Q, d] added to queries and keys of
    both decoder attentions; boxes predicted absolute (no reference points)."""

    @nn.compact
    def __call__(self, src, pos, mask, spatial_shapes, queries, class_heads, box_heads, train: bool):
        """The decoder contract (``detr_jax.models.decoders``); queries [Q, d] (``query_embed``).
        -> (hs [L, B, Q, d] after the final decoder norm, None, memory [B, N, d], None)."""
        del spatial_shapes, class_heads, box_heads  # one level, read as a sequence; boxes not refined
        memory = self.encode(src, pos, mask, train)
        query_pos = jnp.broadcast_to(queries.astype(self.dtype), (src.shape[0], *queries.shape))
        decoder_layer = self.layer(DecoderLayer, (6,))
        decoder_norm = make_norm(self.norm, self.dtype, "decoder_norm")
        tgt, hs = jnp.zeros_like(query_pos), []
        for i in range(self.num_decoder_layers):
            tgt = decoder_layer(**self.block(), name=f"decoder_layers_{i}")(tgt, memory, pos, query_pos, mask, train)
            hs.append(decoder_norm(tgt))
        return jnp.stack(hs), None, memory, None
