"""The official DETR recipe on COCO 2017 (91 class indices = COCO category ids, + no-object).

Variant: MODEL[_EPOCHSep] with MODEL one of r50, r50_dc5, r101, r101_dc5, r50_prenorm and EPOCHS
one of 500 (default, lr drop at 400), 300 (drop at 200), 150 (drop at 100). AdamW lr 1e-4,
backbone 1e-5, weight decay 1e-4, clip 0.1, global batch 64, ImageNet backbone (set
init.torchvision_backbone), COCO from tfds (prepare it with `tfds build coco/2017`):

  python train.py --config=configs/detr_coco.py:r50_300ep --workdir=runs/detr-r50 \
      --config.init.torchvision_backbone=resnet50-0676ba61.pth

COCO as a folder instead (annotations/instances_{train,val}2017.json, {train,val}2017/):
  --config.data.source=coco_json --config.data.data_dir=/data/coco

Convert an official checkpoint for one of the models:
  python -m detr_jax.convert --config=configs/detr_coco.py:r50 \
      --input=detr-r50-e632da11.pth --output=checkpoints/detr-r50
"""
import ml_collections

from detr_jax.config import (data_config, eval_config, init_config, loss_config, model_config, optim_config,
                              train_config)

MODELS = {
    "r50": dict(backbone="resnet50"),
    "r50_dc5": dict(backbone="resnet50", dilation=True),
    "r101": dict(backbone="resnet101"),
    "r101_dc5": dict(backbone="resnet101", dilation=True),
    "r50_prenorm": dict(backbone="resnet50", pre_norm=True),
}
SCHEDULES = {500: 400, 300: 200, 150: 100}  # epochs: lr drop epoch


def parse_variant(arg: str, schedules=None, file: str = "configs/detr_coco.py",
                  default_epochs: int = 500) -> tuple[str, int]:
    """'r50_dc5_300ep' -> ('r50_dc5', 300); 'r101' -> ('r101', default_epochs); the epochs one of
    ``schedules`` (default SCHEDULES)."""
    schedules = SCHEDULES if schedules is None else schedules
    model, epochs = arg or "r50", default_epochs
    if model.endswith("ep") and "_" in model:
        model, _, suffix = model.rpartition("_")
        epochs = int(suffix[:-2]) if suffix[:-2].isdigit() else -1
    if model not in MODELS or epochs not in schedules:
        raise ValueError(f"{file}: unknown variant {arg!r}; expected MODEL[_EPOCHSep] with MODEL in "
                         f"{', '.join(MODELS)} and EPOCHS in {', '.join(map(str, schedules))}")
    return model, epochs


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    model, epochs = parse_variant(arg)
    config = ml_collections.ConfigDict()
    config.model = model_config(num_classes=91, **MODELS[model])
    config.loss = loss_config()
    config.data = data_config(source="tfds", label_mapping="category_id")
    config.optim = optim_config(schedule="step", lr_drop_epochs=(SCHEDULES[epochs],))
    config.train = train_config(batch_size=64, num_epochs=float(epochs), eval_every_steps=0)
    config.eval = eval_config(batch_size=8)  # --config.eval.ground_truth=.../instances_val2017.json with tfds
    config.init = init_config()
    return config
