"""Fine-tune an official DETR checkpoint on your own COCO-format dataset (another number of classes).

The dataset: DIR/annotations/instances_{train,val}.json and image folders (see README), labels
mapped contiguously from its category ids; the official class head is dropped and a new one sized
for the dataset is trained, everything else starts from the checkpoint:

  python train.py --config=configs/finetune.py --workdir=runs/my-finetune \
      --config.data.train_annotations=DIR/annotations/instances_train.json \
      --config.data.train_images=DIR/train --config.data.val_annotations=DIR/annotations/instances_val.json \
      --config.data.val_images=DIR/val --config.init.checkpoint=detr-r50-e632da11.pth

num_classes 0 takes the dataset's number of categories. Variant: r50 (default), r50_dc5, r101, r101_dc5
(use the checkpoint of the same model).
"""
import ml_collections

from configs.detr_coco import get_config as coco_config


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    config = coco_config(arg or "r50")
    config.model.num_classes = 0  # from the dataset
    config.data.update(source="coco_json", label_mapping="contiguous")
    config.init.update(checkpoint="", drop_class_head=True)
    config.optim.update(schedule="step", lr_drop_epochs=(40,))
    config.train.update(batch_size=8, num_epochs=50.0, eval_every_steps=0, checkpoint_every_steps=1000)
    return config
