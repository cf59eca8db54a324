"""COCO from TensorFlow Datasets (``coco/2017``, ``coco/2014``, ``coco/2017_panoptic``), with true
COCO category ids.

tfds stores a label 0..79, the index of the category in the annotation file's (id-sorted)
'categories'; ``COCO_CATEGORIES`` maps it back to the COCO category id (1..90), so that labels
(``label_mapping='category_id'``: label = id, 91 classes, as official DETR) and evaluation use the
true ids. Boxes are stored normalised; they are turned back into pixels with the image size read
from each JPEG header. Loading reads every record of the needed part once, without decoding images:
a host's slice for train, the whole split for val (so every host knows every host's eval batches).

``coco/2017_panoptic`` (features panoptic_image, panoptic_objects {id, area, bbox, is_crowd, label})
is read as official ``CocoPanoptic`` reads a COCO panoptic folder (see ``coco_panoptic``): its label
0..132 is mapped to the COCO panoptic category id (1..200, ``PANOPTIC_CATEGORIES``, panopticapi's
panoptic_coco_categories.json with isthing), so 'category_id' labels fit official DETR panoptic's
250 classes; each segment (crowd too) is a target, its box back in integer pixels; the PNG is
streamed with the image (``config.data.masks``) and read again for ``panoptic_ground_truth``.
"""
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from detr_jax.data.records import build_records, clean_targets, make_info
from detr_jax.data.report import Report
from detr_jax.data.source import Source, check_masks
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

# (COCO panoptic category id, name, isthing) of tfds coco/2017_panoptic labels 0..132
PANOPTIC_CATEGORIES = (
    (1, "person", True), (2, "bicycle", True), (3, "car", True), (4, "motorcycle", True), (5, "airplane", True),
    (6, "bus", True), (7, "train", True), (8, "truck", True), (9, "boat", True), (10, "traffic light", True),
    (11, "fire hydrant", True), (13, "stop sign", True), (14, "parking meter", True), (15, "bench", True),
    (16, "bird", True), (17, "cat", True), (18, "dog", True), (19, "horse", True), (20, "sheep", True),
    (21, "cow", True), (22, "elephant", True), (23, "bear", True), (24, "zebra", True), (25, "giraffe", True),
    (27, "backpack", True), (28, "umbrella", True), (31, "handbag", True), (32, "tie", True), (33, "suitcase", True),
    (34, "frisbee", True), (35, "skis", True), (36, "snowboard", True), (37, "sports ball", True), (38, "kite", True),
    (39, "baseball bat", True), (40, "baseball glove", True), (41, "skateboard", True), (42, "surfboard", True),
    (43, "tennis racket", True), (44, "bottle", True), (46, "wine glass", True), (47, "cup", True),
    (48, "fork", True), (49, "knife", True), (50, "spoon", True), (51, "bowl", True), (52, "banana", True),
    (53, "apple", True), (54, "sandwich", True), (55, "orange", True), (56, "broccoli", True), (57, "carrot", True),
    (58, "hot dog", True), (59, "pizza", True), (60, "donut", True), (61, "cake", True), (62, "chair", True),
    (63, "couch", True), (64, "potted plant", True), (65, "bed", True), (67, "dining table", True),
    (70, "toilet", True), (72, "tv", True), (73, "laptop", True), (74, "mouse", True), (75, "remote", True),
    (76, "keyboard", True), (77, "cell phone", True), (78, "microwave", True), (79, "oven", True),
    (80, "toaster", True), (81, "sink", True), (82, "refrigerator", True), (84, "book", True), (85, "clock", True),
    (86, "vase", True), (87, "scissors", True), (88, "teddy bear", True), (89, "hair drier", True),
    (90, "toothbrush", True), (92, "banner", False), (93, "blanket", False), (95, "bridge", False),
    (100, "cardboard", False), (107, "counter", False), (109, "curtain", False), (112, "door-stuff", False),
    (118, "floor-wood", False), (119, "flower", False), (122, "fruit", False), (125, "gravel", False),
    (128, "house", False), (130, "light", False), (133, "mirror-stuff", False), (138, "net", False),
    (141, "pillow", False), (144, "platform", False), (145, "playingfield", False), (147, "railroad", False),
    (148, "river", False), (149, "road", False), (151, "roof", False), (154, "sand", False), (155, "sea", False),
    (156, "shelf", False), (159, "snow", False), (161, "stairs", False), (166, "tent", False), (168, "towel", False),
    (171, "wall-brick", False), (175, "wall-stone", False), (176, "wall-tile", False), (177, "wall-wood", False),
    (178, "water-other", False), (180, "window-blind", False), (181, "window-other", False),
    (184, "tree-merged", False), (185, "fence-merged", False), (186, "ceiling-merged", False),
    (187, "sky-other-merged", False), (188, "cabinet-merged", False), (189, "table-merged", False),
    (190, "floor-other-merged", False), (191, "pavement-merged", False), (192, "mountain-merged", False),
    (193, "grass-merged", False), (194, "dirt-merged", False), (195, "paper-merged", False),
    (196, "food-other-merged", False), (197, "building-other-merged", False), (198, "rock-merged", False),
    (199, "wall-other-merged", False), (200, "rug-merged", False),
)


def is_panoptic(builder) -> bool:
    """The tfds dataset has panoptic annotations (coco/2017_panoptic) rather than boxes."""
    return "panoptic_objects" in builder.info.features


def _objects_key(builder) -> str:
    return "panoptic_objects" if is_panoptic(builder) else "objects"


def _categories(builder) -> tuple:
    return PANOPTIC_CATEGORIES if is_panoptic(builder) else COCO_CATEGORIES


def check_labels(builder) -> None:
    """The tfds label names must be COCO's (panoptic: COCO panoptic's); unnamed labels '0'..'K-1' are
    taken as that order."""
    names = list(builder.info.features[_objects_key(builder)]["label"].names)
    categories = _categories(builder)
    expected = [c[1] for c in categories]
    if names != expected and names != [str(i) for i in range(len(expected))]:
        raise DataError(f"tfds {builder.name}: its {len(names)} labels are not COCO's {len(categories)} "
                         f"{'panoptic ' if is_panoptic(builder) else ''}categories (first ones: {names[:5]}); use "
                         "data_config.source='coco_json' or 'coco_panoptic' for other datasets")


def _image_size(example):
    encoded = example["image"]
    shape = tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                    lambda: tf.shape(decode_rgb(encoded))[:2])
    return {**example, "size": shape}


def _no_size(example):
    return {**example, "size": tf.zeros([2], tf.int32)}


def _records_dataset(builder, split: str, lo: int, hi: int) -> tf.data.Dataset:
    """Records lo..hi-1 of a split, in canonical (file) order, images (and panoptic PNGs) not decoded."""
    skip = ("image", "panoptic_image") if is_panoptic(builder) else ("image",)
    return builder.as_dataset(split=f"{split}[{lo}:{hi}]", decoders={k: tfds.decode.SkipDecoding() for k in skip},
                              shuffle_files=False)


def read_records(builder, split: str, lo: int, hi: int):
    """Records lo..hi-1 of a tfds COCO split -> Records (file names as stored, path '').

    Panoptic: ann_id is the segment's position in the split (1, 2, ...), segment_id its PNG id, and
    boxes are rounded to the integer pixels COCO panoptic annotates."""
    key, categories, panoptic = _objects_key(builder), _categories(builder), is_panoptic(builder)
    meta = (_records_dataset(builder, split, lo, hi)
            .interleave(safely(_image_size, _no_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .map(lambda ex: {"id": ex["image/id"], "file_name": ex["image/filename"], "size": ex["size"],
                             "objects": ex[key]}))
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
        boxes = np.stack([xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h], 1)
        for k, box in enumerate(np.round(boxes) if panoptic else boxes):
            ann_id = len(annotations) + 1 if panoptic else int(obj["id"][k])
            annotations.append((row, ann_id, tuple(box), categories[int(obj["label"][k])][0], bool(obj["is_crowd"][k]),
                                float(obj["area"][k]), int(obj["id"][k]) if panoptic else 0))
    return build_records(images, annotations)


def _merge_window(rows, images):
    """A window of plan rows (canonical order) with its images (and panoptic PNGs) -> the window in
    stream order."""
    tf.debugging.assert_equal(rows["image_id"], images["image/id"],
                              message="tfds records arrived in another order than when the dataset was loaded")
    rows = {**rows, "encoded": images["image"]}
    if "panoptic_image" in images:
        rows["panoptic_encoded"] = images["panoptic_image"]
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
        fields = ("image", "image/id", "panoptic_image") if self.data_config.masks else ("image", "image/id")
        images = _records_dataset(self.builder, self.tfds_split, lo, hi).map(
            lambda ex: {k: ex[k] for k in fields}).batch(chunk)
        if train:
            images = images.repeat()
        return tf.data.Dataset.zip(rows, images).map(_merge_window).unbatch()

    def panoptic_png(self, row):
        """Reads record ``row`` of the split again (tfds reads sequentially: a slice of one record)."""
        if not self.panoptic:
            return super().panoptic_png(row)
        record = _records_dataset(self.builder, self.tfds_split, row, row + 1).map(lambda ex: ex["panoptic_image"])
        return next(iter(record)).numpy()


def load(data_config, split: str, process_index: int, process_count: int) -> TfdsSource:
    """The TfdsSource of a split, every record read (without decoding) into records."""
    builder = tfds.builder(data_config.tfds_name, data_dir=data_config.tfds_data_dir or None)
    tfds_split = data_config.tfds_train_split if split == "train" else data_config.tfds_val_split
    if tfds_split not in builder.info.splits:
        raise DataError(f"tfds {data_config.tfds_name} in {builder.data_dir} has no split {tfds_split!r} (prepared: "
                         f"{sorted(builder.info.splits) or 'none'}); prepare it with `tfds build "
                         f"{data_config.tfds_name}` or set data_config.tfds_data_dir")
    check_labels(builder)
    check_masks(data_config, is_panoptic(builder), f"tfds {data_config.tfds_name}")
    n = builder.info.splits[tfds_split].num_examples
    bounds = [(q * n // process_count, (q + 1) * n // process_count) for q in range(process_count)]
    report = Report(f"{split} split of tfds {data_config.tfds_name}")
    records = read_records(builder, tfds_split, 0, n)
    panoptic = is_panoptic(builder)
    info = make_info(_categories(builder), data_config.label_mapping, n)
    targets = clean_targets(records, info, data_config.max_boxes, data_config.max_boxes_policy, report,
                            panoptic=panoptic)
    return TfdsSource(builder, tfds_split, bounds, data_config=data_config, split=split, info=info,
                      records=records, targets=targets, report=report, process_index=process_index,
                      process_count=process_count, panoptic=panoptic)
