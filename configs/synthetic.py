"""The CPU demo: a small DETR trained from scratch on the built-in synthetic shapes dataset.

The dataset (5 shape classes, 512 train / 128 val images of 128..256 px, 1..4 objects of 20..50% of
the short side) is generated on first use under ~/.cache/detr_jax (or --config.data.data_dir). No
download, no pretrained weights: the backbone is first pretrained for 1,000 steps as a dense
classifier of the training boxes (``detr_jax.pretrain``, standing in for ImageNet weights), then
DETR trains from it:

  python train.py --config=configs/synthetic.py --workdir=runs/synthetic       # the demo
  python train.py --config=configs/synthetic.py:tiny --workdir=/tmp/smoke      # seconds: smoke test

Variants: [DECODER_]VARIANT. VARIANT: demo (default), tiny (a few steps of a tiny model, for smoke
tests), overfit (8 training images, evaluated on themselves: checks that the model can fit them).
DECODER: conditional or dab, the same backbone, sizes and budget with Conditional DETR's or
DAB-DETR's decoder and loss settings (configs/decoders.py), e.g. ``synthetic.py:dab`` (the demo),
``synthetic.py:conditional_tiny``.
"""
import ml_collections

from configs.decoders import RECIPES, apply_recipe, recipe_of
from detr_jax.config import (data_config, eval_config, init_config, loss_config, model_config, optim_config,
                              train_config)

VARIANTS = ("demo", "tiny", "overfit")

SMALL_SIZES = dict(train_scales=(128, 144, 160, 176, 192), train_max_size=256, crop_resize_scales=(128, 160),
                   crop_min_size=96, crop_max_size=160, eval_size=160, eval_max_size=256,
                   buckets=((192, 256), (256, 192)))  # short side <= 192, long <= 256: two shapes to compile


def parse_variant(arg: str) -> tuple[str, str]:
    """'dab_tiny' -> ('dab', 'tiny'); 'conditional' -> ('conditional', 'demo'); '' -> ('detr', 'demo')."""
    decoder, variant = recipe_of(arg or "demo")
    variant = variant or "demo"
    if variant not in VARIANTS:
        raise ValueError(f"configs/synthetic.py: unknown variant {arg!r}; expected [DECODER_]VARIANT with DECODER "
                         f"one of {', '.join(RECIPES)} and VARIANT one of {', '.join(VARIANTS)}")
    return decoder, variant


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    decoder, variant = parse_variant(arg)
    config = ml_collections.ConfigDict()
    config.model = model_config(backbone="resnet_tiny", backbone_norm="group_norm", frozen_stages=-1, num_classes=5,
                                num_queries=10, hidden_dim=128, num_heads=4, num_encoder_layers=3,
                                num_decoder_layers=3, ffn_dim=256, dropout=0.0,
                                # trains the official padded-batch way: "exact" costs this model (masked
                                # GroupNorm statistics, small convs) ~10% of its 15-minute budget
                                padding="official")
    config.loss = loss_config()
    config.data = data_config(source="synthetic", label_mapping="contiguous", max_boxes=8, crop_prob=0.0,
                              synthetic_max_objects=4, synthetic_object_scale=(0.2, 0.5), **SMALL_SIZES)
    config.optim = optim_config(lr=3e-4, lr_backbone=3e-4, weight_decay=1e-4, clip_norm=1.0, schedule="warmup_cosine",
                                warmup_epochs=1.0)
    config.train = train_config(batch_size=8, num_epochs=64.0, log_every_steps=100, checkpoint_every_steps=1000,
                                eval_every_steps=1000)
    # evaluated as it trains: its GroupNorm statistics were learned over padded canvases, and "exact"
    # evaluation (statistics of each image alone) cost the demo 0.31 -> 0.19 AP (measured)
    config.eval = eval_config(batch_size=8, padding="official")
    config.init = init_config(pretrain_steps=1000)
    if variant == "tiny":
        config.model.update(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=64, num_queries=10)
        config.data.update(synthetic_num_train=32, synthetic_num_val=8, train_scales=(96, 112, 128), train_max_size=128,
                           crop_resize_scales=(96,), crop_min_size=64, crop_max_size=96, eval_size=128,
                           eval_max_size=128, buckets=((128, 128),))  # one bucket: one compile
        config.train.update(batch_size=4, num_steps=6, num_epochs=0.0, log_every_steps=2, checkpoint_every_steps=3,
                            eval_every_steps=0, eval_at_end=False)
        config.init.pretrain_steps = 0
    elif variant == "overfit":
        config.data.update(synthetic_num_train=8, synthetic_num_val=8, flip_prob=0.0, crop_prob=0.0,
                           train_scales=(160,), buckets=((256, 256),), eval_split="train")
        config.train.update(batch_size=8, num_steps=800, num_epochs=0.0, eval_every_steps=400)
        config.init.pretrain_steps = 0  # memorising 8 images needs no pretrained features
    return apply_recipe(config, decoder)
