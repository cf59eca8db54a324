"""Conditional DETR's COCO 2017 recipe (Atten4Vis/ConditionalDETR main.py): 300 queries, sigmoid
focal classification (class cost 2, CE weight 2, the top 100 (query, class) pairs kept), 50 epochs
with the lr dropped at 40, global batch 16; otherwise the DETR recipe of configs/detr_coco.py.

Variant: MODEL[_EPOCHSep], MODEL one of r50, r50_dc5, r101, r101_dc5; EPOCHS 50 (default, drop at
40) or 108 (drop at 88), the schedules of the paper.

  python train.py --config=configs/conditional_coco.py:r50 --workdir=runs/conditional-r50 \
      --config.init.torchvision_backbone=resnet50-0676ba61.pth
  python -m detr_jax.convert --config=configs/conditional_coco.py:r50 --source=conditional_detr \
      --input=ConditionalDETR_r50_epoch50.pth --output=checkpoints/conditional-r50
"""
import ml_collections

from configs.decoders import coco_config

SCHEDULES = {50: 40, 108: 88}


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return coco_config(arg, "conditional", SCHEDULES, topk=100, file="configs/conditional_coco.py")
