"""The DETR paper's training schedules on COCO 2017 (configs/detr_coco.py, DETR-R50, the official
recipe otherwise): 500 epochs with the lr dropped at 400 (the paper's Table 1 model, 42.0 AP), 300
dropped at 200 (the paper's baseline: the longer schedule "adds 1.5 AP"), 150 dropped at 100 (the
official repository's reproduction schedule, 39.5 AP); COCO AP every 10 epochs:

  python -m detr_jax.study --config=configs/study_schedules.py --workdir=runs/study-schedules \
      --config.overrides.init.torchvision_backbone=resnet50-0676ba61.pth \
      --config.overrides.data.tfds_data_dir=/data/tfds
  python -m detr_jax.study --config=configs/study_schedules.py --workdir=runs/study-schedules \
      --config.overrides.init.torchvision_backbone=resnet50-0676ba61.pth --print_commands   # one per host

Writes runs/study-schedules/study.md and plots/{ap,loss}.png (detr_jax/study.py).
"""
import ml_collections

SCHEDULES = (500, 300, 150)  # epochs; the lr drop of each is configs/detr_coco.py's


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        groups=[dict(name=f"{epochs}ep", config=f"configs/detr_coco.py:r50_{epochs}ep") for epochs in SCHEDULES],
        seeds=(0,),
        fractions=(0.5, 0.75, 0.9),
        overrides=dict(init=dict(torchvision_backbone="resnet50-0676ba61.pth"), data=dict(tfds_data_dir=""),
                       train=dict(eval_every_epochs=10.0)),
    ))
