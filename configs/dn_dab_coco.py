"""DN-DAB-DETR's COCO 2017 recipe (IDEA-Research/DN-DETR main.py ``--modelname dn_dab_detr --use_dn``):
DAB-DETR's (configs/dab_coco.py) with the label-embedding content queries and denoising training (5
groups, label noise 0.2, box noise 0.4), 50 epochs with the lr dropped at 40, global batch 16.

Variant: MODEL[_50ep], MODEL one of r50, r50_dc5, r101, r101_dc5.

  python train.py --config=configs/dn_dab_coco.py:r50 --workdir=runs/dn-dab-r50 \
      --config.init.torchvision_backbone=resnet50-0676ba61.pth
  python -m detr_jax.convert --config=configs/dn_dab_coco.py:r50 --source=dn_dab_detr \
      --input=checkpoint.pth --output=checkpoints/dn-dab-r50
"""
import ml_collections

from configs.decoders import coco_config

SCHEDULES = {50: 40}


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return coco_config(arg, "dn_dab", SCHEDULES, topk=300, file="configs/dn_dab_coco.py")
