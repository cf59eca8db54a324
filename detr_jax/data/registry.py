"""Which loader reads each ``config.data.source``: the one module that knows every kind of source
(the sources derive from ``source.Source`` and never import this)."""
from absl import logging

from detr_jax.data import coco_json, coco_panoptic, synthetic, tfds_coco
from detr_jax.data.source import SPLITS, Source, resolve_host


def _load_synthetic(data_config, split: str, process_index: int, process_count: int) -> Source:
    """The built-in synthetic dataset: generated on first use, then read as a COCO-format folder (with
    stuff classes: as a COCO panoptic folder, every segment a target)."""
    synthetic.ensure_synthetic(synthetic.default_dir(data_config), synthetic.spec_of(data_config))
    if data_config.synthetic_stuff:
        return coco_panoptic.load(data_config, split, process_index, process_count, layout="synthetic_panoptic")
    return coco_json.load(data_config, split, process_index, process_count)


LOADERS = {"synthetic": _load_synthetic, "coco_json": coco_json.load, "tfds": tfds_coco.load,
           "coco_panoptic": coco_panoptic.load}
SOURCES = tuple(LOADERS)


def load_dataset(data_config, split: str, *, process_index: int | None = None,
                 process_count: int | None = None) -> Source:
    """The ``split`` ('train' or 'val') of the dataset ``data_config`` describes, for one host.

    process_index / process_count default to ``jax.process_index()`` / ``jax.process_count()``.
    Annotation problems are counted in ``source.report`` (and logged); a file that is not COCO raises
    a ``DataError`` naming the file and the field.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; expected one of {', '.join(SPLITS)}")
    process_index, process_count = resolve_host(process_index, process_count)
    source = LOADERS[data_config.source](data_config, split, process_index, process_count)
    logging.info("%s", source.report.summary())
    return source
