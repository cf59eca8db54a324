"""The CPU panoptic demo: DETR's mask head on the synthetic shapes over two stuff classes.

The synthetic dataset with ``synthetic_stuff=2`` (sky above, ground below a wavy boundary; the 5
shapes over them; a COCO panoptic folder, generated on first use) trains, as the official panoptic
recipe does, in two stages:

  python train.py --config=configs/synthetic_panoptic.py:detector --workdir=runs/panoptic-detector
  python train.py --config=configs/synthetic_panoptic.py:masks --workdir=runs/panoptic-masks \
      --config.init.checkpoint=runs/panoptic-detector

1. ``detector``: a detector of every segment's box (things and stuff, 7 classes), the CPU demo's
   budget and backbone pretraining (configs/synthetic.py), with the DN-DAB-DETR decoder, the single-
   scale decoder that converged fastest in the CPU study (the mask head needs a single-scale
   encoder memory);
2. ``masks``: the detector frozen (official ``--frozen_weights``), the mask head trained with the
   focal and DICE mask losses; evaluation reports PQ / SQ / RQ and segm AP beside the box AP.

``joint``: detector and mask head trained together from the pretrained backbone (one stage). A
``tiny_`` prefix (tiny_detector, tiny_masks, tiny_joint): a few steps of a tiny model (smoke tests).
``python -m detr_jax.demo --panoptic`` runs both stages and draws the panoptic result.
"""
import ml_collections

from configs import synthetic

STAGES = ("detector", "masks", "joint")
DECODER = "dn_dab"
STUFF = 2
# sigmoid_focal scores run lower than official DETR's softmax probabilities (its 0.85); measured on the
# demo's validation images (README, CPU panoptic demo)
PANOPTIC_THRESHOLD = 0.5
PANOPTIC_SIZES = dict(train_scales=(160, 192, 224), train_max_size=288, eval_size=192, eval_max_size=256,
                      buckets=((224, 288), (288, 224)))  # short side 160..224 px: 5..7 x 7..9 cells at stride 32


def get_config(arg: str = "masks") -> ml_collections.ConfigDict:
    tiny = (arg or "").startswith("tiny_")
    stage = (arg or "masks").removeprefix("tiny_")
    if stage not in STAGES:
        raise ValueError(f"configs/synthetic_panoptic.py: unknown variant {arg!r}; expected [tiny_]STAGE with STAGE "
                         f"one of {', '.join(STAGES)}")
    config = synthetic.get_config(DECODER + ("_tiny" if tiny else ""))
    # the mask head's GroupNorm(8) runs over hidden_dim + num_heads channels
    config.model.update(num_classes=5 + STUFF, num_heads=8, hidden_dim=128)
    config.data.update(synthetic_stuff=STUFF, max_boxes=8)
    if not tiny:  # the mask head's single-scale attention (stride 32) needs more cells than the 128-px demo's 4 x 5
        config.data.update(**PANOPTIC_SIZES)
    config.eval.panoptic_threshold = PANOPTIC_THRESHOLD
    if tiny:
        config.data.update(synthetic_num_train=16, synthetic_num_val=4)
        config.train.eval_at_end = stage != "detector"  # the smoke test evaluates PQ once
    elif stage != "masks":
        config.train.num_steps = 2800
    if stage == "detector":
        return config
    config.model.masks = True
    config.data.masks = True
    if stage == "masks":
        config.model.freeze_detector = True
        config.init.pretrain_steps = 0  # the detector's backbone is loaded
        if not tiny:  # a fresh head on a CPU budget: 10x official's lr 1e-4 (measured: at 1e-4 the DICE loss was
            # still 0.71 after 500 steps), warm-up and cosine decay
            config.optim.update(lr=1e-3, warmup_epochs=1.0)
            config.train.update(num_steps=2000, eval_every_steps=500, checkpoint_every_steps=500)
    return config
