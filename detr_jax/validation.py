"""The one check of a run's config, made by every entry point before any work (``validate``).

Every enumerated field is checked against its allowed values, numbers against their ranges, and
the fields that must agree against each other; every problem found is listed in one
``ConfigError``, each as ``config.SECTION.FIELD = VALUE: expected ...``. Values derived from the
config (steps per epoch, eval steps) are computed when the run starts; the config is not changed.
A config may lack sections or fields (a model config alone, a config saved by an older version):
what is absent is not checked.
"""
import numbers

from detr_jax.config import (ACTIVATIONS, ATTENTIONS, CLASSIFICATIONS, DECODERS, DTYPES, FFN_TYPES, MSDA_IMPLS,
                             NORMS, ON_NONFINITE, PADDINGS, POSITION_EMBEDDINGS, REMATS)
from detr_jax.data.records import LABEL_MAPPINGS, MAX_BOXES_POLICIES
from detr_jax.data.registry import SOURCES
from detr_jax.data.source import SPLITS, UNKNOWN_CATEGORY_POLICIES
from detr_jax.data.synthetic import STUFF
from detr_jax.data.transforms import EXIF_POLICIES
from detr_jax.errors import ConfigError
from detr_jax.matching import METHODS as MATCHERS
from detr_jax.models.conv import CONV_IMPLS
from detr_jax.models.decoders import DECODERS as DECODER_ENTRIES
from detr_jax.models.resnet import BACKBONES, NORMS as BACKBONE_NORMS
from detr_jax.optim import SCHEDULES


def one_of(*allowed):
    return lambda v: v in allowed, "one of " + ", ".join(map(repr, allowed))


def integer(low, high=None):
    ok = lambda v: (isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v
                    and (high is None or v <= high))
    return ok, f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")


def number(low, high=None, low_open=False, high_open=False):
    def ok(v):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or v != v:
            return False
        return (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))
    return ok, (f"a number {'>' if low_open else '>='} {low}"
                + (f" and {'<' if high_open else '<='} {high}" if high is not None else ""))


def sizes(low=1):
    ok = lambda v: (isinstance(v, (tuple, list)) and len(v) > 0
                    and all(isinstance(x, numbers.Integral) and x >= low for x in v))
    return ok, f"a non-empty sequence of integers >= {low}"


POSITIVE, COUNT, PROBABILITY, WEIGHT = integer(1), integer(0), number(0, 1), number(0)
BOOL = (lambda v: isinstance(v, bool), "True or False")

FIELDS = {
    "model": dict(
        num_classes=COUNT, classification=one_of(*CLASSIFICATIONS), decoder=one_of(*DECODERS), num_queries=POSITIVE,
        hidden_dim=integer(2), num_heads=POSITIVE,
        num_encoder_layers=COUNT, num_decoder_layers=POSITIVE, ffn_dim=POSITIVE, dropout=number(0, 1, high_open=True),
        activation=one_of(*ACTIVATIONS), norm=one_of(*NORMS), ffn_type=one_of(*FFN_TYPES),
        position_embedding=one_of(*POSITION_EMBEDDINGS), backbone=one_of(*BACKBONES, "custom"),
        backbone_norm=one_of(*BACKBONE_NORMS), frozen_stages=integer(-1, 4), dtype=one_of(*DTYPES),
        attention=one_of(*ATTENTIONS), remat=one_of(*REMATS), padding=one_of(*PADDINGS),
        conv_impl=one_of(*CONV_IMPLS), with_box_refine=BOOL, two_stage=BOOL, msda_impl=one_of(*MSDA_IMPLS),
        num_feature_levels=one_of(1, 4), label_embedding=BOOL, masks=BOOL, freeze_detector=BOOL),
    "loss": dict(
        cost_class=WEIGHT, cost_bbox=WEIGHT, cost_giou=WEIGHT, ce_weight=WEIGHT, bbox_weight=WEIGHT,
        giou_weight=WEIGHT, eos_coef=number(0, 1, low_open=True), matcher=one_of(*MATCHERS),
        focal_alpha=PROBABILITY, focal_gamma=WEIGHT, giou_eps=WEIGHT, mask_weight=WEIGHT, dice_weight=WEIGHT),
    "loss.denoising": dict(groups=COUNT, label_noise=PROBABILITY, box_noise=WEIGHT),
    "data": dict(
        source=one_of(*SOURCES), eval_split=one_of(*SPLITS), label_mapping=one_of(*LABEL_MAPPINGS),
        unknown_category=one_of(*UNKNOWN_CATEGORY_POLICIES), exif=one_of(*EXIF_POLICIES),
        max_boxes_policy=one_of(*MAX_BOXES_POLICIES),
        synthetic_num_train=POSITIVE, synthetic_num_val=POSITIVE, synthetic_max_objects=POSITIVE,
        synthetic_stuff=integer(0, len(STUFF)), masks=BOOL,
        max_boxes=POSITIVE, flip_prob=PROBABILITY, crop_prob=PROBABILITY, train_scales=sizes(),
        train_max_size=POSITIVE, crop_resize_scales=sizes(), crop_min_size=POSITIVE, crop_max_size=POSITIVE,
        eval_size=POSITIVE, eval_max_size=POSITIVE, size_divisor=POSITIVE, shuffle_window=POSITIVE,
        num_parallel_calls=(lambda v: v == -1 or integer(1)[0](v), "-1 (autotune) or an integer >= 1"),
        prefetch=COUNT),
    "optim": dict(
        lr=number(0, low_open=True), lr_backbone=WEIGHT, lr_linear_proj_mult=WEIGHT, weight_decay=WEIGHT, b1=number(0, 1, high_open=True),
        b2=number(0, 1, high_open=True), eps=number(0, low_open=True), clip_norm=WEIGHT,
        schedule=one_of(*SCHEDULES), lr_drop_epochs=(lambda v: isinstance(v, (tuple, list)), "a sequence of epochs"),
        lr_drop_factor=number(0, 1, low_open=True), warmup_epochs=WEIGHT, end_lr_factor=PROBABILITY,
        grad_accum_steps=POSITIVE),
    "train": dict(
        batch_size=POSITIVE, num_epochs=WEIGHT, num_steps=COUNT, seed=COUNT, log_every_steps=POSITIVE,
        checkpoint_every_steps=POSITIVE, keep_checkpoints=POSITIVE, on_nonfinite=one_of(*ON_NONFINITE),
        eval_every_steps=COUNT, eval_every_epochs=WEIGHT, profile_steps=COUNT),
    "eval": dict(batch_size=POSITIVE, score_threshold=PROBABILITY, topk=COUNT, padding=one_of(*PADDINGS),
                 panoptic_threshold=PROBABILITY),
    "init": dict(pretrain_steps=COUNT, pretrain_lr=number(0, low_open=True)),
}


def _get(config, dotted):
    node = config
    for key in dotted.split("."):
        if not hasattr(node, "keys") or key not in node:
            return None
        node = node[key]
    return node


def field_problems(config) -> list[str]:
    """``config.SECTION.FIELD = VALUE: expected ...`` for every present field outside its rule."""
    problems = []
    for section, rules in FIELDS.items():
        for field, (ok, expected) in rules.items():
            value = _get(config, f"{section}.{field}")
            if value is not None and not ok(value):
                problems.append(f"config.{section}.{field} = {value!r}: expected {expected}")
    return problems


def relation_problems(config) -> list[str]:
    """The fields that must agree, where both are present and valid on their own."""
    get = lambda dotted: _get(config, dotted)
    problems = []
    if get("loss.classification") is not None:
        problems.append(f"config.loss.classification = {get('loss.classification')!r}: this field moved to "
                        "config.model.classification (the model's head, matcher, loss and postprocess follow it)")
    hidden, heads = get("model.hidden_dim"), get("model.num_heads")
    if hidden and heads and (hidden % 2 or hidden % heads):
        problems.append(f"config.model.hidden_dim = {hidden}: expected an even multiple of config.model.num_heads "
                        f"({heads})")
    decoder = get("model.decoder")
    for field in ("with_box_refine", "two_stage"):
        if get(f"model.{field}") and decoder != "deformable":
            problems.append(f"config.model.{field} = True: expected config.model.decoder = 'deformable' (Deformable "
                            f"DETR's option; the decoder is {decoder!r})")
    if get("model.label_embedding") and decoder in DECODER_ENTRIES and not DECODER_ENTRIES[decoder].label_embedding:
        supported = ", ".join(name for name, entry in DECODER_ENTRIES.items() if entry.label_embedding)
        problems.append(f"config.model.label_embedding = True: decoder {decoder!r} does not take DN-DETR's label "
                        f"embedding; decoders that do: {supported}")
    if get("loss.denoising.groups") and not get("model.label_embedding"):
        problems.append(f"config.loss.denoising.groups = {get('loss.denoising.groups')}: denoising needs "
                        "config.model.label_embedding = True (the DN queries' content is their label's embedding)")
    problems += mask_problems(get)
    if decoder == "deformable" and get("model.backbone") == "custom":
        problems.append("config.model.backbone = 'custom': decoder 'deformable' needs a named ResNet (it reads its "
                        "last three stages)")
    if decoder == "deformable" and hidden and hidden % 32:
        problems.append(f"config.model.hidden_dim = {hidden}: decoder 'deformable' needs a multiple of 32 (its input "
                        "projections' GroupNorm has 32 groups)")
    low, high = get("data.crop_min_size"), get("data.crop_max_size")
    if low and high and low > high:
        problems.append(f"config.data.crop_min_size = {low}: expected at most config.data.crop_max_size ({high})")
    scale = get("data.synthetic_object_scale")
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        problems.append(f"config.data.synthetic_object_scale = {tuple(scale)!r}: expected (min, max) with "
                        "0 < min <= max <= 1")
    source = get("data.source")
    if get("data.masks") and (source == "coco_json" or (source == "synthetic" and get("data.synthetic_stuff") == 0)):
        problems.append(f"config.data.masks = True: source {source!r} has no panoptic annotations; expected source "
                        "'coco_panoptic', 'tfds' with tfds_name 'coco/2017_panoptic', or 'synthetic' with "
                        "config.data.synthetic_stuff > 0")
    buckets, divisor = get("data.buckets"), get("data.size_divisor")
    if buckets and divisor and not all(len(b) == 2 and all(s > 0 and s % divisor == 0 for s in b) for b in buckets):
        problems.append(f"config.data.buckets = {tuple(map(tuple, buckets))!r}: expected (h, w) pairs, positive "
                        f"multiples of config.data.size_divisor ({divisor})")
    if get("train.num_steps") == 0 and get("train.num_epochs") == 0:
        problems.append("config.train.num_steps = 0 and config.train.num_epochs = 0: expected a duration (one > 0)")
    if get("train.eval_every_steps") and get("train.eval_every_epochs"):
        problems.append(f"config.train.eval_every_epochs = {get('train.eval_every_epochs')}: expected 0 when "
                        f"config.train.eval_every_steps is set ({get('train.eval_every_steps')}); set one of them")
    topk, queries = get("eval.topk"), get("model.num_queries")
    if topk and queries and topk > queries:
        problems.append(f"config.eval.topk = {topk}: expected at most config.model.num_queries ({queries})")
    return problems


def mask_problems(get) -> list[str]:
    """What config.model.masks and freeze_detector need (``detr_jax.models.segmentation``)."""
    decoder, hidden, heads = get("model.decoder"), get("model.hidden_dim"), get("model.num_heads")
    problems = []
    if get("model.masks"):
        if decoder in DECODER_ENTRIES and DECODER_ENTRIES[decoder].multi_scale:
            single = ", ".join(name for name, entry in DECODER_ENTRIES.items() if not entry.multi_scale)
            problems.append(f"config.model.masks = True: decoder {decoder!r} is multi-scale; the official mask head "
                            f"attends over a single-scale encoder memory; decoders that have one: {single}")
        if get("model.backbone") == "custom":
            problems.append("config.model.masks = True: needs a named ResNet (the mask head reads its stages C2..C4), "
                            "not config.model.backbone = 'custom'")
        if hidden and heads and (hidden % 128 or heads % 8):
            problems.append(f"config.model.hidden_dim = {hidden}, num_heads = {heads}: the mask head "
                            "(config.model.masks) needs hidden_dim a multiple of 128 and num_heads a multiple of 8 "
                            "(its GroupNorm(8) over hidden_dim + num_heads ... hidden_dim / 16 channels)")
        if get("data.masks") is False:
            problems.append("config.model.masks = True: expected config.data.masks = True (the mask loss reads the "
                            "batches' segments)")
    if get("model.freeze_detector"):
        if not get("model.masks"):
            problems.append("config.model.freeze_detector = True: expected config.model.masks = True (only the mask "
                            "head would be trained)")
        if get("init.checkpoint") == "":
            problems.append("config.model.freeze_detector = True: expected config.init.checkpoint (the trained "
                            "detector to freeze; a training workdir, a converted directory or an official file)")
    return problems


def validate(config) -> None:
    """``ConfigError`` listing every problem of ``config`` (see the module docstring), else nothing."""
    problems = field_problems(config)
    problems += relation_problems(config) if not problems else []
    if problems:
        raise ConfigError(("the config has a problem: " if len(problems) == 1 else
                           f"the config has {len(problems)} problems:\n  ") + "\n  ".join(problems))


def check_devices(batch_size: int, devices: int, field: str = "train.batch_size") -> None:
    """``ConfigError`` unless the global batch splits evenly over the devices (known at run start)."""
    if batch_size % devices:
        raise ConfigError(f"config.{field} = {batch_size}: expected a multiple of the number of devices ({devices})")
