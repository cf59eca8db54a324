"""The decoders at 50 epochs on COCO 2017 (lr dropped at 40), each with its paper's recipe:
DETR (configs/detr_coco.py:r50, its 100 queries and global batch 64, the schedule shortened to 50
epochs), Conditional DETR (configs/conditional_coco.py:r50), DAB-DETR (configs/dab_coco.py:r50),
DN-DAB-DETR (configs/dn_dab_coco.py:r50, denoising training) and Deformable DETR plain, with box refinement and two-stage (configs/deformable_coco.py); the recipes
are configs/decoders.py's. COCO AP every 2 epochs:

  python -m detr_jax.study --config=configs/study_decoders.py --workdir=runs/study-decoders \
      --config.overrides.init.torchvision_backbone=resnet50-0676ba61.pth \
      --config.overrides.data.tfds_data_dir=/data/tfds

Writes runs/study-decoders/study.md and plots/{ap,loss}.png (detr_jax/study.py).
"""
import ml_collections

GROUPS = [
    dict(name="detr", config="configs/detr_coco.py:r50",
         overrides={"train.num_epochs": 50.0, "optim.lr_drop_epochs": (40,)}),
    dict(name="conditional", config="configs/conditional_coco.py:r50"),
    dict(name="dab", config="configs/dab_coco.py:r50"),
    dict(name="dn_dab", config="configs/dn_dab_coco.py:r50"),
    dict(name="deformable", config="configs/deformable_coco.py:deformable"),
    dict(name="deformable_refine", config="configs/deformable_coco.py:refine"),
    dict(name="deformable_two_stage", config="configs/deformable_coco.py:two_stage"),
]


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        groups=GROUPS,
        seeds=(0,),
        fractions=(0.5, 0.75, 0.9),
        overrides=dict(init=dict(torchvision_backbone="resnet50-0676ba61.pth"), data=dict(tfds_data_dir=""),
                       train=dict(eval_every_epochs=2.0)),
    ))
