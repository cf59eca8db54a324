"""Image files without annotations, as a source for detection (``python -m detr_jax.detect``).

``find_images`` turns what a user names (a file, a folder, a glob) into paths; ``load_image_files``
reads each file's size from its header and returns a source that ``eval_batches`` accepts, so the
images are resized, bucketed and padded exactly as evaluation does it.
"""
import glob
import os

import numpy as np
from PIL import Image

from detr_jax.data.coco_json import JsonSource
from detr_jax.data.records import DatasetInfo, Targets, build_records
from detr_jax.data.report import Report

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what tf.io.decode_image reads


def find_images(spec: str) -> list[str]:
    """An image file, a folder (its image files, by name; not recursive) or a glob pattern (``**``
    recursive) -> sorted paths. A folder or glob keeps only names ending in ``IMAGE_SUFFIXES``."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        candidates = [os.path.join(spec, name) for name in os.listdir(spec)]
    else:
        candidates = glob.glob(spec, recursive=True)
    paths = sorted(p for p in candidates if os.path.isfile(p) and p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"{spec}: no image file there (expected a file, a folder or a glob pattern of "
                                f"{', '.join(IMAGE_SUFFIXES)} files)")
    return paths


def image_size(path: str) -> tuple[int, int]:
    """(h, w) from the file's header (the pixels are not decoded). Raises OSError if unreadable."""
    with Image.open(path) as image:
        w, h = image.size
    return h, w


class ImageFilesSource(JsonSource):
    """Images read at random like a COCO-format folder's, with no annotations and no classes."""


def load_image_files(paths, data_config) -> ImageFilesSource:
    """The 'val' source of image files ``paths`` (image id = position in ``paths``) for one host.

    A file whose header cannot be read is left out and reported as unreadable; none readable is an
    error. ``data_config``: its eval sizes, buckets and tf.data settings are what ``eval_batches`` uses.
    """
    report = Report(f"{len(paths)} image files")
    rows, unreadable = [], []
    for image_id, path in enumerate(paths):
        try:
            h, w = image_size(path)
        except (OSError, ValueError) as error:
            unreadable.append(f"{path} ({error})")
            continue
        rows.append((image_id, path, path, h, w))
    report.add("unreadable_image", len(unreadable), unreadable)
    if not rows:
        raise FileNotFoundError(f"none of the {len(paths)} image files could be read, e.g. {unreadable[0]}")
    records = build_records(rows, [])
    info = DatasetInfo(num_classes=0, label_to_category_id=(), class_names=(), isthing=(), num_images=len(rows))
    targets = Targets(boxes=np.zeros((0, 4)), labels=np.zeros(0, np.int64), segment_ids=np.zeros(0, np.int64),
                      splits=np.zeros(len(rows) + 1, np.int64))
    return ImageFilesSource("", data_config=data_config, split="val", info=info, records=records, targets=targets,
                            report=report, process_index=0, process_count=1)
