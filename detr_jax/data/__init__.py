"""The input pipeline: sources -> decode + augment -> pad to a shape bucket -> batch -> shard.

    from detr_jax.config import data_config
    from detr_jax.data import train_batches, eval_batches

    cfg = data_config(source="synthetic")
    batches = train_batches(cfg, batch_size=8, seed=0)   # endless; batches.num_batches per epoch
    batch = next(batches)                               # dict of numpy arrays, see pipeline.py
    batches.info.num_classes, batches.info.category_ids(batch["labels"])
    print(batches.report.summary())                     # what was skipped or fixed

Sources: tfds COCO (``tfds_coco``, also coco/2017_panoptic), COCO-format folders (``coco_json``),
COCO panoptic folders (``coco_panoptic``), the built-in synthetic dataset (``synthetic``; with
stuff classes a panoptic one). ``cfg.masks = True`` adds segments / segment_ids to the batches. ``load_dataset(cfg, split)`` gives a ``Source`` (info, records, report,
``ground_truth()`` for pycocotools) that ``train_batches`` / ``eval_batches`` accept to avoid
loading twice.
"""
from detr_jax.data.buckets import default_buckets, padding_fraction
from detr_jax.data.pipeline import (Batches, bucket_list, eval_batches, steps_per_epoch, train_batches,
                                    train_host_batch)
from detr_jax.data.records import DatasetInfo
from detr_jax.data.registry import load_dataset
from detr_jax.data.report import Report
from detr_jax.data.source import Source

__all__ = ["Batches", "DatasetInfo", "Report", "Source", "bucket_list", "default_buckets",
           "eval_batches", "load_dataset", "padding_fraction", "steps_per_epoch", "train_batches",
           "train_host_batch"]
