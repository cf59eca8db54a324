"""Default settings of the DETR model, in one place.

``model_config(**overrides)`` returns the ``config.model`` ConfigDict that ``build_model`` takes.
The defaults are the official DETR-R50 (facebookresearch/detr ``main.py``); config files under
``configs/`` start from them and override what differs.
"""
import ml_collections

ACTIVATIONS = ("relu", "gelu", "swish", "mish")
NORMS = ("layer_norm", "rms_norm")
FFN_TYPES = ("mlp", "swiglu", "geglu", "glu")
POSITION_EMBEDDINGS = ("sine", "learned")
DTYPES = ("float32", "bfloat16")


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The model's settings (official DETR-R50 defaults), with ``overrides`` applied.

    Fields:
      num_classes: highest class index + 1 (COCO: 91, category ids used as indices); the class head
        has ``num_classes + 1`` logits, the last is no-object.
      num_queries: object queries (detection slots) per image.
      hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout: transformer.
      activation: FFN activation for ``ffn_type='mlp'``, one of ACTIVATIONS.
      norm: one of NORMS; ``pre_norm``: normalise before each sub-layer (post-norm is official).
      ffn_type: one of FFN_TYPES (the gated ones use their own gate activation).
      position_embedding: one of POSITION_EMBEDDINGS.
      backbone: a name from ``detr_jax.models.resnet.BACKBONES``, or 'custom' for any Flax module
        mapping images [B, H, W, 3] to a feature map [B, h, w, C], given as
        ``build_model(config.model, backbone=module)``.
      dilation: DC5, dilation instead of stride in the last ResNet stage.
      frozen_stages: the ResNet stem and stages 1..frozen_stages are not trained (official: 1).
      dtype: computation dtype, one of DTYPES; parameters are always float32.
    """
    cfg = ml_collections.ConfigDict(dict(
        num_classes=91,
        num_queries=100,
        hidden_dim=256,
        num_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        ffn_dim=2048,
        dropout=0.1,
        activation="relu",
        norm="layer_norm",
        ffn_type="mlp",
        pre_norm=False,
        position_embedding="sine",
        backbone="resnet50",
        dilation=False,
        frozen_stages=1,
        dtype="float32",
    ))
    cfg.update(overrides)
    return cfg


def loss_config(**overrides) -> ml_collections.ConfigDict:
    """The set-prediction loss's settings (official DETR defaults), with ``overrides`` applied.

    Fields:
      cost_class, cost_bbox, cost_giou: matching cost weights (official 1 / 5 / 2).
      ce_weight, bbox_weight, giou_weight: loss weights of loss_ce, loss_bbox, loss_giou (1 / 5 / 2).
      eos_coef: relative weight of the no-object class in the cross-entropy (0.1).
      aux_loss: apply the same terms to every auxiliary decoder output.
      matcher: "host" (scipy through jax.pure_callback) or "device" (exact, no host round-trip).
      classification: "softmax" (official cross-entropy) or "sigmoid_focal" (focal loss).
      focal_alpha, focal_gamma: focal-loss parameters (0.25 / 2.0).
    """
    cfg = ml_collections.ConfigDict(dict(
        cost_class=1.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        ce_weight=1.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        eos_coef=0.1,
        aux_loss=True,
        matcher="host",
        classification="softmax",
        focal_alpha=0.25,
        focal_gamma=2.0,
    ))
    cfg.update(overrides)
    return cfg
