"""Building blocks shared by the transformer: initialisers, activations, norms, FFN, attention.

Initialisers follow the official PyTorch model so that training from scratch starts where it does:
torch's default ``nn.Linear`` init, and Xavier-uniform for the attention projections with the fan
of the packed ``in_proj_weight`` [3 * d, d] (a per-projection [d, d] fan would be too wide).
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.config import ATTENTIONS

# torch nn.Linear / nn.Conv2d default weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()
# Xavier-uniform of the packed [3d, d] in_proj matrix, applied to one [d, d] slice of it.
packed_in_proj_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """torch's default bias init, U(+-1/sqrt(fan_in))."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch's F.gelu is the exact one
    "swish": nn.swish,
    "mish": mish,
}
GATE_ACTIVATIONS = {"swiglu": nn.swish, "geglu": ACTIVATIONS["gelu"], "glu": nn.sigmoid}


def make_norm(kind: str, dtype, name: str) -> nn.Module:
    """LayerNorm as torch (eps 1e-5, two-pass variance) or RMSNorm; statistics in float32."""
    if kind == "layer_norm":
        return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)
    if kind == "rms_norm":
        return nn.RMSNorm(epsilon=1e-5, dtype=dtype, name=name)
    raise ValueError(f"config.model.norm: unknown norm {kind!r}, expected layer_norm or rms_norm")


def dense(features: int, fan_in: int, dtype, name: str, kernel_init=torch_default_kernel_init):
    """A Dense layer with torch's default bias init (and, unless given, its kernel init)."""
    return nn.Dense(features, dtype=dtype, kernel_init=kernel_init,
                    bias_init=torch_default_bias_init(fan_in), name=name)


class FeedForward(nn.Module):
    """Position-wise FFN: linear1 -> activation (or gate) -> dropout -> linear2.

    ``ffn_type='mlp'`` is the official one; the gated types compute
    ``linear1(x) * gate_act(gate(x))`` (GLU family, Shazeer 2020).
    """
    ffn_dim: int
    ffn_type: str = "mlp"
    activation: str = "relu"
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):  # x: [..., d] -> [..., d]
        d = x.shape[-1]
        h = dense(self.ffn_dim, d, self.dtype, "linear1", xavier_uniform)(x)
        if self.ffn_type == "mlp":
            h = ACTIVATIONS[self.activation](h)
        else:
            gate = dense(self.ffn_dim, d, self.dtype, "gate", xavier_uniform)(x)
            h = h * GATE_ACTIVATIONS[self.ffn_type](gate)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return dense(d, self.ffn_dim, self.dtype, "linear2", xavier_uniform)(h)


def fused_implementation(platform: str, dtype, head_dim: int, kv_len: int, q_len: int, train: bool) -> str:
    """``jax.nn.dot_product_attention``'s implementation for these shapes: "cudnn" (flash attention)
    on GPU where cuDNN supports them (bfloat16/float16, head_dim a multiple of 8 up to 128; even
    sequence lengths when training with a mask), "xla" everywhere else."""
    supported = (platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                 and head_dim % 8 == 0 and head_dim <= 128 and not (train and (q_len % 2 or kv_len % 2)))
    return "cudnn" if supported else "xla"


class MultiHeadAttention(nn.Module):
    """torch ``nn.MultiheadAttention`` semantics with separate q/k/v projections.

    query [B, Lq, d], key [B, Lk, d], value [B, Lk, d], key_padding_mask [B, Lk] (True = ignore)
    -> [B, Lq, d]. Softmax in float32; dropout on the attention weights when training.
    With ``mutable=["attention"]`` the softmax weights [B, heads, Lq, Lk] (before dropout, 0 on
    padded keys) are sown as ``weights``; without it (and in ``init``) nothing is sown.

    ``attention``: "xla" computes the softmax explicitly (the reference path, with attention
    dropout); "fused" calls ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, see
    ``fused_implementation``) wherever the explicit path is not needed: it is kept when attention
    dropout is active (training with dropout > 0) and when intermediates or attention weights are
    collected.
    """
    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, query, key, value, key_padding_mask, train: bool):
        d = query.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"config.model.hidden_dim ({d}) must be divisible by num_heads ({self.num_heads})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"config.model.attention = {self.attention!r}; expected one of {', '.join(ATTENTIONS)}")
        head_dim = d // self.num_heads
        zeros = nn.initializers.zeros  # torch MultiheadAttention zero-initialises its biases

        def project(x, name, kernel_init=packed_in_proj_init):
            y = nn.Dense(d, dtype=self.dtype, kernel_init=kernel_init, bias_init=zeros, name=name)(x)
            return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

        q, k, v = project(query, "q_proj"), project(key, "k_proj"), project(value, "v_proj")
        attention_dropout = train and self.dropout > 0
        collecting = self.is_mutable_collection("intermediates") or self.is_mutable_collection("attention")
        if self.attention == "fused" and not attention_dropout and not collecting:
            out = self.fused(q, k, v, key_padding_mask, train)
        else:
            out = self.explicit(q, k, v, key_padding_mask, train)
        out = out.reshape(*query.shape[:-1], d)
        return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, bias_init=zeros, name="out_proj")(out)

    def explicit(self, q, k, v, key_padding_mask, train):
        """The reference path: q, k, v [B, L, heads, head_dim] -> [B, Lq, heads, head_dim]."""
        logits = jnp.einsum("bqhc,bkhc->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
        logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if not self.is_initializing():  # init returns variables only (it makes every collection mutable)
            self.sow("attention", "weights", weights)  # [B, heads, Lq, Lk]; only with mutable=["attention"]
        weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
        return jnp.einsum("bhqk,bkhc->bqhc", weights, v)

    def fused(self, q, k, v, key_padding_mask, train):
        """``jax.nn.dot_product_attention``: same shapes as ``explicit``, no attention dropout."""
        (b, q_len, heads, head_dim), kv_len = q.shape, k.shape[1]
        mask = jnp.broadcast_to(~key_padding_mask[:, None, None, :], (b, 1, q_len, kv_len))  # True = attend
        implementation = fused_implementation(jax.default_backend(), self.dtype, head_dim, kv_len, q_len, train)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
