"""The CPU demo and the CPU study: small detectors trained from scratch on the built-in synthetic shapes.

The dataset (5 shape classes, 512 train / 128 val images of 128..256 px, 1..4 objects of 20..50% of
the short side) is generated on first use under ~/.cache/detr_jax (or --config.data.data_dir). No
download, no pretrained weights: the backbone is first pretrained for 1,000 steps as a dense
classifier of the training boxes (``detr_jax.pretrain``, standing in for ImageNet weights), then the
detector trains from it for 1,400 steps of batch 8 on images resized to a short side of 96..128 px:

  python -m detr_jax.demo                                                        # the demo's decoder
  python train.py --config=configs/synthetic.py:deformable_refine --workdir=runs/synthetic   # the same run
  python train.py --config=configs/synthetic.py --workdir=runs/synthetic-detr   # plain DETR, same budget
  python train.py --config=configs/synthetic.py:tiny --workdir=/tmp/smoke      # seconds: smoke test

Variants: [DECODER_]VARIANT. DECODER: one of configs/decoders.py's RECIPES (detr when absent;
conditional, dab, dn_dab, deformable, deformable_refine, deformable_two_stage), with that paper's
model and loss settings on the same backbone, sizes and budget, e.g. ``synthetic.py:dn_dab``,
``synthetic.py:conditional_tiny``. VARIANT: demo (default: the budget above; one encoder layer, so
that Deformable DETR's multi-scale encoder fits it), tiny (a few steps of a tiny model, for smoke
tests), overfit (8 training images, evaluated on themselves: checks that the model can fit them).
DEMO_DECODER is the decoder ``python -m detr_jax.demo`` trains: the fastest to converge of the CPU
study (configs/study_cpu.py).
"""
import ml_collections

from configs.decoders import RECIPES, apply_recipe, recipe_of
from detr_jax.config import (data_config, eval_config, init_config, loss_config, model_config, optim_config,
                              train_config)

VARIANTS = ("demo", "tiny", "overfit")
DEMO_DECODER = "deformable_refine"
DETR_AP_ON_DEMO_BUDGET = 0.067  # plain DETR's final AP at the demo's budget, mean of the CPU study's seeds

SMALL_SIZES = dict(train_scales=(96, 112, 128), train_max_size=160, crop_resize_scales=(96, 128),
                   crop_min_size=64, crop_max_size=128, eval_size=128, eval_max_size=160,
                   buckets=((128, 160), (160, 128)))  # short side <= 128, long <= 160: two shapes to compile


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
                                num_queries=10, hidden_dim=128, num_heads=4, num_encoder_layers=1,
                                num_decoder_layers=3, ffn_dim=256, dropout=0.0,
                                # trains the official padded-batch way: "exact" costs this model (masked
                                # GroupNorm statistics, small convs) ~10% of its 15-minute budget
                                padding="official")
    config.loss = loss_config()
    config.data = data_config(source="synthetic", label_mapping="contiguous", max_boxes=8, crop_prob=0.0,
                              synthetic_max_objects=4, synthetic_object_scale=(0.2, 0.5), **SMALL_SIZES)
    config.optim = optim_config(lr=3e-4, lr_backbone=3e-4, weight_decay=1e-4, clip_norm=1.0, schedule="warmup_cosine",
                                warmup_epochs=1.0)
    config.train = train_config(batch_size=8, num_steps=1400, num_epochs=0.0, log_every_steps=100,
                                checkpoint_every_steps=700, eval_every_steps=200)
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
