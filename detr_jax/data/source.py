"""A split of a dataset as one host reads it: records, targets, info, report, and the image order.

``Source`` is the base of every kind (``registry.load_dataset(data_config, split)`` returns one);
the pipeline (``pipeline.py``) asks it in which order the images of an epoch arrive and for their
encoded bytes.

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

from detr_jax.data.records import DatasetInfo, Records, Targets, coco_ground_truth
from detr_jax.data.report import Report
from detr_jax.data.transforms import uniforms

SPLITS = ("train", "val")
UNKNOWN_CATEGORY_POLICIES = ("error", "skip")


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
