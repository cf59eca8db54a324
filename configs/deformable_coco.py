"""Deformable DETR's COCO 2017 recipes (fundamentalvision/Deformable-DETR main.py and configs/):
300 queries, 4 feature levels with multi-scale deformable attention, FFN 1024, sigmoid focal
classification (class cost 2, CE weight 2, the top 100 (query, class) pairs kept), AdamW lr 2e-4,
backbone 2e-5, sampling offsets and reference points at 0.1 x lr, 50 epochs with the lr dropped at
40, total batch 32; otherwise the DETR recipe of configs/detr_coco.py.

Variant: KIND[_MODEL], KIND one of deformable (44.5 AP in the paper's table), refine (iterative
box refinement, 46.2), two_stage (box refinement + two-stage, 46.9); MODEL r50 (default) or r101.

  python train.py --config=configs/deformable_coco.py:refine --workdir=runs/deformable-refine \\
      --config.init.torchvision_backbone=resnet50-0676ba61.pth
  python -m detr_jax.convert --config=configs/deformable_coco.py:two_stage --source=deformable_detr \\
      --input=r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage-checkpoint.pth \\
      --output=checkpoints/deformable-two-stage
"""
import ml_collections

from configs.decoders import coco_config

KINDS = {"deformable": "deformable", "refine": "deformable_refine", "two_stage": "deformable_two_stage"}
MODELS = ("r50", "r101")


def get_config(arg: str = "deformable") -> ml_collections.ConfigDict:
    kind = next((k for k in sorted(KINDS, key=len, reverse=True) if arg == k or arg.startswith(k + "_")), None)
    model = arg[len(kind) + 1:] if kind else ""
    if kind is None or model not in ("", *MODELS):
        raise ValueError(f"configs/deformable_coco.py: unknown variant {arg!r}; expected KIND[_MODEL] with KIND one of "
                         f"{', '.join(KINDS)} and MODEL one of {', '.join(MODELS)}")
    config = coco_config(model or "r50", KINDS[kind], {50: 40}, topk=100, file="configs/deformable_coco.py")
    config.model.ffn_dim = 1024
    config.optim.update(lr=2e-4, lr_backbone=2e-5)
    config.train.batch_size = 32
    return config
