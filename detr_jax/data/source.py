"""A split of a dataset as one host reads it: records, targets, info, report, and the image order.

``load_dataset(data_config, split)`` returns a ``Source``; the pipeline (``pipeline.py``) asks it
in which order the images of an epoch arrive and for their encoded bytes. Two kinds:

An epoch's order is the same on every host (the global batch schedule of ``pipeline.py`` then
gives each host its share of every batch). Two kinds:

- random access (COCO-format folders, the synthetic dataset): an epoch is a permutation of the
  whole split; a host reads only its own images;
- sequential (tfds): the split in file order, shuffled per epoch within consecutive windows of
  ``shuffle_window`` images (a tfds file cannot be read at random); every host reads every record
  (without decoding the images of the others).
"""
import abc

import numpy as np
import tensorflow as tf
from absl import logging

from detr_jax.data.buckets import check_buckets
from detr_jax.data.records import LABEL_MAPPINGS, MAX_BOXES_POLICIES, DatasetInfo, Records, Targets, coco_ground_truth
from detr_jax.data.report import Report
from detr_jax.data.transforms import uniforms

SPLITS = ("train", "val")
SOURCES = ("synthetic", "coco_json", "tfds")
UNKNOWN_CATEGORY_POLICIES = ("error", "skip")


def check_data_config(cfg) -> None:
    """A clear error for a data config field out of range (see ``detr_jax.config.data_config``)."""
    def bad(field, expected):
        raise ValueError(f"data_config.{field} = {cfg[field]!r}; expected {expected}")

    for field, allowed in (("source", SOURCES), ("label_mapping", LABEL_MAPPINGS), ("eval_split", SPLITS),
                           ("unknown_category", UNKNOWN_CATEGORY_POLICIES), ("max_boxes_policy", MAX_BOXES_POLICIES)):
        if cfg[field] not in allowed:
            bad(field, "one of " + ", ".join(allowed))
    for field in ("max_boxes", "train_max_size", "crop_min_size", "crop_max_size", "eval_size", "eval_max_size",
                  "size_divisor", "shuffle_window", "synthetic_num_train", "synthetic_num_val",
                  "synthetic_max_objects"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            bad(field, "a positive integer")
    for field in ("train_scales", "crop_resize_scales"):
        if not cfg[field] or any(not isinstance(v, int) or v < 1 for v in cfg[field]):
            bad(field, "a non-empty sequence of positive integers")
    for field in ("flip_prob", "crop_prob"):
        if not 0.0 <= cfg[field] <= 1.0:
            bad(field, "a probability in [0, 1]")
    low, high = cfg.synthetic_object_scale
    if not 0 < low <= high <= 1:
        bad("synthetic_object_scale", "(min, max) with 0 < min <= max <= 1")
    if cfg.crop_min_size > cfg.crop_max_size:
        bad("crop_min_size", f"at most crop_max_size ({cfg.crop_max_size})")
    if cfg.num_parallel_calls != -1 and cfg.num_parallel_calls < 1:
        bad("num_parallel_calls", "-1 (autotune) or a positive integer")
    if cfg.prefetch < 0:
        bad("prefetch", "0 or more")
    if cfg.buckets:
        check_buckets(cfg.buckets, cfg.size_divisor)


class Source(abc.ABC):
    """Base of the sources: what every kind holds and the interface the pipeline uses.

    records: the images of the whole split, canonical order.
    targets: the training targets of records. info: DatasetInfo. report: what was skipped or fixed.
    data_config: the config it was loaded with.
    """
    sequential = False

    def __init__(self, *, data_config, split: str, info: DatasetInfo, records: Records, targets: Targets,
                 report: Report, process_index: int, process_count: int):
        self.data_config, self.split, self.info, self.records = data_config, split, info, records
        self.targets, self.report = targets, report
        self.process_index, self.process_count = process_index, process_count

    def shuffle_keys(self, seed: int, epoch: int) -> np.ndarray:
        """[len(records)] float64: the random sort key of each image in an epoch."""
        return uniforms(seed, epoch, self.records.image_id, 1)[:, 0]

    @abc.abstractmethod
    def train_order(self, seed: int, epoch: int) -> np.ndarray:
        """Rows of records in the order the images of an epoch arrive (the same on every host)."""

    @abc.abstractmethod
    def eval_order(self, process_index: int) -> np.ndarray:
        """Rows of records host ``process_index`` evaluates, in order (disjoint over hosts, complete)."""

    @abc.abstractmethod
    def attach_images(self, rows: tf.data.Dataset, train: bool, chunk: int) -> tf.data.Dataset:
        """rows: chunks (dicts of [<=chunk, ...] tensors) in read order -> single rows, in stream order,
        each with the encoded image in 'encoded' or a file to read in 'path'."""

    def ground_truth(self) -> dict:
        """COCO-format ground truth of the images this object holds (crowd included, true category
        ids), for pycocotools: ``coco = COCO(); coco.dataset = gt; coco.createIndex()``."""
        return coco_ground_truth(self.records, self.info)


def resolve_host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count); ``jax.process_index()`` / ``jax.process_count()`` where None."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count = {process_count})")
    return process_index, process_count


def load_dataset(data_config, split: str, *, process_index: int | None = None,
                 process_count: int | None = None) -> Source:
    """The ``split`` ('train' or 'val') of the dataset ``data_config`` describes, for one host.

    process_index / process_count default to ``jax.process_index()`` / ``jax.process_count()``.
    Annotation problems are counted in ``source.report`` (and logged); a file that is not COCO raises
    a ValueError naming the file and the field.
    """
    from detr_jax.data import coco_json, synthetic, tfds_coco

    check_data_config(data_config)
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; expected one of {', '.join(SPLITS)}")
    process_index, process_count = resolve_host(process_index, process_count)
    if data_config.source == "synthetic":
        synthetic.ensure_synthetic(synthetic.default_dir(data_config), synthetic.spec_of(data_config))
    loader = tfds_coco.load if data_config.source == "tfds" else coco_json.load
    source = loader(data_config, split, process_index, process_count)
    logging.info("%s", source.report.summary())
    return source
