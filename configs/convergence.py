"""Convergence study: pre-norm DETR-R50 with linear warm-up + cosine decay on COCO 2017.

5 warm-up epochs, 100 epochs in all, peak lr 3e-4 (backbone 3e-5), clip 1.0, global batch 64,
COCO evaluation every 5 epochs (history/eval.jsonl; compare runs with their curves):

  python train.py --config=configs/convergence.py --workdir=runs/prenorm-cosine \
      --config.init.torchvision_backbone=resnet50-0676ba61.pth

Variant: the model (r50 = pre-norm R50, default; postnorm = the official post-norm R50, to compare).
"""
import ml_collections

from configs.detr_coco import get_config as coco_config


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    if arg not in ("r50", "postnorm", ""):
        raise ValueError(f"configs/convergence.py: unknown variant {arg!r}; expected r50 or postnorm")
    config = coco_config("r50")
    config.model.pre_norm = arg != "postnorm"
    config.optim.update(schedule="warmup_cosine", warmup_epochs=5.0, lr=3e-4, lr_backbone=3e-5, clip_norm=1.0,
                        end_lr_factor=0.0)
    config.train.num_epochs = 100.0
    config.train.eval_every_epochs = 5.0
    return config
