"""The official DETR models on COCO (91 class indices = COCO category ids, + no-object).

Variants: r50 (default), r50_dc5, r101, r101_dc5, and r50_prenorm (pre-norm transformer).
Convert an official checkpoint for one of them:

  python -m detr_jax.convert --config=configs/detr_coco.py:r50 \
      --input=detr-r50-e632da11.pth --output=checkpoints/detr-r50
"""
import ml_collections

from detr_jax.config import loss_config, model_config

VARIANTS = {
    "r50": dict(backbone="resnet50"),
    "r50_dc5": dict(backbone="resnet50", dilation=True),
    "r101": dict(backbone="resnet101"),
    "r101_dc5": dict(backbone="resnet101", dilation=True),
    "r50_prenorm": dict(backbone="resnet50", pre_norm=True),
}


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    variant = arg or "r50"
    if variant not in VARIANTS:
        raise ValueError(f"configs/detr_coco.py: unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = model_config(num_classes=91, **VARIANTS[variant])
    config.loss = loss_config()
    return config
