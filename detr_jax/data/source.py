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

A panoptic source (``panoptic`` True: COCO panoptic folders, tfds ``coco/2017_panoptic``, the
synthetic dataset with stuff) also has a PNG of segment ids per image (``panoptic_png``): the
pipeline reads it with the image when ``config.data.masks`` is True, and
``panoptic_ground_truth`` gives PQ evaluation an image's ground truth at its original size.
"""
import abc

import numpy as np
import tensorflow as tf

from detr_jax.data.records import DatasetInfo, Records, Targets, coco_ground_truth
from detr_jax.data.report import Report
from detr_jax.data.transforms import decode_segment_ids, uniforms
from detr_jax.errors import ConfigError, DataError

SPLITS = ("train", "val")
UNKNOWN_CATEGORY_POLICIES = ("error", "skip")


class Source(abc.ABC):
    """Base of the sources: what every kind holds and the interface the pipeline uses.

    records: the images of the whole split, canonical order.
    targets: the training targets of records. info: DatasetInfo. report: what was skipped or fixed.
    data_config: the config it was loaded with. panoptic: its annotations are segments with a
    panoptic PNG per image (records.segment_id, ``panoptic_png``).
    """
    sequential = False

    def __init__(self, *, data_config, split: str, info: DatasetInfo, records: Records, targets: Targets,
                 report: Report, process_index: int, process_count: int, panoptic: bool = False):
        self.data_config, self.split, self.info, self.records = data_config, split, info, records
        self.targets, self.report, self.panoptic = targets, report, panoptic
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

    def rows_of(self, image_ids) -> np.ndarray:
        """image_ids [n] (e.g. a batch's, where example_valid) -> [n] int64 rows of records."""
        by_id = np.argsort(self.records.image_id, kind="stable")
        rows = by_id[np.searchsorted(self.records.image_id, image_ids, sorter=by_id).clip(0, len(by_id) - 1)]
        if len(rows) and (self.records.image_id[rows] != image_ids).any():
            raise KeyError(f"image ids {sorted(set(np.asarray(image_ids).tolist()) - set(self.records.image_id))} "
                           f"are not in the {self.split} split")
        return rows

    def panoptic_png(self, row: int) -> bytes:
        """The encoded panoptic PNG of records row ``row`` (a panoptic source only)."""
        if not self.panoptic:
            raise ValueError(f"{self.report.name} has no panoptic annotations")
        with tf.io.gfile.GFile(self.records.panoptic_path[row], "rb") as f:
            return f.read()

    def panoptic_ground_truth(self, row: int) -> tuple[np.ndarray, list[dict]]:
        """The panoptic ground truth of records row ``row`` at its original size, for PQ evaluation:
        (ids [h, w] int32, segments [{"id", "category_id", "iscrowd"}] as annotated).

        ids: the PNG's segment ids (panopticapi's rgb2id), 0 on void and on pixels of ids that no
        listed segment has (a segment left out with unknown_category='skip'). Raises a DataError when
        the PNG cannot be decoded or its size is not the annotated one.
        """
        name = f"{self.records.file_name[row]} (image id {self.records.image_id[row]})"
        try:
            ids = decode_segment_ids(self.panoptic_png(row)).numpy()
        except tf.errors.OpError as error:
            raise DataError(f"{self.report.name}: the panoptic PNG of {name} cannot be read ({error.message})") from None
        if ids.shape != tuple(self.records.orig_size[row]):
            raise DataError(f"{self.report.name}: the panoptic PNG of {name} is {ids.shape[0]} x {ids.shape[1]}, "
                            f"the image is annotated {self.records.orig_size[row][0]} x {self.records.orig_size[row][1]}")
        anns = range(self.records.ann_splits[row], self.records.ann_splits[row + 1])
        segments = [{"id": int(self.records.segment_id[a]), "category_id": int(self.records.category_id[a]),
                     "iscrowd": int(self.records.iscrowd[a])} for a in anns]
        listed = np.isin(ids, [s["id"] for s in segments])
        return np.where(listed, ids, 0).astype(np.int32), segments


def check_masks(data_config, panoptic: bool, what: str) -> None:
    """A ConfigError when ``config.data.masks`` asks for masks from a source without panoptic
    annotations (``what`` names it)."""
    if data_config.masks and not panoptic:
        raise ConfigError(f"config.data.masks = True needs panoptic annotations, but source {data_config.source!r} "
                          f"({what}) has none; use source 'coco_panoptic', source 'tfds' with tfds_name "
                          "'coco/2017_panoptic', or source 'synthetic' with config.data.synthetic_stuff > 0")


def resolve_host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count); ``jax.process_index()`` / ``jax.process_count()`` where None."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count = {process_count})")
    return process_index, process_count
