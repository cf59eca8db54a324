"""DAB-DETR's COCO 2017 recipe (IDEA-Research/DAB-DETR main.py): 300 anchor-box queries, sigmoid
focal classification (class cost 2, CE weight 1, the top 300 (query, class) pairs kept), PReLU, no
dropout, position embedding temperature 20, 50 epochs with the lr dropped at 40, global batch 16;
otherwise the DETR recipe of configs/detr_coco.py.

Variant: MODEL[_50ep], MODEL one of r50, r50_dc5, r101, r101_dc5.

  python train.py --config=configs/dab_coco.py:r50 --workdir=runs/dab-r50 \
      --config.init.torchvision_backbone=resnet50-0676ba61.pth
  python -m detr_jax.convert --config=configs/dab_coco.py:r50 --source=dab_detr \
      --input=checkpoint.pth --output=checkpoints/dab-r50
"""
import ml_collections

from configs.decoders import coco_config

SCHEDULES = {50: 40}


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return coco_config(arg, "dab", SCHEDULES, topk=300, file="configs/dab_coco.py")
