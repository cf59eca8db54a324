"""The official DETR panoptic recipe on COCO panoptic 2017 (250 class indices: COCO panoptic category
ids 1..200, things 1..90, + no-object), in two stages as official:

  # 1. a box detector of every segment (things and stuff), trained on COCO panoptic:
  python train.py --config=configs/detr_panoptic_coco.py:r50_detector --workdir=runs/panoptic-r50-boxes \
      --config.init.torchvision_backbone=resnet50-0676ba61.pth
  # 2. the mask head on the frozen detector (official --masks --frozen_weights), 25 epochs, lr drop at 15:
  python train.py --config=configs/detr_panoptic_coco.py:r50 --workdir=runs/panoptic-r50 \
      --config.init.checkpoint=runs/panoptic-r50-boxes

Variants: MODEL (the mask stage) or MODEL_detector, MODEL one of r50, r50_dc5, r101 (the official
panoptic models: detr-r50-panoptic-00ce5173.pth, detr-r50-dc5-panoptic-da08f1b1.pth,
detr-r101-panoptic-40021d53.pth). Data: tfds coco/2017_panoptic (``tfds build coco/2017_panoptic``), or
a COCO panoptic folder:
  --config.data.source=coco_panoptic --config.data.data_dir=/data/coco
(annotations/panoptic_{train,val}2017.json, panoptic_{train,val}2017/, {train,val}2017/).

Convert an official panoptic checkpoint, then evaluate it (PQ, segm and bbox AP):
  python -m detr_jax.convert --config=configs/detr_panoptic_coco.py:r50 \
      --input=detr-r50-panoptic-00ce5173.pth --output=checkpoints/detr-r50-panoptic
  python eval.py --config=configs/detr_panoptic_coco.py:r50 --checkpoint=checkpoints/detr-r50-panoptic
"""
import ml_collections

from configs.detr_coco import MODELS
from detr_jax.config import (data_config, eval_config, init_config, loss_config, model_config, optim_config,
                              train_config)

PANOPTIC_MODELS = ("r50", "r50_dc5", "r101")
NUM_CLASSES = 250  # official build(): num_classes = 250 for coco_panoptic


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    detector = (arg or "").endswith("_detector")
    model = (arg or "r50").removesuffix("_detector")
    if model not in PANOPTIC_MODELS:
        raise ValueError(f"configs/detr_panoptic_coco.py: unknown variant {arg!r}; expected MODEL or MODEL_detector "
                         f"with MODEL one of {', '.join(PANOPTIC_MODELS)}")
    config = ml_collections.ConfigDict()
    config.model = model_config(num_classes=NUM_CLASSES, masks=not detector, freeze_detector=not detector,
                                **MODELS[model])
    config.loss = loss_config()
    config.data = data_config(source="tfds", tfds_name="coco/2017_panoptic", label_mapping="category_id",
                              masks=not detector)
    if detector:  # official main.py defaults: 300 epochs, lr drop at 200
        config.optim = optim_config(schedule="step", lr_drop_epochs=(200,))
        config.train = train_config(batch_size=64, num_epochs=300.0, eval_every_steps=0)
    else:  # official --epochs 25 --lr_drop 15, the detector frozen
        config.optim = optim_config(schedule="step", lr_drop_epochs=(15,))
        config.train = train_config(batch_size=64, num_epochs=25.0, eval_every_steps=0)
    config.eval = eval_config(batch_size=8)
    config.init = init_config()
    return config
