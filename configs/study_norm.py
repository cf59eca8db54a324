"""Post-norm against pre-norm DETR-R50 on COCO 2017, both with configs/convergence.py's recipe: 5
warm-up epochs + cosine decay, 100 epochs, peak lr 3e-4 (backbone 3e-5), clip 1.0, global batch
64, COCO AP every 5 epochs:

  python -m detr_jax.study --config=configs/study_norm.py --workdir=runs/study-norm \
      --config.overrides.init.torchvision_backbone=resnet50-0676ba61.pth \
      --config.overrides.data.tfds_data_dir=/data/tfds

Writes runs/study-norm/study.md and plots/{ap,loss}.png (detr_jax/study.py).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        groups=[dict(name="postnorm", config="configs/convergence.py:postnorm"),
                dict(name="prenorm", config="configs/convergence.py:r50")],
        seeds=(0,),
        fractions=(0.5, 0.75, 0.9),
        overrides=dict(init=dict(torchvision_backbone="resnet50-0676ba61.pth"), data=dict(tfds_data_dir="")),
    ))
