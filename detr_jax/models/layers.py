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


def inverse_sigmoid(x, eps: float):
    """The official ``inverse_sigmoid``: log(x / (1 - x)) with x clipped to [0, 1] and both x and
    1 - x to at least eps (Conditional DETR 1e-5, DAB-DETR 1e-3)."""
    x = jnp.clip(x, 0, 1)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


class PReLU(nn.Module):
    """torch ``nn.PReLU()``: max(0, x) + weight * min(0, x), one learned slope (initialised 0.25)."""

    @nn.compact
    def __call__(self, x):
        slope = self.param("weight", nn.initializers.constant(0.25), (1,))
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


ACTIVATIONS = {
    "relu": nn.relu,  # and "prelu" (a module, see ``activation``)
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch's F.gelu is the exact one
    "swish": nn.swish,
    "mish": mish,
}


def activation(kind: str):
    """The function of config.model.activation ``kind``; "prelu" creates its parameter (named
    "activation", as DAB-DETR's ``layer.activation.weight``), so call it inside a compact method."""
    return PReLU(name="activation") if kind == "prelu" else ACTIVATIONS[kind]


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


class MLP(nn.Module):
    """The official ``MLP``: ``num_layers`` linear layers (``layers_i``), relu between them:
    [..., d_in] -> [..., out_dim]. Kernels Xavier-uniform inside the transformer (its
    ``_reset_parameters``), torch's default elsewhere; biases torch's default; ``zero_last`` zeroes
    the last layer (the box head of models that predict boxes relative to a reference), its bias
    then ``last_bias`` (Deformable DETR's box head: (0, 0, -2, -2)) where given."""
    hidden_dim: int
    out_dim: int
    num_layers: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = xavier_uniform
    zero_last: bool = False
    last_bias: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            out = self.out_dim if last else self.hidden_dim
            if last and self.zero_last:
                bias = (nn.initializers.zeros if self.last_bias is None
                        else lambda *_: jnp.asarray(self.last_bias, jnp.float32))
                layer = nn.Dense(out, dtype=self.dtype, kernel_init=nn.initializers.zeros, bias_init=bias,
                                 name=f"layers_{i}")
            else:
                layer = dense(out, x.shape[-1], self.dtype, f"layers_{i}", self.kernel_init)
            x = layer(x)
            x = x if last else nn.relu(x)
        return x


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
            h = activation(self.activation)(h)
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


def _blocked(mask):
    """A key padding mask [B, Lk] or an attention mask [B, Lq, Lk] (True = blocked) -> [B, 1, 1 or Lq, Lk]."""
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


class MultiHeadAttention(nn.Module):
    """torch ``nn.MultiheadAttention`` semantics with separate q/k/v projections.

    query [B, Lq, d], key [B, Lk, d], value [B, Lk, d], key_padding_mask [B, Lk] (True = ignore),
    or [B, Lq, Lk] to block keys per query (DN-DETR's attention mask) -> [B, Lq, d]. Softmax in float32; dropout on the attention weights when training.
    With ``mutable=["attention"]`` the softmax weights [B, heads, Lq, Lk] (before dropout, 0 on
    padded keys) are sown as ``weights``; without it (and in ``init``) nothing is sown.

    ``project=False`` is the attention of Conditional DETR and DAB-DETR (their ``attention.py``):
    query and key [B, L, d_qk] and value [B, Lk, d_v] come projected (any d_qk, e.g. 2 d for the
    concatenated content and spatial parts), the logits are scaled by (d_qk / heads) ** -0.5, and
    only ``out_proj`` (d_v -> d_v) is learned.

    ``attention``: "xla" computes the softmax explicitly (the reference path, with attention
    dropout); "fused" calls ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, see
    ``fused_implementation``) wherever the explicit path is not needed: it is kept when attention
    dropout is active (training with dropout > 0), when intermediates or attention weights are
    collected, and when query/key and value heads differ in width.
    """
    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    project: bool = True

    @nn.compact
    def __call__(self, query, key, value, key_padding_mask, train: bool):
        d_qk, d_v = query.shape[-1], value.shape[-1]
        if d_qk % self.num_heads or d_v % self.num_heads:
            raise ValueError(f"config.model.hidden_dim ({d_v}) must be divisible by num_heads ({self.num_heads})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"config.model.attention = {self.attention!r}; expected one of {', '.join(ATTENTIONS)}")
        zeros = nn.initializers.zeros  # torch MultiheadAttention zero-initialises its biases
        heads = lambda y: y.reshape(*y.shape[:-1], self.num_heads, y.shape[-1] // self.num_heads)

        def project(x, name):
            if not self.project:
                return heads(x.astype(self.dtype))
            return heads(nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=packed_in_proj_init, bias_init=zeros,
                                  name=name)(x))

        q, k, v = project(query, "q_proj"), project(key, "k_proj"), project(value, "v_proj")
        attention_dropout = train and self.dropout > 0
        collecting = self.is_mutable_collection("intermediates") or self.is_mutable_collection("attention")
        if self.attention == "fused" and not attention_dropout and not collecting and d_qk == d_v:
            out = self.fused(q, k, v, key_padding_mask, train)
        else:
            out = self.explicit(q, k, v, key_padding_mask, train)
        out = out.reshape(*query.shape[:-1], d_v)
        return nn.Dense(d_v, dtype=self.dtype, kernel_init=xavier_uniform, bias_init=zeros, name="out_proj")(out)

    def explicit(self, q, k, v, key_padding_mask, train):
        """The reference path: q, k, v [B, L, heads, head_dim] -> [B, Lq, heads, head_dim]."""
        logits = jnp.einsum("bqhc,bkhc->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
        logits = jnp.where(_blocked(key_padding_mask), jnp.finfo(jnp.float32).min, logits)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if not self.is_initializing():  # init returns variables only (it makes every collection mutable)
            self.sow("attention", "weights", weights)  # [B, heads, Lq, Lk]; only with mutable=["attention"]
        weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
        return jnp.einsum("bhqk,bkhc->bqhc", weights, v)

    def fused(self, q, k, v, key_padding_mask, train):
        """``jax.nn.dot_product_attention``: same shapes as ``explicit``, no attention dropout."""
        (b, q_len, _, head_dim), kv_len = q.shape, k.shape[1]
        mask = jnp.broadcast_to(~_blocked(key_padding_mask), (b, 1, q_len, kv_len))  # True = attend
        implementation = fused_implementation(jax.default_backend(), self.dtype, head_dim, kv_len, q_len, train)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
