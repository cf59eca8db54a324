"""The DETR module: backbone -> input projection -> transformer -> class head and box MLP.

``DETR.__call__(images, padding_mask, train=False)`` with images [B, H, W, 3] float (ImageNet-
normalised) and padding_mask [B, H, W] bool (True = padding) returns

  {"pred_logits": [B, Q, C'] float32 (``classification`` "softmax": C' = num_classes + 1, the last
                  no-object; "sigmoid_focal": C' = num_classes),
   "pred_boxes":  [B, Q, 4] float32, (cx, cy, w, h) normalised by the unpadded image size,
   "aux_outputs": [{"pred_logits", "pred_boxes"} for decoder layers 0 .. L-2]}.

The encoder-decoder between backbone and heads is ``decoder``'s (``detr_jax.models.decoders``:
DETR, Conditional DETR, DAB-DETR).

With ``mutable=["intermediates"]`` it also sows backbone_features [B, h, w, C], feature_mask
[B, h, w], pos [B, h, w, d], proj_src [B, h, w, d], memory [B, h, w, d], hs [L, B, Q, d] and, for
decoders with references, references [L, B, Q, R].
With ``mutable=["attention"]`` every attention module sows its softmax weights [B, heads, Lq, Lk]
(``detr_jax.models.attention_maps`` reads the last layers' maps out of them).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.classification import classification as classification_of
from detr_jax.models.decoders import DECODERS
from detr_jax.models.layers import MLP, dense, inverse_sigmoid, torch_default_bias_init, torch_default_kernel_init
from detr_jax.models.position import LearnedPositionEmbedding, SinePositionEmbedding, downsample_mask
from detr_jax.models.resnet import BACKBONES, ResNet, valid_region


def class_head(num_classes: int, hidden_dim: int, classification: str) -> nn.Dense:
    """The class head, hidden_dim -> the classification type's logits (``detr_jax.classification``),
    float32; torch's default init, the bias at the focal prior for sigmoid_focal (as official)."""
    kind = classification_of(classification)
    bias_init = (torch_default_bias_init(hidden_dim) if kind.prior_bias is None
                 else nn.initializers.constant(kind.prior_bias))
    return nn.Dense(kind.num_logits(num_classes), dtype=jnp.float32, kernel_init=torch_default_kernel_init,
                    bias_init=bias_init, name="class_embed")


def box_head(hidden_dim: int, relative: bool) -> MLP:
    """The box MLP, hidden_dim -> 4 (pre-sigmoid), 3 layers, float32, torch's default init; its last
    layer zeroed where boxes are predicted relative to a reference (official Conditional / DAB)."""
    return MLP(hidden_dim, 4, 3, jnp.float32, torch_default_kernel_init, zero_last=relative, name="bbox_embed")


def heads(hs, references, class_embed, bbox_embed, reference_eps):
    """The decoder contract's heads (``detr_jax.models.decoders``): hs [L, B, Q, d] float32,
    references [L, B, Q, R] or None -> (logits [L, B, Q, C'], boxes [L, B, Q, 4] in (0, 1))."""
    raw = bbox_embed(hs)
    if references is not None:
        offset = inverse_sigmoid(references, reference_eps)
        raw = raw + jnp.pad(offset, [(0, 0)] * (raw.ndim - 1) + [(0, 4 - offset.shape[-1])])
    return class_embed(hs), jax.nn.sigmoid(raw)


def check_inputs(images, padding_mask) -> None:
    """Clear errors for malformed inputs, before they become shape traces deep in the network."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"images must be float [B, H, W, 3] (NHWC, RGB, ImageNet-normalised); got shape {shape}. "
                         "Official PyTorch NCHW batches need images.transpose(0, 2, 3, 1).")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be a float array (normalised pixels); got dtype {images.dtype}")
    mask_shape = getattr(padding_mask, "shape", None)
    if mask_shape != shape[:3]:
        raise ValueError(f"padding_mask must be bool [B, H, W] = {tuple(shape[:3])} matching images; got {mask_shape}")
    if padding_mask.dtype != jnp.bool_:
        raise ValueError(f"padding_mask must be bool (True = padding); got dtype {padding_mask.dtype}")


def check_padding(padding: str, backbone: nn.Module) -> None:
    """Clear errors for a padding mode the model cannot compute (``DETR.padding``)."""
    from detr_jax.config import PADDINGS

    if padding not in PADDINGS:
        raise ValueError(f"config.model.padding = {padding!r}; expected one of {', '.join(PADDINGS)}")
    if padding == "exact" and not isinstance(backbone, ResNet):
        raise ValueError("padding = 'exact' needs a named ResNet backbone (it tracks the valid size at every layer); "
                         "with a custom backbone set config.model.padding and config.eval.padding to 'official'")


def image_valid_hw(padding_mask):
    """padding_mask [B, H, W] bool (True = padding, the image at the top left) -> [B, 2] int32, the
    (h, w) of each image: its rows and columns with at least one unpadded pixel."""
    not_padding = ~padding_mask
    return jnp.stack([not_padding.any(2).sum(1), not_padding.any(1).sum(1)], axis=1).astype(jnp.int32)


class DETR(nn.Module):
    """``padding``: "exact" (each image's outputs are those of the image alone, unpadded, whatever its
    canvas and batch; the backbone must be a ResNet) or "official" (the canvas is convolved whole and
    the feature mask is the nearest-neighbour resize of padding_mask, as official DETR computes
    padded batches); see ``detr_jax.models.resnet``."""
    backbone: nn.Module
    num_classes: int = 91
    classification: str = "softmax"  # detr_jax.config.CLASSIFICATIONS
    decoder: str = "detr"  # detr_jax.config.DECODERS
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    norm: str = "layer_norm"
    ffn_type: str = "mlp"
    pre_norm: bool = False
    position_embedding: str = "sine"
    dtype: Any = jnp.float32
    attention: str = "xla"  # detr_jax.config.ATTENTIONS
    remat_transformer: bool = False
    padding: str = "exact"  # detr_jax.config.PADDINGS

    @nn.compact
    def __call__(self, images, padding_mask, train: bool = False):
        check_inputs(images, padding_mask)
        check_padding(self.padding, self.backbone)
        if self.padding == "exact":
            valid_hw = image_valid_hw(padding_mask)
            features = self.backbone(images.astype(self.dtype), valid_hw)
            mask = ~valid_region(self.backbone.output_valid_hw(valid_hw), features.shape[1:3])
        else:
            features = self.backbone(images.astype(self.dtype))
            mask = downsample_mask(padding_mask, features.shape[1:3])
        decoder = DECODERS[self.decoder]
        half = self.hidden_dim // 2
        if self.position_embedding == "sine":
            pos = SinePositionEmbedding(half, decoder.position_temperature, name="position_embedding")(mask)
        else:
            pos = LearnedPositionEmbedding(half, name="position_embedding")(mask)
        src = dense(self.hidden_dim, features.shape[-1], self.dtype, "input_proj")(features)
        queries = self.param(decoder.query_param, nn.initializers.normal(1.0),
                             (self.num_queries, decoder.query_width(self.hidden_dim)))

        b, h, w, d = src.shape
        flat = lambda x: x.reshape(b, h * w, *x.shape[3:])
        bbox_embed = box_head(self.hidden_dim, decoder.reference_eps is not None)
        hs, references, memory = decoder.module(
            num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout,
            activation=self.activation, norm=self.norm, ffn_type=self.ffn_type, pre_norm=self.pre_norm,
            dtype=self.dtype, attention_impl=self.attention, num_encoder_layers=self.num_encoder_layers,
            num_decoder_layers=self.num_decoder_layers, remat=self.remat_transformer, name="transformer",
        )(flat(src), flat(pos).astype(self.dtype), flat(mask), ((h, w),), queries, bbox_embed, train)

        # the heads run in float32 whatever the compute dtype
        logits, boxes = heads(hs.astype(jnp.float32), references, class_head(self.num_classes, self.hidden_dim,
                              self.classification), bbox_embed, decoder.reference_eps)
        for name, value in (("backbone_features", features), ("feature_mask", mask), ("pos", pos),
                            ("proj_src", src), ("memory", memory.reshape(b, h, w, d)), ("hs", hs),
                            ("references", references)):
            if value is None:
                continue
            self.sow("intermediates", name, value)
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": l, "pred_boxes": x} for l, x in zip(logits[:-1], boxes[:-1])],
        }


def build_model(model_config, backbone: nn.Module | None = None) -> DETR:
    """The DETR module for ``config.model`` (see ``detr_jax.config.model_config``).

    ``backbone``: with ``model_config.backbone = 'custom'``, any Flax module mapping images
    [B, H, W, 3] to features [B, h, w, C], used instead of a named ResNet (and trained whole).
    """
    from detr_jax.models.conv import resolve_conv_impl
    from detr_jax.models.resnet import ResNet

    cfg = model_config
    dtype = jnp.dtype(cfg.dtype)
    if (cfg.backbone == "custom") != (backbone is not None):
        raise ValueError("a custom backbone module goes with config.model.backbone = 'custom' and "
                         f"build_model(..., backbone=module); got backbone {cfg.backbone!r} and module {backbone!r}")
    if backbone is None:
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"config.model.backbone = {cfg.backbone!r}; expected one of {', '.join(BACKBONES)} "
                             "or 'custom' (with build_model(..., backbone=module))")
        conv_impl = resolve_conv_impl(cfg.conv_impl, BACKBONES[cfg.backbone].block)
        backbone = ResNet(BACKBONES[cfg.backbone], dilation=cfg.dilation, norm=cfg.backbone_norm, dtype=dtype,
                          remat=cfg.remat in ("backbone", "all"), conv_impl=conv_impl)
    check_padding(cfg.padding, backbone)
    return DETR(
        backbone=backbone, num_classes=cfg.num_classes, classification=cfg.classification, decoder=cfg.decoder,
        num_queries=cfg.num_queries,
        hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads, num_encoder_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
        activation=cfg.activation, norm=cfg.norm, ffn_type=cfg.ffn_type, pre_norm=cfg.pre_norm,
        position_embedding=cfg.position_embedding, dtype=dtype, attention=cfg.attention,
        remat_transformer=cfg.remat in ("transformer", "all"), padding=cfg.padding,
    )


def trainable_mask(params, model_config):
    """Pytree of bools over ``params``: False for the frozen ResNet stem and stages 1..frozen_stages
    (official 1: stem and layer1; 0: the stem only; -1: nothing, for training from scratch), True
    elsewhere. A 'custom' backbone is trained whole."""
    stages = model_config.frozen_stages
    frozen_prefixes = (("conv1",) if stages >= 0 else ()) + tuple(f"layer{s}_" for s in range(1, stages + 1))
    named_resnet = model_config.backbone in BACKBONES

    def trainable(path, _):
        keys = [p.key for p in path]
        return not (named_resnet and keys[0] == "backbone" and keys[1].startswith(frozen_prefixes))

    return jax.tree_util.tree_map_with_path(trainable, params)


def count_trainable(params, model_config) -> int:
    """Number of trained parameter values (official ``requires_grad`` count)."""
    sizes = jax.tree_util.tree_leaves(jax.tree.map(lambda p, t: p.size if t else 0, params,
                                                   trainable_mask(params, model_config)))
    return int(sum(sizes))
