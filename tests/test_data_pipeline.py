"""Train and eval batches on the synthetic dataset: format, buckets, invariance, sharding, resume."""
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.config import data_config
from detr_jax.data import bucket_list, eval_batches, load_dataset, steps_per_epoch, train_batches
from detr_jax.data.synthetic import Spec, generate
from detr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_jax.errors import ConfigError
from detr_jax.validation import validate

SMALL = dict(train_scales=(64, 80, 96), train_max_size=160, crop_resize_scales=(64, 80), crop_min_size=48,
             crop_max_size=80, eval_size=96, eval_max_size=160, max_boxes=12)


def folder_config(root, **overrides):
    paths = {f"{s}_{k}": os.path.join(root, "annotations", f"instances_{s}.json") if k == "annotations"
             else os.path.join(root, s) for s in ("train", "val") for k in ("annotations", "images")}
    return data_config(source="coco_json", **paths, **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("pipeline") / "shapes"),
                    Spec(num_train=36, num_val=11, seed=3, min_size=48, max_size=128))


@pytest.fixture(scope="module")
def cfg(shapes):
    return folder_config(shapes)


@pytest.fixture(scope="module")
def train_source(cfg):
    return load_dataset(cfg, "train", process_index=0, process_count=1)


def take(batches, n):
    return list(itertools.islice(batches, n))


def assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def check_batch(batch, batch_size, max_boxes, buckets):
    b, h, w, _ = batch["image"].shape
    assert b == batch_size and (h, w) in {tuple(x) for x in buckets.tolist()}
    expected = {"image": ((b, h, w, 3), np.float32), "padding_mask": ((b, h, w), np.bool_),
                "boxes": ((b, max_boxes, 4), np.float32), "labels": ((b, max_boxes), np.int32),
                "box_valid": ((b, max_boxes), np.bool_), "image_id": ((b,), np.int64),
                "orig_size": ((b, 2), np.int32), "size": ((b, 2), np.int32), "example_valid": ((b,), np.bool_)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for i in range(b):
        sh, sw = batch["size"][i]
        mask = batch["padding_mask"][i]
        if batch["example_valid"][i]:
            assert 0 < sh <= h and 0 < sw <= w
            assert not mask[:sh, :sw].any() and mask[sh:].all() and mask[:, sw:].all()
        else:
            assert mask.all() and not batch["box_valid"][i].any() and batch["image_id"][i] == -1
        assert not batch["image"][i][mask].any()
        valid = batch["box_valid"][i]
        boxes = batch["boxes"][i]
        assert not boxes[~valid].any() and not batch["labels"][i][~valid].any()
        x1, y1 = boxes[valid, 0] - boxes[valid, 2] / 2, boxes[valid, 1] - boxes[valid, 3] / 2
        x2, y2 = boxes[valid, 0] + boxes[valid, 2] / 2, boxes[valid, 1] + boxes[valid, 3] / 2
        assert (boxes[valid, 2:] > 0).all()
        for v in (x1, y1, x2, y2):
            assert (v >= -1e-6).all() and (v <= 1 + 1e-6).all()


def test_train_batches_format(cfg, train_source):
    batches = train_batches(cfg, 3, seed=0, process_index=0, process_count=1, source=train_source)
    buckets = bucket_list(cfg)
    steps = batches.num_batches
    assert steps == -(-(36 - len(buckets) * 2) // 3)  # ceil: the fewest full batches any order gives
    seen = take(batches, 2 * steps)
    for batch in seen:
        check_batch(batch, 3, cfg.max_boxes, buckets)
        assert batch["example_valid"].all()
        assert set(batch["labels"][batch["box_valid"]]) <= {1, 2, 3, 4, 5}
    # at most one program per bucket, over two epochs
    assert len({b["image"].shape for b in seen}) <= len(buckets)
    # an epoch never repeats an image
    for epoch in (seen[:steps], seen[steps:]):
        ids = np.concatenate([b["image_id"] for b in epoch])
        assert len(set(ids)) == len(ids) == 3 * steps
    # augmentation changes between epochs (flip, scale or crop)
    assert any(not np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(seen[:steps], seen[steps:]))
    # the images of partly filled bucket batches wait for the next epoch, and are counted
    assert f"epoch 0: {36 - 3 * steps} images" in batches.report.examples["epoch_leftover"]


def test_eval_batches_format_and_completeness(cfg):
    batches = eval_batches(cfg, 4, process_index=0, process_count=1)
    seen = list(batches)
    assert len(seen) == batches.num_batches
    for batch in seen:
        check_batch(batch, 4, cfg.max_boxes, bucket_list(cfg))
    ids = np.concatenate([b["image_id"][b["example_valid"]] for b in seen])
    assert sorted(ids) == list(range(1, 12))
    # eval sizes are the official resize of the annotated size; no augmentation
    with open(cfg.val_annotations) as f:
        annotated = {im["id"]: (im["height"], im["width"]) for im in json.load(f)["images"]}
    for batch in seen:
        for i in np.flatnonzero(batch["example_valid"]):
            h, w = annotated[batch["image_id"][i]]
            assert tuple(batch["orig_size"][i]) == (h, w)
            short = 96 if max(h, w) / min(h, w) * 96 <= 160 else round(160 * min(h, w) / max(h, w))
            assert min(batch["size"][i]) == short


def test_eval_targets_match_annotations(cfg):
    """Eval has no flip or crop: boxes are the annotations (non-crowd), normalised by the image size."""
    coco = COCO(cfg.val_annotations)
    for batch in eval_batches(cfg, 4, process_index=0, process_count=1):
        for i in np.flatnonzero(batch["example_valid"]):
            image_id = int(batch["image_id"][i])
            h, w = batch["orig_size"][i]
            expected = np.array([a["bbox"] for a in coco.imgToAnns[image_id]], np.float64).reshape(-1, 4)
            expected = np.stack([(expected[:, 0] + expected[:, 2] / 2) / w, (expected[:, 1] + expected[:, 3] / 2) / h,
                                 expected[:, 2] / w, expected[:, 3] / h], 1)
            valid = batch["box_valid"][i]
            np.testing.assert_allclose(batch["boxes"][i][valid], expected, atol=1e-5)
            assert batch["labels"][i][valid].tolist() == [a["category_id"] for a in coco.imgToAnns[image_id]]


def test_padded_image_does_not_depend_on_its_batch(cfg):
    by_batch_size = []
    for batch_size in (2, 3):
        examples = {}
        for batch in eval_batches(cfg, batch_size, process_index=0, process_count=1):
            for i in np.flatnonzero(batch["example_valid"]):
                examples[int(batch["image_id"][i])] = {k: v[i] for k, v in batch.items()}
        by_batch_size.append(examples)
    assert by_batch_size[0].keys() == by_batch_size[1].keys()
    ids = sorted(by_batch_size[0])
    assert_same_batches([by_batch_size[0][i] for i in ids], [by_batch_size[1][i] for i in ids])


def test_train_augmentation_does_not_depend_on_batching(cfg, train_source):
    """Same seed and epoch: an image gets the same transform and padded tensor whatever the batch size."""
    first_epoch = []
    for batch_size in (2, 3):
        batches = train_batches(cfg, batch_size, seed=1, process_index=0, process_count=1, source=train_source)
        first_epoch.append({int(b["image_id"][i]): b["image"][i] for b in take(batches, batches.num_batches)
                            for i in range(batch_size)})
    common = first_epoch[0].keys() & first_epoch[1].keys()
    assert len(common) > 10
    for image_id in common:
        np.testing.assert_array_equal(first_epoch[0][image_id], first_epoch[1][image_id])


def test_resume_gives_the_same_batches(cfg, train_source):
    full = train_batches(cfg, 2, seed=7, process_index=0, process_count=1, source=train_source)
    steps = full.num_batches
    reference = take(full, 2 * steps + 3)
    for start in (steps - 1, steps + 4):
        resumed = take(train_batches(cfg, 2, seed=7, start_step=start, process_index=0, process_count=1,
                                     source=train_source), 2 * steps + 3 - start)
        assert_same_batches(reference[start:], resumed)
    other_seed = take(train_batches(cfg, 2, seed=8, process_index=0, process_count=1, source=train_source), 3)
    assert any(not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(reference, other_seed))


def global_steps(cfg, batch_size, hosts, steps, seed=4, start_step=0):
    """[(bucket (H, W), image ids of the global batch in host order)] of ``steps`` global batches
    as ``hosts`` hosts see them; every host must feed the same shape at every step."""
    per_host = [take(train_batches(cfg, batch_size, seed=seed, start_step=start_step, process_index=p,
                                   process_count=hosts), steps) for p in range(hosts)]
    result = []
    for batches in zip(*per_host):
        shapes = {b["image"].shape for b in batches}
        assert len(shapes) == 1, shapes  # the same program on every host
        assert all(len(b["image_id"]) == batch_size // hosts for b in batches)
        result.append((shapes.pop()[1:3], np.concatenate([b["image_id"] for b in batches]).tolist()))
    return result


def test_global_schedule_is_independent_of_the_number_of_hosts(cfg):
    """The content of global step k (images, bucket, augmentation, order) does not depend on how
    many hosts read it: 1, 2 or 3 hosts, three buckets, across an epoch boundary and on resume."""
    three = folder_config(cfg.train_annotations.rsplit("/annotations", 1)[0],
                          buckets=((64, 96), (96, 64), (96, 96)))
    steps = steps_per_epoch(36, 6, 3) + 2
    one = global_steps(three, 6, 1, steps)
    assert len({shape for shape, _ in one}) >= 2  # the steps really change shape
    assert global_steps(three, 6, 2, steps) == one
    assert global_steps(three, 6, 3, steps) == one
    assert global_steps(three, 6, 2, 3, start_step=steps - 3) == one[-3:]  # resumed on another host count
    pixels = [take(train_batches(three, 6, seed=4, process_index=p, process_count=2), 2) for p in range(2)]
    single = take(train_batches(three, 6, seed=4, process_index=0, process_count=1), 2)
    for step in range(2):  # the same augmented pixels, split by rank
        np.testing.assert_array_equal(np.concatenate([pixels[p][step]["image"] for p in range(2)]),
                                      single[step]["image"])


def test_train_shards_are_disjoint_and_complete(cfg):
    hosts = 3
    sources = [load_dataset(cfg, "train", process_index=p, process_count=hosts) for p in range(hosts)]
    for epoch in (0, 1):  # one order of the whole split, the same on every host
        orders = [s.records.image_id[s.train_order(4, epoch)] for s in sources]
        assert sorted(orders[0]) == list(range(1, 37))
        assert all(np.array_equal(o, orders[0]) for o in orders)
    per_host = []
    for p, source in enumerate(sources):
        batches = train_batches(cfg, 6, seed=4, process_index=p, process_count=hosts, source=source)
        per_host.append(np.concatenate([b["image_id"] for b in take(batches, batches.num_batches)]))
    assert len({len(ids) for ids in per_host}) == 1  # same number of steps on every host
    seen = np.concatenate(per_host)
    assert len(set(seen)) == len(seen)  # disjoint


def test_eval_shards_are_disjoint_and_complete(cfg):
    hosts = 3
    ids, counts = [], []
    for p in range(hosts):
        batches = eval_batches(cfg, 2, process_index=p, process_count=hosts)
        seen = list(batches)
        counts.append(len(seen))
        for batch in seen:
            check_batch(batch, 2, cfg.max_boxes, bucket_list(cfg))
            ids.extend(batch["image_id"][batch["example_valid"]].tolist())
    assert len(set(counts)) == 1  # same number of eval batches on every host
    assert sorted(ids) == list(range(1, 12))


def test_boxes_follow_the_pixels(tmp_path):
    """Black images with one white rectangle: through random flip, crop, resize and padding, the
    target box and the white pixels of the batch agree to within a pixel."""
    images, annotations = [], []
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "train")
    for i in range(24):
        h, w = (int(v) for v in rng.integers(60, 140, 2))
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        bw, bh = int(rng.integers(w // 4, w - x)), int(rng.integers(h // 4, h - y))
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[y:y + bh, x:x + bw] = 255
        tf.io.write_file(str(tmp_path / "train" / f"{i}.png"), tf.io.encode_png(pixels))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, bw, bh], "iscrowd": 0})
    os.makedirs(tmp_path / "annotations")
    with open(tmp_path / "annotations" / "instances_train.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}, f)
    cfg = folder_config(str(tmp_path), crop_prob=0.7, buckets=((160, 160),))
    batches = train_batches(cfg, 4, seed=0, process_index=0, process_count=1)
    cropped_away = 0
    for batch in take(batches, 2 * batches.num_batches):
        for i in range(4):
            h, w = batch["size"][i]
            intensity = (batch["image"][i][:h, :w] * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)).mean(-1)
            if not batch["box_valid"][i, 0]:
                cropped_away += 1
                assert (intensity > 0.5).mean() < 0.01
                continue
            cx, cy, bw, bh = batch["boxes"][i, 0] * np.array([w, h, w, h])
            extent = []
            for profile in (intensity.mean(0), intensity.mean(1)):  # per column, per row
                inside = np.flatnonzero(profile > 0.5 * profile.max())
                extent += [inside[0], inside[-1] + 1]
            np.testing.assert_allclose(extent, [cx - bw / 2, cx + bw / 2, cy - bh / 2, cy + bh / 2], atol=1.01)
    assert cropped_away < 8


def test_synthetic_source_is_generated_on_first_use(tmp_path):
    cfg = data_config(source="synthetic", data_dir=str(tmp_path / "synthetic"), synthetic_num_train=12,
                      synthetic_num_val=3, **SMALL)
    batches = eval_batches(cfg, 2, process_index=0, process_count=1)
    assert sum(int(b["example_valid"].sum()) for b in batches) == 3
    assert batches.info.num_classes == 6 and batches.info.class_names[1:] == ("circle", "square", "triangle",
                                                                             "cross", "ring")
    assert os.path.exists(tmp_path / "synthetic" / "annotations" / "instances_train.json")


def test_ground_truth_evaluates_with_pycocotools(cfg):
    source = load_dataset(cfg, "val", process_index=0, process_count=1)
    gt = COCO()
    gt.dataset = source.ground_truth()
    gt.createIndex()
    assert sorted(gt.getImgIds()) == list(range(1, 12)) and gt.getCatIds() == [1, 2, 3, 4, 5]
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in gt.dataset["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


@pytest.mark.parametrize("mapping", ["category_id", "contiguous"])
def test_custom_category_ids_round_trip(tmp_path, mapping):
    ids, names = (3, 7, 42), ("cat", "dog", "eel")
    pixels = tf.io.encode_png(np.full((40, 50, 3), 128, np.uint8))
    os.makedirs(tmp_path / "val")
    tf.io.write_file(str(tmp_path / "val" / "a.png"), pixels)
    annotations = [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": [5 * k, 4, 10, 12]} for k, c in enumerate(ids)]
    os.makedirs(tmp_path / "annotations")
    with open(tmp_path / "annotations" / "instances_val.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}], "annotations": annotations,
                   "categories": [{"id": c, "name": n} for c, n in zip(reversed(ids), reversed(names))]}, f)
    cfg = folder_config(str(tmp_path), label_mapping=mapping)
    batches = eval_batches(cfg, 1, process_index=0, process_count=1)
    batch = next(batches)
    info = batches.info
    labels = batch["labels"][0][batch["box_valid"][0]]
    assert info.category_ids(labels).tolist() == list(ids)
    if mapping == "contiguous":
        assert info.num_classes == 3 and labels.tolist() == [0, 1, 2] and info.class_names == names
    else:
        assert info.num_classes == 43 and labels.tolist() == list(ids)
        assert info.class_names[7] == "dog" and info.class_names[8] == "" and info.label_to_category_id[8] == -1
    assert info.labels(ids).tolist() == labels.tolist()
    with pytest.raises(ValueError, match="have no label"):
        info.labels([5])


@pytest.mark.parametrize("override,message", [
    (dict(source="voc"), "config.data.source = 'voc': expected one of 'synthetic', 'coco_json', 'tfds'"),
    (dict(label_mapping="names"), "config.data.label_mapping = 'names': expected one of"),
    (dict(max_boxes=0), "config.data.max_boxes = 0: expected an integer >= 1"),
    (dict(train_scales=()), "config.data.train_scales = \\(\\): expected a non-empty sequence"),
    (dict(crop_min_size=700), "config.data.crop_min_size = 700: expected at most config.data.crop_max_size \\(600\\)"),
    (dict(flip_prob=1.5), "config.data.flip_prob = 1.5: expected a number >= 0 and <= 1"),
    (dict(buckets=((100, 128),)), "config.data.buckets = \\(\\(100, 128\\),\\): .* multiples of config.data.size_divisor "
                                  "\\(32\\)"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        validate({"data": data_config(**override)})
