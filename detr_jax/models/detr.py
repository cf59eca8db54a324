"""The DETR module: backbone -> input projection -> transformer -> class head and box MLP.

``DETR.__call__(images, padding_mask, train=False)`` with images [B, H, W, 3] float (ImageNet-
normalised) and padding_mask [B, H, W] bool (True = padding) returns

  {"pred_logits": [B, Q, C'] float32 (``classification`` "softmax": C' = num_classes + 1, the last
                  no-object; "sigmoid_focal": C' = num_classes),
   "pred_boxes":  [B, Q, 4] float32, (cx, cy, w, h) normalised by the unpadded image size,
   "aux_outputs": [{"pred_logits", "pred_boxes"} for decoder layers 0 .. L-2]},
  and with ``masks`` "pred_masks" [B, Q, H/4, W/4] float32 mask logits and "pred_masks_hw" [B, 2, 2]
  (``detr_jax.models.segmentation``; ``DETR.mask_logits``).

The encoder-decoder between backbone and heads is ``decoder``'s (``detr_jax.models.decoders``:
DETR, Conditional DETR, DAB-DETR).

With ``mutable=["intermediates"]`` it also sows backbone_features [B, h, w, C], feature_mask
[B, h, w], pos [B, h, w, d], proj_src [B, h, w, d], memory [B, h, w, d], hs [L, B, Q, d] and, for
decoders with references, references [L, B, Q, R]; with ``label_embedding``, query_content
[B, P + Q, d] (``content_queries``); with ``masks``, bbox_mask [B, Q, heads, h, w] (the mask head's
attention maps).
With ``mutable=["attention"]`` every attention module sows its softmax weights [B, heads, Lq, Lk]
(``detr_jax.models.attention_maps`` reads the last layers' maps out of them).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.classification import classification as classification_of
from detr_jax.models.decoders import DECODERS
from detr_jax.models.layers import (MLP, dense, inverse_sigmoid, torch_default_bias_init, torch_default_kernel_init,
                                    xavier_uniform)
from detr_jax.models.position import LearnedPositionEmbedding, SinePositionEmbedding, downsample_mask
from detr_jax.models.resnet import BACKBONES, ResNet, halve, normalize, valid_region
from detr_jax.models.segmentation import MaskHeadSmallConv, MHAttentionMap, full_hw


def class_head(num_classes: int, hidden_dim: int, classification: str, name: str = "class_embed") -> nn.Dense:
    """The class head, hidden_dim -> the classification type's logits (``detr_jax.classification``),
    float32; torch's default init, the bias at the focal prior for sigmoid_focal (as official)."""
    kind = classification_of(classification)
    bias_init = (torch_default_bias_init(hidden_dim) if kind.prior_bias is None
                 else nn.initializers.constant(kind.prior_bias))
    return nn.Dense(kind.num_logits(num_classes), dtype=jnp.float32, kernel_init=torch_default_kernel_init,
                    bias_init=bias_init, name=name)


def box_head(hidden_dim: int, relative: bool, wh_bias: float = 0.0, name: str = "bbox_embed") -> MLP:
    """The box MLP, hidden_dim -> 4 (pre-sigmoid), 3 layers, float32, torch's default init; its last
    layer zeroed where boxes are predicted relative to a reference (official Conditional / DAB /
    Deformable), with ``wh_bias`` on (w, h) (Deformable DETR's -2)."""
    return MLP(hidden_dim, 4, 3, jnp.float32, torch_default_kernel_init, zero_last=relative,
               last_bias=(0.0, 0.0, wh_bias, wh_bias) if wh_bias else None, name=name)


def heads(hs, references, class_heads, box_heads, reference_eps):
    """The decoder contract's heads (``detr_jax.models.decoders``): hs [L, B, Q, d] float32,
    references (per layer [B, Q, R]) or None, one class and one box head per layer ->
    (logits [L, B, Q, C'], boxes [L, B, Q, 4] in (0, 1))."""
    logits, boxes = [], []
    for layer in range(hs.shape[0]):
        raw = box_heads[layer](hs[layer])
        if references is not None:
            offset = inverse_sigmoid(references[layer], reference_eps)
            raw = raw + jnp.pad(offset, [(0, 0)] * (raw.ndim - 1) + [(0, 4 - offset.shape[-1])])
        logits.append(class_heads[layer](hs[layer]))
        boxes.append(jax.nn.sigmoid(raw))
    return jnp.stack(logits), jnp.stack(boxes)


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


MASK_HEAD_MODULES = ("bbox_attention", "mask_head")  # the parameters ``masks`` adds (official DETRsegm's own)


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
    with_box_refine: bool = False  # Deformable DETR
    two_stage: bool = False  # Deformable DETR
    msda_impl: str = "gather"  # Deformable DETR, detr_jax.models.deformable.MSDA_IMPLS
    num_feature_levels: int = 4  # Deformable DETR: 4 (C3..C5 and a stride-64 conv) or 1 (C5)
    label_embedding: bool = False  # DN-DETR: content queries embed a label (``label_enc``); see ``content_queries``
    masks: bool = False  # the panoptic mask head: "pred_masks" (``detr_jax.models.segmentation``)

    @nn.compact
    def __call__(self, images, padding_mask, train: bool = False, denoising=None):
        """denoising: None, or (training with ``config.loss.denoising``) the noised DN queries of
        ``detr_jax.denoising.model_inputs``; their predictions come back as ``dn_outputs``."""
        check_inputs(images, padding_mask)
        check_padding(self.padding, self.backbone)
        decoder = DECODERS[self.decoder]
        features, levels = (self.multi_scale(images, padding_mask) if decoder.multi_scale
                            else self.single_scale(images, padding_mask))
        half = self.hidden_dim // 2
        if self.position_embedding == "sine":
            embed = SinePositionEmbedding(half, decoder.position_temperature, offset=decoder.position_offset,
                                          name="position_embedding")
        else:
            embed = LearnedPositionEmbedding(half, name="position_embedding")
        masks = [mask for _, mask in levels]
        pos = [embed(mask) for mask in masks]
        b, d = images.shape[0], self.hidden_dim
        flat = lambda xs: jnp.concatenate([x.reshape(b, x.shape[1] * x.shape[2], *x.shape[3:]) for x in xs], axis=1)
        queries = None if self.two_stage else self.param(
            decoder.query_param, nn.initializers.normal(1.0), (self.num_queries, decoder.query_width(d)))
        class_heads, box_heads = self.heads(decoder)
        fields = {name: getattr(self, name) for name in decoder.module_fields}
        content = self.content_queries(decoder, b, denoising) if self.label_embedding else None
        if denoising is not None and not self.label_embedding:
            raise ValueError("denoising queries need the model's label embedding (config.model.label_embedding = True)")
        hs, references, memory, encoder_outputs = decoder.module(
            num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout,
            activation=self.activation, norm=self.norm, ffn_type=self.ffn_type, pre_norm=self.pre_norm,
            dtype=self.dtype, attention_impl=self.attention, num_encoder_layers=self.num_encoder_layers,
            num_decoder_layers=self.num_decoder_layers, remat=self.remat_transformer, name="transformer", **fields,
        )(flat([src for src, _ in levels]), flat(pos).astype(self.dtype), flat(masks),
          tuple(mask.shape[1:] for mask in masks), queries, class_heads, box_heads, train,
          **({} if content is None else {"content": content}))

        # the heads run in float32 whatever the compute dtype
        logits, boxes = heads(hs.astype(jnp.float32), references, class_heads, box_heads, decoder.reference_eps)
        num_dn = 0 if denoising is None else denoising["labels"].shape[1]  # the DN slots come first
        (dn_logits, logits), (dn_boxes, boxes) = [(x[:, :, :num_dn], x[:, :, num_dn:]) for x in (logits, boxes)]
        one = lambda xs: xs[0] if len(xs) == 1 else xs  # single-scale models sow arrays, multi-scale lists
        if len(levels) == 1:
            memory = memory.reshape(masks[0].shape + (d,))
        for name, value in (("backbone_features", features), ("feature_mask", one(masks)), ("pos", one(pos)),
                            ("proj_src", one([src for src, _ in levels])), ("memory", memory), ("hs", hs),
                            ("references", references), ("query_content", content and content["content"])):
            if value is None:
                continue
            self.sow("intermediates", name, value)
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": l, "pred_boxes": x} for l, x in zip(logits[:-1], boxes[:-1])],
        }
        if self.masks:
            outputs["pred_masks"], outputs["pred_masks_hw"] = self.mask_logits(
                hs[-1][:, num_dn:], memory, masks[0], levels[0][0], features, padding_mask)
        if encoder_outputs is not None:
            outputs["enc_outputs"] = {k: v.astype(jnp.float32) for k, v in encoder_outputs.items()}
        if num_dn:
            outputs["dn_outputs"] = {
                "pred_logits": dn_logits[-1], "pred_boxes": dn_boxes[-1],
                "aux_outputs": [{"pred_logits": l, "pred_boxes": x} for l, x in zip(dn_logits[:-1], dn_boxes[:-1])]}
        return outputs

    def content_queries(self, decoder, batch: int, denoising):
        """DN-DETR's content queries: {"content" [B, P + Q, d], "anchors" [B, P, 4] (before the
        sigmoid), "mask" [B, P + Q, P + Q] or None} for the decoder (P = 0 without ``denoising``).
        ``label_enc`` [num_classes + 1, d - 1] embeds a label, and an indicator column is appended:
        the Q matching queries are the embedding of num_classes (no label) with indicator 0; a DN
        slot is its noised label's embedding with indicator 1 and anchor inverse_sigmoid(noised box),
        a slot without a target (image with fewer) content 0 and anchor logit 0, as official."""
        d = self.hidden_dim
        label_enc = self.param("label_enc", nn.initializers.normal(1.0), (self.num_classes + 1, d - 1))
        matching = jnp.broadcast_to(jnp.append(label_enc[self.num_classes], 0.0), (batch, self.num_queries, d))
        if denoising is None:
            return {"content": matching.astype(self.dtype), "anchors": jnp.zeros((batch, 0, 4)), "mask": None}
        valid = denoising["valid"][..., None]
        embedded = jnp.concatenate([label_enc[denoising["labels"]], jnp.ones((*denoising["labels"].shape, 1))], -1)
        anchors = inverse_sigmoid(denoising["boxes"], decoder.reference_eps)
        return {"content": jnp.concatenate([jnp.where(valid, embedded, 0.0), matching], axis=1).astype(self.dtype),
                "anchors": jnp.where(valid, anchors, 0.0), "mask": denoising["mask"]}

    def heads(self, decoder):
        """(class heads, box heads): one per decoder layer, plus the proposals' for two-stage; one
        shared module (official ``class_embed`` / ``bbox_embed``; ``class_embed_0`` ... for decoders
        whose official state_dict lists it per layer) unless ``with_box_refine`` (``class_embed_{l}``
        / ``bbox_embed_{l}``, as official ``_get_clones``)."""
        count = self.num_decoder_layers + int(self.two_stage)
        relative = decoder.reference_eps is not None
        # Deformable DETR starts boxes small (w, h bias -2: the shared head, or head 0 of the clones);
        # two-stage proposals carry their own size (bias 0)
        wh_bias = -2.0 if decoder.multi_scale and not self.two_stage else 0.0
        if not self.with_box_refine:
            suffix = "_0" if decoder.indexed_heads else ""
            cls = class_head(self.num_classes, self.hidden_dim, self.classification, "class_embed" + suffix)
            box = box_head(self.hidden_dim, relative, wh_bias, "bbox_embed" + suffix)
            return [cls] * count, [box] * count
        return ([class_head(self.num_classes, self.hidden_dim, self.classification, f"class_embed_{i}")
                 for i in range(count)],
                [box_head(self.hidden_dim, relative, wh_bias if i == 0 else 0.0, f"bbox_embed_{i}")
                 for i in range(count)])

    def single_scale(self, images, padding_mask):
        """-> (backbone features [B, h, w, C] (with ``masks``: the list C2, C3, C4, C5), [(src [B, h, w, d],
        mask [B, h, w])]): the last stage through a 1x1 projection (official DETR, Conditional, DAB)."""
        if self.masks and (not isinstance(self.backbone, ResNet) or self.backbone.num_outputs != 4):
            raise ValueError("config.model.masks needs a named ResNet backbone giving its 4 stages (build_model "
                             "builds it); a custom backbone cannot be used")
        exact = self.padding == "exact"
        valid_hw = image_valid_hw(padding_mask) if exact else None
        features = self.backbone(images.astype(self.dtype), valid_hw) if exact else self.backbone(
            images.astype(self.dtype))
        last = features[-1] if self.masks else features
        mask = (~valid_region(self.backbone.output_valid_hw(valid_hw), last.shape[1:3]) if exact
                else downsample_mask(padding_mask, last.shape[1:3]))
        src = dense(self.hidden_dim, last.shape[-1], self.dtype, "input_proj")(last)
        return features, [(src, mask)]

    def mask_logits(self, hs, memory, mask, src, stages, padding_mask):
        """The official DETRsegm head: hs [B, Q, d] (last decoder layer), memory [B, h, w, d], mask
        [B, h, w], src [B, h, w, d] (projected C5), stages [C2, C3, C4, C5] -> (pred_masks [B, Q, H4, W4],
        pred_masks_hw [B, 2, 2] int32: the (h, w) of the logits to read, and of the image region they
        cover on the canvas: "exact" padding: each image's own; "official": the whole maps, as official
        DETR reads them)."""
        batch, canvas_hw = padding_mask.shape[0], padding_mask.shape[1:]
        valid = None
        if self.padding == "exact":
            image_hw = image_valid_hw(padding_mask)
            valid = [self.backbone.stage_valid_hw(image_hw, s) for s in (4, 3, 2, 1)]
        bbox_mask = MHAttentionMap(self.hidden_dim, self.num_heads, name="bbox_attention")(hs, memory, mask)
        self.sow("intermediates", "bbox_mask", bbox_mask)
        logits = MaskHeadSmallConv(self.hidden_dim, self.dtype, name="mask_head")(
            src, bbox_mask, [stages[2], stages[1], stages[0]], valid)
        if valid is None:
            sizes = (full_hw(batch, logits.shape[2:]), full_hw(batch, canvas_hw))
        else:
            sizes = (valid[-1], image_hw)
        return logits, jnp.stack(sizes, axis=1).astype(jnp.int32)

    def multi_scale(self, images, padding_mask):
        """-> (backbone features [C3, C4, C5] or [C5], [(src [B, h, w, d], mask [B, h, w])] per level), as
        official Deformable DETR: ``num_feature_levels`` 4: C3, C4, C5 (strides 8, 16, 32; 1x1 conv +
        GroupNorm(32), ``input_proj_{l}``) and a 3x3 stride-2 conv + GroupNorm of C5 (stride 64);
        1: C5 alone through the 1x1 conv + GroupNorm. With "exact" padding the GroupNorm statistics
        are taken over each image's valid region."""
        stages = 1 if self.num_feature_levels == 1 else 3
        if not isinstance(self.backbone, ResNet) or self.backbone.num_outputs != stages:
            raise ValueError(f"decoder {self.decoder!r} with {self.num_feature_levels} feature levels needs a named "
                             f"ResNet backbone giving its last {stages} stage(s) (build_model builds it); a custom "
                             "backbone cannot be used")
        exact = self.padding == "exact"
        valid_hw = image_valid_hw(padding_mask) if exact else None
        features = self.backbone(images.astype(self.dtype), valid_hw)
        features = list(features) if stages > 1 else [features]
        depth = len(self.backbone.spec.depths)
        level_hw = ([self.backbone.stage_valid_hw(valid_hw, s) for s in range(depth - stages + 1, depth + 1)] if exact
                    else [None] * stages)

        def project(x, hw, kernel, stride, level):
            conv = nn.Conv(self.hidden_dim, (kernel, kernel), stride, padding=[(kernel // 2, kernel // 2)] * 2,
                           dtype=self.dtype, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                           name=f"input_proj_{level}_0")
            norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, name=f"input_proj_{level}_1")
            y = normalize(norm, conv(x), hw)
            mask = ~valid_region(hw, y.shape[1:3]) if exact else downsample_mask(padding_mask, y.shape[1:3])
            return y, mask

        levels = [project(x, hw, 1, 1, level) for level, (x, hw) in enumerate(zip(features, level_hw))]
        if self.num_feature_levels > stages:
            levels.append(project(features[-1], halve(level_hw[-1]), 3, 2, len(levels)))
        return features, levels


def init_inputs(model_config):
    """(image [1, S, S, 3], padding_mask [1, S, S]) of zeros to initialise the model (its variables do
    not depend on the size): S = 64, or for a two-stage model the smallest multiple of 64 whose
    feature levels (strides 8 to 64) hold at least num_queries proposals."""
    side = 64
    strides = (32,) if model_config.num_feature_levels == 1 else (8, 16, 32, 64)
    while model_config.two_stage and sum((-(-side // s)) ** 2 for s in strides) < model_config.num_queries:
        side += 64
    return jnp.zeros((1, side, side, 3)), jnp.zeros((1, side, side), bool)


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
                          remat=cfg.remat in ("backbone", "all"), conv_impl=conv_impl,
                          num_outputs=backbone_outputs(cfg))
    check_padding(cfg.padding, backbone)
    return DETR(
        backbone=backbone, num_classes=cfg.num_classes, classification=cfg.classification, decoder=cfg.decoder,
        num_queries=cfg.num_queries,
        hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads, num_encoder_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
        activation=cfg.activation, norm=cfg.norm, ffn_type=cfg.ffn_type, pre_norm=cfg.pre_norm,
        position_embedding=cfg.position_embedding, dtype=dtype, attention=cfg.attention,
        remat_transformer=cfg.remat in ("transformer", "all"), padding=cfg.padding,
        with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage, msda_impl=cfg.msda_impl,
        num_feature_levels=cfg.num_feature_levels, label_embedding=cfg.label_embedding, masks=cfg.masks,
    )


def backbone_outputs(model_config) -> int:
    """How many of the ResNet's last stages the model reads: C2..C5 for the mask head, C3..C5 for
    multi-scale Deformable DETR, else C5."""
    if model_config.masks:
        return 4
    return 3 if DECODERS[model_config.decoder].multi_scale and model_config.num_feature_levels > 1 else 1


def trainable_mask(params, model_config):
    """Pytree of bools over ``params``: False for the frozen ResNet stem and stages 1..frozen_stages
    (official 1: stem and layer1; 0: the stem only; -1: nothing, for training from scratch), True
    elsewhere. A 'custom' backbone is trained whole. With ``freeze_detector`` only the mask head
    (MASK_HEAD_MODULES) is trained, as official ``--frozen_weights``."""
    stages = model_config.frozen_stages
    frozen_prefixes = (("conv1",) if stages >= 0 else ()) + tuple(f"layer{s}_" for s in range(1, stages + 1))
    named_resnet = model_config.backbone in BACKBONES

    def trainable(path, _):
        keys = [p.key for p in path]
        if model_config.freeze_detector:
            return keys[0] in MASK_HEAD_MODULES
        return not (named_resnet and keys[0] == "backbone" and keys[1].startswith(frozen_prefixes))

    return jax.tree_util.tree_map_with_path(trainable, params)


def count_trainable(params, model_config) -> int:
    """Number of trained parameter values (official ``requires_grad`` count)."""
    sizes = jax.tree_util.tree_leaves(jax.tree.map(lambda p, t: p.size if t else 0, params,
                                                   trainable_mask(params, model_config)))
    return int(sum(sizes))
