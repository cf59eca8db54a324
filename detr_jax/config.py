"""Default settings of the DETR model, in one place.

``model_config(**overrides)`` returns the ``config.model`` ConfigDict that ``build_model`` takes.
The defaults are the official DETR-R50 (facebookresearch/detr ``main.py``); config files under
``configs/`` start from them and override what differs.
"""
import ml_collections

ACTIVATIONS = ("relu", "gelu", "swish", "mish", "prelu")
NORMS = ("layer_norm", "rms_norm")
FFN_TYPES = ("mlp", "swiglu", "geglu", "glu")
POSITION_EMBEDDINGS = ("sine", "learned")
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("xla", "fused")
REMATS = ("none", "transformer", "backbone", "all")
PADDINGS = ("exact", "official")
DECODERS = ("detr", "conditional", "dab", "deformable")  # detr_jax.models.decoders
MSDA_IMPLS = ("gather", "dense")  # detr_jax.models.deformable
CLASSIFICATIONS = ("softmax", "sigmoid_focal")  # detr_jax.classification
ON_NONFINITE = ("stop", "skip")


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The model's settings (official DETR-R50 defaults), with ``overrides`` applied.

    Fields:
      num_classes: highest class index + 1 (COCO: 91, category ids used as indices).
      classification: one of CLASSIFICATIONS (``detr_jax.classification``): "softmax" (official
        DETR: num_classes + 1 logits, the last no-object, cross-entropy) or "sigmoid_focal"
        (Conditional / DAB / Deformable DETR: num_classes sigmoid scores, focal loss); the head,
        matcher, loss and postprocess follow it.
      decoder: one of DECODERS (``detr_jax.models.decoders``): "detr" (official DETR), "conditional"
        (Conditional DETR: reference points, conditional spatial queries) or "dab" (DAB-DETR: 4-d
        anchor boxes refined layer by layer; its encoder scales the position embedding, and its
        position embedding has temperature 20) or "deformable" (Deformable DETR: 4 feature levels,
        C3..C5 and a stride-64 conv, with multi-scale deformable attention in encoder and decoder).
      with_box_refine: Deformable DETR's iterative box refinement (a box head per decoder layer,
        each refining the reference boxes of the next layer).
      two_stage: Deformable DETR's two-stage variant: the encoder proposes a box per token, the
        top num_queries proposals are the decoder's queries (trained with their own loss, enc terms).
      num_feature_levels: Deformable DETR's feature levels (official ``--num_feature_levels``): 4
        (C3, C4, C5 and a stride-64 conv of C5, default) or 1 (C5 alone, the paper's single-scale
        ablation: about a quarter of the tokens at stride 32).
      label_embedding: DN-DETR's content queries: the decoder's queries start from an embedding of
        a label (``label_enc``, num_classes + 1 rows of hidden_dim - 1, and an indicator column): the
        matching queries from the no-label row, denoising queries from their noised labels
        (``config.loss.denoising``). Decoders that take it: dab (DN-DAB-DETR).
      masks: the panoptic mask head of official DETR (``detr_jax.models.segmentation``): the model
        also returns pred_masks [B, Q, H/4, W/4], trained with the mask losses (``config.loss``
        mask_weight, dice_weight) on the matched queries; needs a single-scale decoder, a named ResNet
        and batches with masks (``config.data.masks``). Its GroupNorm(8) needs hidden_dim a multiple
        of 128 and num_heads a multiple of 8 (official 256 and 8).
      freeze_detector: train the mask head alone (``bbox_attention`` and ``mask_head``), the rest
        kept as loaded from ``config.init.checkpoint`` (official ``--frozen_weights``, the recipe of
        the panoptic models: a trained detector, then 25 epochs of mask head).
      msda_impl: how multi-scale deformable attention samples its values, one of MSDA_IMPLS, the same
        values (``detr_jax.models.deformable``): "gather" (default, memory linear in the points) or
        "dense" (a sampling matrix per level and a matrix product; memory O(queries x cells)).
      num_queries: object queries (detection slots) per image.
      hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout: transformer.
      activation: FFN activation for ``ffn_type='mlp'``, one of ACTIVATIONS.
      norm: one of NORMS; ``pre_norm``: normalise before each sub-layer (post-norm is official).
      ffn_type: one of FFN_TYPES (the gated ones use their own gate activation).
      position_embedding: one of POSITION_EMBEDDINGS.
      backbone: a name from ``detr_jax.models.resnet.BACKBONES``, or 'custom' for any Flax module
        mapping images [B, H, W, 3] to a feature map [B, h, w, C], given as
        ``build_model(config.model, backbone=module)``.
      dilation: DC5, dilation instead of stride in the last ResNet stage.
      backbone_norm: "frozen_bn" (official, for pretrained backbones) or "group_norm" (trainable,
        for a ResNet trained from scratch, as in the CPU demo).
      frozen_stages: the ResNet stem and stages 1..frozen_stages are not trained (official: 1; 0: the
        stem only; -1: nothing frozen, for a backbone trained from scratch).
      dtype: computation dtype, one of DTYPES; parameters (and so the optimizer state) are always
        float32. "bfloat16" halves activation memory and uses the bfloat16 units of GPUs and TPUs;
        the attention logits and softmax, norms' statistics, the class and box heads and the loss
        stay float32.
      attention: one of ATTENTIONS. "xla": the explicit softmax(q k^T) v (the reference; needed for
        attention dropout and attention maps); "fused": ``jax.nn.dot_product_attention`` (cuDNN flash
        attention on GPU in bfloat16, XLA's elsewhere), used where attention dropout is off (eval,
        or dropout 0) and no intermediates are collected; otherwise the explicit path runs.
      remat: one of REMATS: recompute the activations of each transformer layer ("transformer"),
        each backbone residual block ("backbone") or both ("all") on the backward pass instead of
        keeping them: the same gradients with less memory (large batches), for ~1/3 more compute.
      padding: one of PADDINGS, how the backbone treats the padding around an image on its canvas
        (``detr_jax.models.resnet``). "exact": every image's outputs are those of the image alone,
        unpadded, whatever its canvas (shape bucket) and batch; needs a named ResNet backbone.
        "official": the canvas is convolved whole, as official DETR does with padded batches, so
        features near the image's bottom and right borders, and so every query, depend on the canvas.
      conv_impl: how the ResNet's convolutions run, one of ``detr_jax.models.conv.CONV_IMPLS``, all
        computing the same values: "gemm" writes the weight gradients (and 1x1 convolutions whole)
        as matrix products, which XLA's CPU backend runs several times faster than its
        convolution backward; "xla" is XLA's convolution throughout (cuDNN on GPU, the TPU's own);
        "auto" (default) picks "gemm" for the bottleneck ResNets (R50, R101) on CPU and "xla"
        elsewhere (the CPU demo's resnet_tiny trained slower with "gemm").
    """
    cfg = ml_collections.ConfigDict(dict(
        num_classes=91,
        classification="softmax",
        decoder="detr",
        num_queries=100,
        hidden_dim=256,
        num_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        ffn_dim=2048,
        dropout=0.1,
        activation="relu",
        norm="layer_norm",
        ffn_type="mlp",
        pre_norm=False,
        position_embedding="sine",
        backbone="resnet50",
        dilation=False,
        backbone_norm="frozen_bn",
        frozen_stages=1,
        dtype="float32",
        attention="xla",
        remat="none",
        padding="exact",
        conv_impl="auto",
        with_box_refine=False,
        two_stage=False,
        msda_impl="gather",
        num_feature_levels=4,
        label_embedding=False,
        masks=False,
        freeze_detector=False,
    ))
    cfg.update(overrides)
    return cfg


def loss_config(**overrides) -> ml_collections.ConfigDict:
    """The set-prediction loss's settings (official DETR defaults), with ``overrides`` applied.

    Fields:
      cost_class, cost_bbox, cost_giou: matching cost weights (official 1 / 5 / 2).
      ce_weight, bbox_weight, giou_weight: loss weights of loss_ce, loss_bbox, loss_giou (1 / 5 / 2).
      eos_coef: relative weight of the no-object class in the cross-entropy (0.1).
      aux_loss: apply the same terms to every auxiliary decoder output.
      matcher: "host" (scipy through jax.pure_callback) or "device" (exact, no host round-trip).
      focal_alpha, focal_gamma: focal loss and matching cost parameters (0.25 / 2.0) of a
        ``config.model.classification = "sigmoid_focal"`` model.
      giou_eps: added to the union and the enclosing area of the GIoU in the loss and the matching
        cost (0: official DETR, Conditional DETR; DAB-DETR's code adds 1e-6).
      denoising: DN-DETR's denoising training (``detr_jax.denoising``): groups (official
        ``--scalar``; 0: off, DN-DETR trains with 5), label_noise (chance that a label is replaced,
        official 0.2), box_noise (official 0.4: centres move up to 0.4 x half the size, sizes up to
        0.4 x themselves). Needs ``config.model.label_embedding`` and a decoder that takes it (dab).
        Training only: evaluation and detection run the model without denoising queries.
      mask_weight, dice_weight: weights of loss_mask (sigmoid focal loss, alpha 0.25, gamma 2 as
        official, averaged over each mask's pixels) and loss_dice of the matched queries' masks
        (official ``--mask_loss_coef`` 1, ``--dice_loss_coef`` 1); with ``config.model.masks``, on the
        last decoder layer only, as official.
    """
    cfg = ml_collections.ConfigDict(dict(
        cost_class=1.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        ce_weight=1.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        eos_coef=0.1,
        aux_loss=True,
        matcher="host",
        focal_alpha=0.25,
        focal_gamma=2.0,
        giou_eps=0.0,
        denoising=ml_collections.ConfigDict(dict(groups=0, label_noise=0.2, box_noise=0.4)),
        mask_weight=1.0,
        dice_weight=1.0,
    ))
    cfg.update(overrides)
    return cfg


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The input pipeline's settings (official DETR COCO recipe), with ``overrides`` applied.

    Fields (``detr_jax.data`` reads them; ``detr_jax.validation`` validates them):
      source: "tfds" (tfds_name, e.g. coco/2017 or coco/2017_panoptic), "coco_json" (an instances json
        and an image folder: COCO or any custom dataset), "coco_panoptic" (a COCO panoptic json, its
        PNG folder and an image folder; every segment a target, crowd too, as official DETR panoptic)
        or "synthetic" (the built-in shapes dataset, generated on first use).
      data_dir: coco_json: a folder with the COCO layout (annotations/instances_{train,val}2017.json,
        {train,val}2017/); coco_panoptic: annotations/panoptic_{train,val}2017.json,
        panoptic_{train,val}2017/, {train,val}2017/; synthetic: where it is generated ("":
        ~/.cache/detr_jax/synthetic-...).
      train_annotations, train_images, val_annotations, val_images: explicit instances json and image
        folder of a split ("": from data_dir).
      train_panoptic_annotations, train_panoptic_masks, val_panoptic_annotations, val_panoptic_masks:
        coco_panoptic: explicit panoptic json and PNG folder of a split ("": from data_dir; the images
        are {split}_images).
      masks: batches also carry each pixel's panoptic segment id (segments [B, H, W] int32, 0 on void
        and padding) and each target's (segment_ids [B, M] int32), for a mask head; needs a panoptic
        source (coco_panoptic, tfds coco/2017_panoptic, synthetic with synthetic_stuff > 0).
      tfds_name, tfds_data_dir, tfds_train_split, tfds_val_split: the tfds dataset (prepared with
        ``tfds build``), its folder ("": tfds's default) and split names.
      eval_split: the files evaluation reads for coco_json / synthetic: "val", or "train" to evaluate
        on the training images (overfitting checks); with tfds set tfds_val_split instead.
      synthetic_num_train, synthetic_num_val, synthetic_seed: the synthetic dataset's size and seed;
        synthetic_max_objects: most objects per image (1 + Binomial(max - 1, 0.3), about 6% of images
        empty); synthetic_object_scale: (min, max) object side as fractions of the image's short side;
        synthetic_stuff: stuff classes (0: the detection dataset; 1..4: a panoptic dataset, the shapes
        over stuff bands such as sky above ground, read as a COCO panoptic folder: every segment's box
        a target, masks with ``masks``).
      label_mapping: "category_id" (label = category id, num_classes = max id + 1; COCO: 91, as
        official DETR) or "contiguous" (label = index in the sorted category ids).
      unknown_category: an annotation whose category id is not in 'categories': "error" or "skip".
      max_boxes: target slots per image (boxes padded to it, with box_valid).
      exif: a JPEG's EXIF orientation tag where the annotated size cannot tell the annotation's
        frame (a square image, or a tag that keeps the size): "ignore" (the stored pixels, as COCO and
        official DETR read them) or "apply" (the displayed frame). Where it can tell, the annotated
        size decides: the displayed size turns the image, the stored size keeps it. Each case is
        counted in the data report (exif_applied, exif_ignored, exif_by_setting).
      max_boxes_policy: an image with more objects: "keep_largest" (the smallest are left out and
        counted) or "error".
      flip_prob: chance of a horizontal flip (train).
      crop_prob: chance of the crop branch (resize to one of crop_resize_scales, random crop of
        crop_min_size..crop_max_size pixels per side, then the multi-scale resize); otherwise only
        the multi-scale resize: short side one of train_scales, long side at most train_max_size.
      eval_size, eval_max_size: eval resize (short side, long side at most).
      size_divisor: canvas sizes are multiples of it (the backbone stride).
      buckets: canvas sizes ((h, w), ...) images are padded to; (): derived from the sizes above
        (``detr_jax.data.default_buckets``).
      shuffle_window: tfds only: images are shuffled within windows of this many consecutive images
        of a host's slice (memory: this many encoded images; random-access sources shuffle globally).
      num_parallel_calls: decode/augment parallelism (-1: tf.data autotune).
      prefetch: batches prepared ahead.
    """
    cfg = ml_collections.ConfigDict(dict(
        source="tfds",
        data_dir="",
        train_annotations="",
        train_images="",
        val_annotations="",
        val_images="",
        train_panoptic_annotations="",
        train_panoptic_masks="",
        val_panoptic_annotations="",
        val_panoptic_masks="",
        masks=False,
        tfds_name="coco/2017",
        tfds_data_dir="",
        tfds_train_split="train",
        tfds_val_split="validation",
        eval_split="val",
        synthetic_num_train=512,
        synthetic_num_val=128,
        synthetic_seed=0,
        synthetic_max_objects=12,
        synthetic_object_scale=(0.12, 0.5),
        synthetic_stuff=0,
        label_mapping="category_id",
        unknown_category="error",
        max_boxes=100,
        max_boxes_policy="keep_largest",
        exif="ignore",
        flip_prob=0.5,
        crop_prob=0.5,
        train_scales=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        train_max_size=1333,
        crop_resize_scales=(400, 500, 600),
        crop_min_size=384,
        crop_max_size=600,
        eval_size=800,
        eval_max_size=1333,
        size_divisor=32,
        buckets=(),
        shuffle_window=4096,
        num_parallel_calls=-1,
        prefetch=2,
    ))
    cfg.update(overrides)
    return cfg


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """Optimizer settings (official DETR defaults), with ``overrides`` applied.

    Fields:
      lr, lr_backbone: peak learning rates of the transformer/heads and of the trained backbone.
      lr_linear_proj_mult: Deformable DETR's sampling offsets and reference points train at lr times
        this (official 0.1; 1.0: no separate rate).
      weight_decay: AdamW decoupled weight decay; b1, b2, eps: Adam constants.
      clip_norm: clip gradients by global norm (0 = no clipping).
      schedule: "step" (x lr_drop_factor at each epoch in lr_drop_epochs), "warmup_cosine"
        (linear warm-up over warmup_epochs to lr, cosine to end_lr_factor * lr at the end of
        training) or "constant".
      grad_accum_steps: micro-batches per optimizer update (e.g. batch 5 x 12 = 60).
    """
    cfg = ml_collections.ConfigDict(dict(
        lr=1e-4,
        lr_backbone=1e-5,
        lr_linear_proj_mult=1.0,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=0.1,
        schedule="step",
        lr_drop_epochs=(400,),
        lr_drop_factor=0.1,
        warmup_epochs=0.0,
        end_lr_factor=0.0,
        grad_accum_steps=1,
    ))
    cfg.update(overrides)
    return cfg


def train_config(**overrides) -> ml_collections.ConfigDict:
    """The training loop's settings, with ``overrides`` applied.

    Fields:
      batch_size: global batch over all devices of all hosts, a multiple of the device count
        (official: 64, 4 images on each of 16 GPUs).
      num_epochs: duration in epochs, used when num_steps is 0; num_steps: duration in steps.
      seed: parameter init, dropout and data order.
      log_every_steps, checkpoint_every_steps, keep_checkpoints: logging and checkpoint cadence.
      on_nonfinite: "stop" (stop with an error, the last good checkpoint kept) or "skip" (skip the
        update and count it); a non-finite update is never applied.
      eval_every_steps: run COCO evaluation on the val split every this many steps (0: none);
      eval_every_epochs: or every this many epochs (0: none; turned into steps when the run starts,
        from the dataset and the global batch); eval_at_end: and once at the end. Its settings are
        config.eval (``eval_config``).
      compilation_cache_dir: "" or a folder where compiled programs are kept and reused by later
        runs (jax's persistent compilation cache; shared by runs of the same programs and jax).
      profile_steps: trace this many steps, from the run's second (the first compiles), with the
        jax profiler into WORKDIR/tensorboard (TensorBoard's profile tab; 0: none).
    """
    cfg = ml_collections.ConfigDict(dict(
        batch_size=64,
        num_epochs=500.0,
        num_steps=0,
        seed=0,
        log_every_steps=50,
        checkpoint_every_steps=2000,
        keep_checkpoints=3,
        on_nonfinite="stop",
        eval_every_steps=0,
        eval_every_epochs=0.0,
        eval_at_end=True,
        compilation_cache_dir="",
        profile_steps=0,
    ))
    cfg.update(overrides)
    return cfg


def init_config(**overrides) -> ml_collections.ConfigDict:
    """Where the initial weights come from, with ``overrides`` applied.

    Fields:
      checkpoint: "" (fresh init), a training workdir (its newest checkpoint's weights), a directory
        written by ``python -m detr_jax.convert``, or an official DETR checkpoint file (.pth / .npz),
        converted on the fly. A model with the mask head (``config.model.masks``) may start from a
        detector's weights, its mask head then freshly initialised (the official panoptic recipe).
      drop_class_head: load everything from ``checkpoint`` but its class head (fine-tuning on
        another set of classes).
      torchvision_backbone: "" or a torchvision ImageNet ResNet file (.pth / .npz) for the backbone,
        as the official recipe starts.
      pretrain_steps: 0, or pretrain a fresh backbone for this many steps as a dense classifier of the
        training boxes before DETR starts (a stand-in for ImageNet weights; single host; see
        ``detr_jax.pretrain``). Not redone when a run resumes from its checkpoint.
      pretrain_lr: its AdamW learning rate.
    """
    cfg = ml_collections.ConfigDict(dict(checkpoint="", drop_class_head=False, torchvision_backbone="",
                                         pretrain_steps=0, pretrain_lr=1e-3))
    cfg.update(overrides)
    return cfg


def eval_config(**overrides) -> ml_collections.ConfigDict:
    """Evaluation settings (``config.eval``), with ``overrides`` applied.

    Fields:
      batch_size: global eval batch (over all hosts; each host's share is rounded up to a multiple of
        its devices). The metrics do not depend on it.
      score_threshold: keep detections scoring at least this (0.0: all, official).
      topk: softmax models: keep each image's k best queries (0: all num_queries, official);
        sigmoid_focal models: each image's k best (query, class) pairs (0: 100, official; DAB-DETR's
        official PostProcess keeps 300, as its configs set).
      ground_truth: "" (the dataset's own annotations) or an instances json to evaluate against, e.g.
        the official annotations/instances_val2017.json with tfds COCO.
      padding: the model's padding (PADDINGS, see ``model_config``) for evaluation, its val loss and
        detection, whatever the model trained with: "exact" (each image's outputs are those of the
        image alone, so neither the batch nor the bucket moves a box) or "official" (official
        DETR's padded-batch computation; needed by a custom backbone).
      panoptic_threshold: a model with the mask head: a query makes a panoptic segment when its best
        class is an object scoring more than this (official PostProcessPanoptic: 0.85, a softmax
        probability; sigmoid_focal models score lower, their configs set it).
    """
    cfg = ml_collections.ConfigDict(dict(batch_size=8, score_threshold=0.0, topk=0, ground_truth="", padding="exact",
                                         panoptic_threshold=0.85))
    cfg.update(overrides)
    return cfg
