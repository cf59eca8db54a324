"""COCO-format folders: an ``instances_*.json`` and a folder of images, any number of categories.

Used for the official COCO layout (``DATA_DIR/annotations/instances_train2017.json``,
``DATA_DIR/train2017/``), any custom dataset (paths set in the data config) and the synthetic
dataset. Every field is checked: a file that is not COCO raises a ValueError naming the file and the
field; a missing image file is left out (counted and named in the report). The folder layouts
(``LAYOUTS``), the field checks (``Checker``) and ``JsonSource`` also serve COCO panoptic folders
(``coco_panoptic``).
"""
import json
import os

import numpy as np
import tensorflow as tf

from detr_jax.data.records import Records, build_records, clean_targets, make_info
from detr_jax.data.report import Report
from detr_jax.data.source import Source, check_masks
from detr_jax.errors import ConfigError, DataError

# layout -> split -> {config field (data_config.SPLIT_FIELD): its default under data_dir}
LAYOUTS = {
    "coco_json": {"train": {"annotations": "annotations/instances_train2017.json", "images": "train2017"},
                  "val": {"annotations": "annotations/instances_val2017.json", "images": "val2017"}},
    "synthetic": {"train": {"annotations": "annotations/instances_train.json", "images": "train"},
                  "val": {"annotations": "annotations/instances_val.json", "images": "val"}},
    "coco_panoptic": {split: {"panoptic_annotations": f"annotations/panoptic_{split}2017.json",
                              "panoptic_masks": f"panoptic_{split}2017", "images": f"{split}2017"}
                      for split in ("train", "val")},
    "synthetic_panoptic": {split: {"panoptic_annotations": f"annotations/panoptic_{split}.json",
                                   "panoptic_masks": f"panoptic_{split}", "images": split}
                           for split in ("train", "val")},
}


def layout_paths(data_config, split: str, layout: str) -> dict:
    """{field: path} of a split's files in ``LAYOUTS[layout]``: the explicit config fields
    (data_config.SPLIT_FIELD), else the layout's defaults under data_dir (synthetic: its folder).
    With ``eval_split = "train"`` the val split reads the train files (evaluation on the training
    images, e.g. to check that a model can fit them)."""
    from detr_jax.data.synthetic import default_dir

    split = data_config.eval_split if split == "val" else split
    defaults = LAYOUTS[layout][split]
    explicit = {field: data_config[f"{split}_{field}"] for field in defaults}
    root = default_dir(data_config) if data_config.source == "synthetic" else data_config.data_dir
    if not all(explicit.values()) and not root:
        raise ConfigError(f"data_config.source = {data_config.source!r} needs data_config.data_dir (a folder with the "
                         f"{layout} layout: {', '.join(defaults.values())}) or all of "
                         + ", ".join(f"data_config.{split}_{field}" for field in defaults))
    return {field: explicit[field] or os.path.join(root, default) for field, default in defaults.items()}


def split_paths(data_config, split: str) -> tuple[str, str]:
    """(instances annotation file, image folder) of a split (``layout_paths``)."""
    paths = layout_paths(data_config, split, data_config.source)
    return paths["annotations"], paths["images"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field kind -> (accepts the value, what was expected)
FIELD_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bbox": (lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
             "[x, y, width, height] (4 numbers)"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


class Checker:
    """Reads typed fields of the entries of one annotation file; errors name the file and field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str):
        raise DataError(f"{self.path}: not a valid COCO annotation file: {where} {problem}")

    def field(self, entry, name: str, where: str, kind: str, default=None):
        """entry[name] as a FIELD_KINDS kind; ``default`` makes it optional."""
        if not isinstance(entry, dict):
            self.fail(where, f"is {type(entry).__name__} {entry!r:.60}, expected an object")
        if name not in entry:
            if default is None:
                self.fail(where, f"has no field '{name}'")
            return default
        value = entry[name]
        accepts, expected = FIELD_KINDS[kind]
        if not accepts(value):
            self.fail(f"{where}.{name}", f"= {value!r:.60}: expected {expected}")
        return value

    def top_level(self, data) -> tuple[list, list, list]:
        if not isinstance(data, dict):
            self.fail("the top level", f"is a {type(data).__name__}, expected an object with 'images', "
                      "'annotations' and 'categories'")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                self.fail("the top level", f"has no field '{key}'")
            if not isinstance(data[key], list):
                self.fail(f"field '{key}'", f"is a {type(data[key]).__name__}, expected a list")
        return data["images"], data["annotations"], data["categories"]

    def categories(self, categories, *fields) -> dict:
        """'categories' -> {id: (name, *fields)}; fields: names of further integer fields (e.g. isthing)."""
        cats = {}
        for k, c in enumerate(categories):
            cid = self.field(c, "id", f"categories[{k}]", "int")
            if cid in cats:
                self.fail(f"categories[{k}].id", f"= {cid} repeats an earlier category id")
            cats[cid] = tuple(self.field(c, name, f"categories[{k}]", kind)
                              for name, kind in (("name", "str"), *((f, "int") for f in fields)))
        return cats

    def images(self, images, image_dir: str) -> tuple[list, dict]:
        """'images' -> (rows (image_id, file_name, path, h, w) for ``build_records``, {image id: row})."""
        rows, image_rows = [], {}
        for k, im in enumerate(images):
            where = f"images[{k}]"
            iid = self.field(im, "id", where, "int")
            if iid in image_rows:
                self.fail(f"{where}.id", f"= {iid} repeats an earlier image id")
            name = self.field(im, "file_name", where, "str")
            h, w = self.field(im, "height", where, "int"), self.field(im, "width", where, "int")
            if h <= 0 or w <= 0:
                self.fail(where, f"has height {h} and width {w}: expected positive sizes")
            image_rows[iid] = len(rows)
            rows.append((iid, name, os.path.join(image_dir, name), h, w))
        return rows, image_rows


def load_json(path: str):
    """The parsed json file at path; FileNotFoundError / DataError naming it."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: annotation file not found")
    with tf.io.gfile.GFile(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid COCO annotation file: not JSON ({e})") from None


def unknown_categories(path: str, unknown: list, known, policy: str, report: Report) -> None:
    """Annotations whose category is not in 'categories' (unknown: descriptions): an error naming
    the first (policy 'error'), else counted as left out."""
    if unknown and policy == "error":
        raise DataError(f"{path}: {len(unknown)} annotations have a category id not in 'categories' "
                         f"(ids {sorted(known)}), e.g. {unknown[0]}; set data_config.unknown_category='skip' "
                         "to leave them out")
    report.add("unknown_category", len(unknown), unknown[:5])


def read_instances(path: str, image_dir: str, unknown_category: str, report: Report):
    """An instances json -> (Records of every image listed, categories [(id, name)]).

    Annotations whose category id is not in 'categories': an error naming the file and annotation id
    (``unknown_category='error'``) or left out and counted (``'skip'``).
    """
    check = Checker(path)
    images, annotations, categories = check.top_level(load_json(path))
    cats = check.categories(categories)
    rows, image_rows = check.images(images, image_dir)

    anns, unknown = [], []
    for k, a in enumerate(annotations):
        aid = check.field(a, "id", f"annotations[{k}]", "int")
        where = f"annotations[{k}] (id {aid})"
        iid = check.field(a, "image_id", where, "int")
        if iid not in image_rows:
            check.fail(f"{where}.image_id", f"= {iid}: no image has this id")
        cid = check.field(a, "category_id", where, "int")
        box = check.field(a, "bbox", where, "bbox")
        crowd = check.field(a, "iscrowd", where, "int", default=0)
        area = check.field(a, "area", where, "number", default=box[2] * box[3])
        if cid not in cats:
            unknown.append(f"{rows[image_rows[iid]][1]} (image id {iid}) annotation id {aid}: category_id {cid}")
            continue
        anns.append((image_rows[iid], aid, box, cid, bool(crowd), area))
    unknown_categories(path, unknown, cats, unknown_category, report)
    return build_records(rows, anns), sorted((cid, name) for cid, (name,) in cats.items())


def present_files(paths) -> np.ndarray:
    """paths [N] str -> [N] bool: the file exists (one listing per folder, so it is fast on remote storage)."""
    listings = {}
    present = np.zeros(len(paths), bool)
    for i, path in enumerate(paths):
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(tf.io.gfile.listdir(folder)) if tf.io.gfile.isdir(folder) else set()
        present[i] = name in listings[folder]
    return present


def present_images(records: Records, image_dir: str, annotation_file: str, split: str, report: Report) -> Records:
    """The records of the images whose file exists; the missing ones counted, none there an error."""
    present = present_files(records.path)
    if len(records) and not present.any():
        raise FileNotFoundError(f"{image_dir}: none of the {len(records)} images listed in {annotation_file} is "
                                f"there (e.g. {records.file_name[0]}); check the image folder of the {split} split")
    report.add("missing_image", int((~present).sum()), list(records.path[~present][:5]))
    return records.select_images(present)


class JsonSource(Source):
    """A COCO-format folder; random access: an epoch is a permutation of the split."""

    def __init__(self, annotation_file: str, **kwargs):
        super().__init__(**kwargs)
        self.annotation_file = annotation_file

    def train_order(self, seed, epoch):
        return np.argsort(self.shuffle_keys(seed, epoch), kind="stable")

    def eval_order(self, process_index):
        return np.arange(len(self.records))[process_index::self.process_count]

    def attach_images(self, rows, train, chunk):
        return rows.unbatch()


def load(data_config, split: str, process_index: int, process_count: int) -> JsonSource:
    """The JsonSource of a split (see ``split_paths`` for where it is read from)."""
    annotation_file, image_dir = split_paths(data_config, split)
    check_masks(data_config, False, annotation_file)
    report = Report(f"{split} split of {annotation_file}")
    records, categories = read_instances(annotation_file, image_dir, data_config.unknown_category, report)
    records = present_images(records, image_dir, annotation_file, split, report)
    info = make_info(categories, data_config.label_mapping, len(records))
    targets = clean_targets(records, info, data_config.max_boxes, data_config.max_boxes_policy, report)
    return JsonSource(annotation_file, data_config=data_config, split=split, info=info, records=records,
                      targets=targets, report=report, process_index=process_index, process_count=process_count)
