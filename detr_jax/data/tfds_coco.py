"""COCO from TensorFlow Datasets (``coco/2017``, ``coco/2014``), with true COCO category ids.

tfds stores a label 0..79, the index of the category in the annotation file's (id-sorted)
'categories'; ``COCO_CATEGORIES`` maps it back to the COCO category id (1..90), so that labels
(``label_mapping='category_id'``: label = id, 91 classes, as official DETR) and evaluation use the
true ids. Boxes are stored normalised; they are turned back into pixels with the image size read
from each JPEG header. Loading reads every record of the needed part once, without decoding images:
a host's slice for train, the whole split for val (so every host knows every host's eval batches).
"""
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from detr_jax.data.records import build_records, clean_targets, make_info
from detr_jax.data.report import Report
from detr_jax.data.source import Source
from detr_jax.data.transforms import decode_rgb, safely
from detr_jax.errors import DataError

# (COCO category id, name) of tfds labels 0..79
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)


def check_labels(builder) -> None:
    """The tfds label names must be COCO's (unnamed labels '0'..'79' are taken as COCO's order)."""
    names = list(builder.info.features["objects"]["label"].names)
    expected = [name for _, name in COCO_CATEGORIES]
    if names != expected and names != [str(i) for i in range(len(expected))]:
        raise DataError(f"tfds {builder.name}: its {len(names)} labels are not COCO's 80 categories "
                         f"(first ones: {names[:5]}); use data_config.source='coco_json' for other datasets")


def _image_size(example):
    encoded = example["image"]
    shape = tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                    lambda: tf.shape(decode_rgb(encoded))[:2])
    return {**example, "size": shape}


def _no_size(example):
    return {**example, "size": tf.zeros([2], tf.int32)}


def _records_dataset(builder, split: str, lo: int, hi: int) -> tf.data.Dataset:
    """Records lo..hi-1 of a split, in canonical (file) order, images not decoded."""
    return builder.as_dataset(split=f"{split}[{lo}:{hi}]", decoders={"image": tfds.decode.SkipDecoding()},
                              shuffle_files=False)


def read_records(builder, split: str, lo: int, hi: int):
    """Records lo..hi-1 of a tfds COCO split -> Records (file names as stored, path '')."""
    meta = (_records_dataset(builder, split, lo, hi)
            .interleave(safely(_image_size, _no_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .map(lambda ex: {"id": ex["image/id"], "file_name": ex["image/filename"], "size": ex["size"],
                             "objects": ex["objects"]}))
    images, annotations = [], []
    for row, ex in enumerate(meta.as_numpy_iterator()):
        h, w = (int(v) for v in ex["size"])
        name = ex["file_name"].decode()
        if h <= 0 or w <= 0:
            raise DataError(f"tfds {builder.name} {split}[{lo + row}] ({name}, image id {ex['id']}): the image "
                             "cannot be read; the prepared dataset is damaged (prepare it again)")
        images.append((int(ex["id"]), name, "", h, w))
        obj = ex["objects"]
        ymin, xmin, ymax, xmax = np.asarray(obj["bbox"], np.float64).reshape(-1, 4).T
        for k in range(len(obj["id"])):
            box = (xmin[k] * w, ymin[k] * h, (xmax[k] - xmin[k]) * w, (ymax[k] - ymin[k]) * h)
            annotations.append((row, int(obj["id"][k]), box, COCO_CATEGORIES[int(obj["label"][k])][0],
                                bool(obj["is_crowd"][k]), float(obj["area"][k])))
    return build_records(images, annotations)


def _merge_window(rows, images):
    """A window of plan rows (canonical order) with its images -> the window in stream order."""
    tf.debugging.assert_equal(rows["image_id"], images["image/id"],
                              message="tfds records arrived in another order than when the dataset was loaded")
    rows = {**rows, "encoded": images["image"]}
    order = tf.argsort(rows["rank"], stable=True)
    return {k: tf.gather(v, order) for k, v in rows.items()}


class TfdsSource(Source):
    """tfds COCO; sequential: a train epoch is the split in file order, shuffled within windows of
    ``shuffle_window`` consecutive images, read whole by every host; host p evaluates the contiguous
    slice bounds[p]."""
    sequential = True

    def __init__(self, builder, tfds_split: str, bounds, **kwargs):
        super().__init__(**kwargs)
        self.builder, self.tfds_split, self.bounds = builder, tfds_split, bounds

    def train_order(self, seed, epoch):
        window = np.arange(len(self.records)) // self.data_config.shuffle_window
        return np.lexsort((self.shuffle_keys(seed, epoch), window))

    def eval_order(self, process_index):
        return np.arange(*self.bounds[process_index])

    def attach_images(self, rows, train, chunk):
        lo, hi = (0, len(self.records)) if train else self.bounds[self.process_index]
        images = _records_dataset(self.builder, self.tfds_split, lo, hi).map(
            lambda ex: {"image": ex["image"], "image/id": ex["image/id"]}).batch(chunk)
        if train:
            images = images.repeat()
        return tf.data.Dataset.zip(rows, images).map(_merge_window).unbatch()


def load(data_config, split: str, process_index: int, process_count: int) -> TfdsSource:
    """The TfdsSource of a split, every record read (without decoding) into records."""
    builder = tfds.builder(data_config.tfds_name, data_dir=data_config.tfds_data_dir or None)
    tfds_split = data_config.tfds_train_split if split == "train" else data_config.tfds_val_split
    if tfds_split not in builder.info.splits:
        raise DataError(f"tfds {data_config.tfds_name} in {builder.data_dir} has no split {tfds_split!r} (prepared: "
                         f"{sorted(builder.info.splits) or 'none'}); prepare it with `tfds build "
                         f"{data_config.tfds_name}` or set data_config.tfds_data_dir")
    check_labels(builder)
    n = builder.info.splits[tfds_split].num_examples
    bounds = [(q * n // process_count, (q + 1) * n // process_count) for q in range(process_count)]
    report = Report(f"{split} split of tfds {data_config.tfds_name}")
    records = read_records(builder, tfds_split, 0, n)
    info = make_info(COCO_CATEGORIES, data_config.label_mapping, n)
    targets = clean_targets(records, info, data_config.max_boxes, data_config.max_boxes_policy, report)
    return TfdsSource(builder, tfds_split, bounds, data_config=data_config, split=split, info=info,
                      records=records, targets=targets, report=report, process_index=process_index,
                      process_count=process_count)
