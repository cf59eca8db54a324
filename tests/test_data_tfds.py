"""The tfds COCO path, on ``tfds.testing.mock_data`` with COCO-shaped examples."""
import os
import re
import tempfile
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.config import data_config
from detr_jax.data import bucket_list, eval_batches, load_dataset, train_batches
from detr_jax.data.tfds_coco import COCO_CATEGORIES, check_labels
from test_data_pipeline import SMALL, assert_same_batches, check_batch, take

NUM = {"train": 14, "validation": 9}


def make_examples(split):
    """COCO-shaped tfds examples: JPEG bytes, ids, normalised (ymin, xmin, ymax, xmax) boxes."""
    examples = []
    for i in range(NUM[split]):
        rng = np.random.default_rng([len(split), i])
        h, w = (int(v) for v in rng.integers(40, 120, 2))
        k = i % 4
        y0, x0 = rng.uniform(0, 0.5, k), rng.uniform(0, 0.5, k)
        boxes = np.stack([y0, x0, y0 + rng.uniform(0.1, 0.5, k), x0 + rng.uniform(0.1, 0.5, k)], 1)
        examples.append({
            "image": tf.io.encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).numpy(),
            "image/filename": f"{split}_{i:06d}.jpg", "image/id": 1000 * len(split) + i,
            "objects": {"id": np.arange(k, dtype=np.int64) + 100 * i, "area": np.full(k, 77, np.int64),
                        "bbox": boxes.astype(np.float32).reshape(-1, 4),
                        "label": (np.arange(k, dtype=np.int64) * 11 + i) % 80, "is_crowd": np.arange(k) == 2}})
    return examples


EXAMPLES = {split: make_examples(split) for split in NUM}
SIGNATURE = {"image": tf.TensorSpec([], tf.string), "image/filename": tf.TensorSpec([], tf.string),
             "image/id": tf.TensorSpec([], tf.int64),
             "objects": {"id": tf.TensorSpec([None], tf.int64), "area": tf.TensorSpec([None], tf.int64),
                         "bbox": tf.TensorSpec([None, 4], tf.float32), "label": tf.TensorSpec([None], tf.int64),
                         "is_crowd": tf.TensorSpec([None], tf.bool)}}


def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Stands in for tfds's reader: 'name[lo:hi]' slices; images decoded unless SkipDecoding."""
    name, lo, hi = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", split).groups()
    chosen = EXAMPLES[name][int(lo):int(hi)]
    ds = tf.data.Dataset.from_generator(lambda: iter(chosen), output_signature=SIGNATURE)
    if decoders and isinstance(decoders.get("image"), tfds.decode.SkipDecoding):
        return ds
    return ds.map(lambda ex: {**ex, "image": tf.io.decode_jpeg(ex["image"])})


@pytest.fixture(scope="module", autouse=True)
def mocked_coco(tmp_path_factory):
    """coco/2017 metadata (splits, COCO label names) in a folder, examples from ``as_dataset``."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    # tfds makes a temporary folder while it looks for published metadata: keep it under pytest's
    with pytest.MonkeyPatch.context() as patch, tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
        patch.setattr(tempfile, "tempdir", data_dir)
        builder = tfds.builder("coco/2017")
        builder.info.set_splits(tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in NUM.items()]))
        builder.info.features["objects"]["label"].names = [name for _, name in COCO_CATEGORIES]
        folder = os.path.join(data_dir, "coco", "2017", str(builder.info.version))
        os.makedirs(folder)
        builder.info.write_to_directory(folder)
    with tfds.testing.mock_data(data_dir=data_dir, as_dataset_fn=as_dataset):
        yield


def tfds_config(**overrides):
    return data_config(source="tfds", **{**SMALL, "shuffle_window": 5, **overrides})


def by_id(batches):
    return {int(b["image_id"][i]): {k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["image_id"]))
            if b["example_valid"][i]}


def test_eval_batches_with_coco_category_ids():
    cfg = tfds_config()
    batches = eval_batches(cfg, 4, process_index=0, process_count=1)
    seen = list(batches)
    assert len(seen) == batches.num_batches and batches.info.num_classes == 91
    for batch in seen:
        check_batch(batch, 4, cfg.max_boxes, bucket_list(cfg))
    examples = by_id(seen)
    assert sorted(examples) == [ex["image/id"] for ex in EXAMPLES["validation"]]
    for ex in EXAMPLES["validation"]:
        got = examples[ex["image/id"]]
        h, w = tf.image.extract_jpeg_shape(ex["image"]).numpy()[:2]
        assert got["orig_size"].tolist() == [h, w]
        keep = ~ex["objects"]["is_crowd"]
        ymin, xmin, ymax, xmax = ex["objects"]["bbox"][keep].T
        valid = got["box_valid"]
        np.testing.assert_allclose(got["boxes"][valid], np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin,
                                                                  ymax - ymin], 1), atol=1e-5)
        expected = [COCO_CATEGORIES[label][0] for label in ex["objects"]["label"][keep]]
        assert got["labels"][valid].tolist() == expected
    assert COCO_CATEGORIES[11] == (13, "stop sign") and COCO_CATEGORIES[79] == (90, "toothbrush")


def test_contiguous_labels_are_the_tfds_labels():
    batches = eval_batches(tfds_config(label_mapping="contiguous"), 4, process_index=0, process_count=1)
    examples = by_id(batches)
    assert batches.info.num_classes == 80 and batches.info.class_names[0] == "person"
    for ex in EXAMPLES["validation"]:
        got = examples[ex["image/id"]]
        labels = got["labels"][got["box_valid"]]
        assert labels.tolist() == ex["objects"]["label"][~ex["objects"]["is_crowd"]].tolist()
        assert batches.info.category_ids(labels).tolist() == [COCO_CATEGORIES[l][0] for l in labels]


def test_ground_truth_from_tfds_records():
    source = load_dataset(tfds_config(), "val", process_index=0, process_count=1)
    gt = source.ground_truth()
    assert len(gt["images"]) == 9 and len(gt["categories"]) == 80 and gt["categories"][-1] == {"id": 90,
                                                                                                "name": "toothbrush"}
    ex = EXAMPLES["validation"][3]  # 3 objects, the last one crowd
    h, w = tf.image.extract_jpeg_shape(ex["image"]).numpy()[:2]
    anns = [a for a in gt["annotations"] if a["image_id"] == ex["image/id"]]
    ymin, xmin, ymax, xmax = ex["objects"]["bbox"][0]
    np.testing.assert_allclose(anns[0]["bbox"], [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h], rtol=1e-5)
    assert [a["iscrowd"] for a in anns] == [0, 0, 1] and anns[1]["category_id"] == COCO_CATEGORIES[14][0]
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    detections = [{**a, "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
    evaluator = COCOeval(coco, coco.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")}
                                             for d in detections]), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_eval_shards_are_disjoint_and_complete():
    cfg, hosts = tfds_config(), 2
    ids, counts = [], []
    for p in range(hosts):
        batches = eval_batches(cfg, 2, process_index=p, process_count=hosts)
        seen = list(batches)
        counts.append(len(seen))
        ids += [int(i) for b in seen for i in b["image_id"][b["example_valid"]]]
    assert counts[0] == counts[1] and sorted(ids) == [ex["image/id"] for ex in EXAMPLES["validation"]]


def test_train_shards_and_window_shuffle():
    """Every host reads the whole split in windows shuffled per epoch and takes its share of each
    global batch: the same shapes at every step, disjoint images, the batches of a single host."""
    cfg, hosts = tfds_config(buckets=((96, 160), (160, 96))), 2
    all_ids = [ex["image/id"] for ex in EXAMPLES["train"]]
    single = load_dataset(cfg, "train", process_index=0, process_count=1)
    reference = take(train_batches(cfg, 4, seed=0, process_index=0, process_count=1, source=single), 5)
    assert len({b["image"].shape for b in reference}) == 2  # both buckets, across an epoch boundary
    per_host = []
    for p in range(hosts):
        source = load_dataset(cfg, "train", process_index=p, process_count=hosts)
        order = source.train_order(0, 0)
        assert sorted(order) == list(range(14))  # the whole split, every image once
        assert sorted(order[:5]) == list(range(5))  # shuffled within windows of shuffle_window = 5
        assert list(source.records.image_id) == all_ids
        batches = train_batches(cfg, 4, seed=0, process_index=p, process_count=hosts, source=source)
        per_host.append(take(batches, 5))
    for step, (a, b) in enumerate(zip(*per_host)):
        check_batch(a, 2, cfg.max_boxes, bucket_list(cfg))
        assert a["image"].shape == b["image"].shape  # one program on every host
        assert not set(a["image_id"]) & set(b["image_id"])
        for key in reference[step]:  # host 0 then host 1: the single host's global batch
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), reference[step][key], err_msg=key)


def test_resume_gives_the_same_batches():
    cfg = tfds_config()
    source = load_dataset(cfg, "train", process_index=0, process_count=1)
    full = train_batches(cfg, 2, seed=3, process_index=0, process_count=1, source=source)
    steps = full.num_batches
    reference = take(full, 2 * steps + 2)
    resumed = take(train_batches(cfg, 2, seed=3, start_step=steps + 1, process_index=0, process_count=1,
                                 source=source), steps + 1)
    assert_same_batches(reference[steps + 1:], resumed)


def test_label_names_must_be_coco():
    def builder(names):
        label = types.SimpleNamespace(names=names)
        return types.SimpleNamespace(name="other", info=types.SimpleNamespace(features={"objects": {"label": label}}))

    check_labels(builder([name for _, name in COCO_CATEGORIES]))
    check_labels(builder([str(i) for i in range(80)]))
    with pytest.raises(ValueError, match="not COCO's 80 categories"):
        check_labels(builder(["cat", "dog"]))


def test_unknown_split():
    with pytest.raises(ValueError, match="has no split 'test2015'"):
        load_dataset(tfds_config(tfds_val_split="test2015"), "val", process_index=0, process_count=1)
