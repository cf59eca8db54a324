"""Panoptic data: COCO panoptic folders, tfds coco/2017_panoptic, the synthetic dataset with stuff,
and the masks of the batch format (segments, segment_ids)."""
import itertools
import json
import os
import re
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from detr_jax.config import data_config
from detr_jax.data import eval_batches, load_dataset, train_batches
from detr_jax.data.synthetic import CLASSES, STUFF, Spec, generate, render_scene, shape_mask
from detr_jax.data.tfds_coco import PANOPTIC_CATEGORIES
from detr_jax.data.transforms import resample_segments
from detr_jax.errors import ConfigError, DataError
from detr_jax.validation import validate

SMALL = dict(train_scales=(40, 48, 56), train_max_size=96, crop_resize_scales=(56, 64), crop_min_size=40,
             crop_max_size=56, eval_size=48, eval_max_size=96, max_boxes=8, size_divisor=16)
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
              {"id": 150, "name": "sky", "isthing": 0}]


def rgb2id(rgb):
    rgb = np.asarray(rgb, np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def masks_to_boxes(masks):
    """Official util/box_ops.masks_to_boxes in numpy: [N, H, W] bool -> [N, 4] (x0, y0, x1, y1), x1 = max column."""
    boxes = []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def hand_ids(h, w, k):
    """A segment-id map [h, w]: a person (id 70000: G and B channels used), a crowd of cars, sky, void."""
    ids = np.zeros((h, w), np.int64)
    ids[: h // 3] = 5  # sky, the top third
    yy, xx = np.mgrid[0:h, 0:w]
    ids[(yy - h // 2) ** 2 / (h / 5) ** 2 + (xx - w // 3 - k) ** 2 / (w / 6) ** 2 <= 1] = 70000  # an ellipse
    ids[h // 2 + 2: h - 3, w // 2 + 4: w - 2] = 131  # a crowd rectangle, void around it
    return ids


def write_folder(root, sizes_by_split):
    """A COCO panoptic folder in the official layout: images, PNGs, json with bboxes as panopticapi writes them."""
    for split, sizes in sizes_by_split.items():
        for sub in (f"{split}2017", f"panoptic_{split}2017", "annotations"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        images, annotations = [], []
        for k, (h, w) in enumerate(sizes):
            image_id, name = 10 + k, f"{10 + k:012d}"
            rng = np.random.default_rng(k)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, f"{split}2017", name + ".png"))
            ids = hand_ids(h, w, k)
            Image.fromarray(id2rgb(ids)).save(os.path.join(root, f"panoptic_{split}2017", name + ".png"))
            segments = []
            for sid, cid, crowd in ((70000, 1, 0), (131, 3, 1), (5, 150, 0)):
                mask = ids == sid
                x0, y0, x1, y1 = masks_to_boxes(mask[None])[0].astype(int).tolist()
                segments.append({"id": sid, "category_id": cid, "iscrowd": crowd, "area": int(mask.sum()),
                                 "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
            images.append({"id": image_id, "file_name": name + ".png", "height": h, "width": w})
            annotations.append({"image_id": image_id, "file_name": name + ".png", "segments_info": segments})
        with open(os.path.join(root, "annotations", f"panoptic_{split}2017.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return root


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("panoptic")), {"train": [(60, 80), (72, 56), (64, 64)],
                                                                   "val": [(50, 90), (80, 60)]})


def panoptic_config(root, **overrides):
    return data_config(source="coco_panoptic", data_dir=root, **{"masks": True, **SMALL, **overrides})


def valid_examples(batches):
    for batch in batches:
        for i in np.flatnonzero(batch["example_valid"]):
            yield {k: v[i] for k, v in batch.items()}


def png_ids(source, row):
    return rgb2id(np.asarray(Image.open(source.records.panoptic_path[row]).convert("RGB")))


def test_targets_are_every_segment_with_masks_to_boxes(hand):
    source = load_dataset(panoptic_config(hand), "train", process_index=0, process_count=1)
    info, targets = source.info, source.targets
    assert info.num_classes == 151 and info.class_names[150] == "sky" and info.class_names[3] == "car"
    assert not info.isthing[150] and info.isthing[1] and info.isthing[3]
    assert source.report.counts["crowd_kept"] == 3 and "crowd_excluded" not in source.report.counts
    for row in range(len(source.records)):
        ids = png_ids(source, row)
        lo, hi = targets.splits[row], targets.splits[row + 1]
        assert targets.segment_ids[lo:hi].tolist() == [70000, 131, 5]  # the crowd segment is a target
        assert targets.labels[lo:hi].tolist() == [1, 3, 150]
        expected = masks_to_boxes(ids[None] == targets.segment_ids[lo:hi, None, None])
        np.testing.assert_array_equal(targets.boxes[lo:hi], expected)  # x1 = max column, not + 1
        anns = slice(source.records.ann_splits[row], source.records.ann_splits[row + 1])
        assert source.records.iscrowd[anns].tolist() == [False, True, False]
        gt_ids, segments = source.panoptic_ground_truth(row)
        np.testing.assert_array_equal(gt_ids, ids)
        assert segments == [{"id": 70000, "category_id": 1, "iscrowd": 0}, {"id": 131, "category_id": 3, "iscrowd": 1},
                            {"id": 5, "category_id": 150, "iscrowd": 0}]
    assert len(set(source.records.ann_id)) == len(source.records.ann_id)  # unique, for pycocotools


def test_eval_segments_are_the_nearest_resized_png(hand):
    cfg = panoptic_config(hand)
    source = load_dataset(cfg, "val", process_index=0, process_count=1)
    seen = 0
    for ex in valid_examples(eval_batches(cfg, 2, process_index=0, process_count=1, source=source)):
        row = int(source.rows_of([ex["image_id"]])[0])
        ids = png_ids(source, row)
        (h0, w0), (h, w) = ids.shape, ex["size"]
        rows = np.floor((np.arange(h) + 0.5) * h0 / h).astype(int)
        cols = np.floor((np.arange(w) + 0.5) * w0 / w).astype(int)
        np.testing.assert_array_equal(ex["segments"][:h, :w], ids[rows][:, cols])
        assert not ex["segments"][h:].any() and not ex["segments"][:, w:].any()  # padding is void
        valid = ex["box_valid"]
        assert ex["segment_ids"][valid].tolist() == [70000, 131, 5] and not ex["segment_ids"][~valid].any()
        seen += 1
    assert seen == 2


@pytest.mark.parametrize("flip", [False, True])
def test_resample_segments_maps_pixel_centres(flip):
    ids = np.arange(30 * 40, dtype=np.int32).reshape(30, 40)
    region, size = np.array([4.5, 7.0, 20.0, 25.0], np.float32), np.array([13, 33], np.int32)
    got = resample_segments(tf.constant(ids), tf.constant([30, 40]), tf.constant(flip), tf.constant(region),
                            tf.constant(size)).numpy()
    source = ids[:, ::-1] if flip else ids
    rows = np.floor(region[0] + (np.arange(13) + 0.5) * region[2] / 13).astype(int)
    cols = np.floor(region[1] + (np.arange(33) + 0.5) * region[3] / 33).astype(int)
    np.testing.assert_array_equal(got, source[rows][:, cols])


def test_train_segments_move_with_the_boxes(hand):
    """Flip, crop and resize: each rectangular target's mask in ``segments`` has the target's box up
    to the official box arithmetic (masks_to_boxes' max column, flipped as w - x1) against
    pixel-centre sampling: within 1.5 output pixels when the scale is at most 1 (so here). A crop
    clips the ellipse's box, as official, so its cropped mask only lies inside the box."""
    cfg = panoptic_config(hand, flip_prob=0.5, crop_prob=0.5, train_scales=(20, 24), crop_resize_scales=(48, 56),
                          crop_min_size=24, crop_max_size=48)
    cropped = 0
    for ex in valid_examples(itertools.islice(train_batches(cfg, 1, seed=1, process_index=0, process_count=1), 24)):
        h, w = ex["size"]
        segments = ex["segments"]
        assert not segments[h:].any() and not segments[:, w:].any() and segments[:h, :w].any()
        for box, sid in zip(ex["boxes"][ex["box_valid"]], ex["segment_ids"][ex["box_valid"]]):
            mask = segments == sid
            expected = np.array([box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2,
                                 box[1] + box[3] / 2]) * [w, h, w, h]
            if not mask.any():
                continue
            got = masks_to_boxes(mask[None])[0]
            if sid == 70000:
                assert (got[:2] >= expected[:2] - 1.5).all() and (got[2:] <= expected[2:] + 1.5).all()
            else:
                np.testing.assert_allclose(got, expected, atol=1.5)
        cropped += int(not {70000, 131, 5} <= set(ex["segment_ids"].tolist()))
    assert cropped > 0  # some crops left a segment out


def test_crowd_and_left_out_segments_in_the_segment_map(hand):
    """A segment left out (unknown category, skip) is no target; its pixels keep their id in the
    batch (matching no slot) and are void in the ground truth."""
    root = hand + "_skip"
    write_folder(root, {"train": [(60, 80)], "val": [(60, 80)]})
    path = os.path.join(root, "annotations", "panoptic_val2017.json")
    with open(path) as f:
        data = json.load(f)
    data["categories"] = data["categories"][:2]  # sky's category gone
    with open(path, "w") as f:
        json.dump(data, f)
    cfg = panoptic_config(root, unknown_category="skip")
    source = load_dataset(cfg, "val", process_index=0, process_count=1)
    assert source.report.counts["unknown_category"] == 1
    ids, segments = source.panoptic_ground_truth(0)
    assert [s["id"] for s in segments] == [70000, 131] and not (ids == 5).any() and (ids == 131).any()
    ex = next(valid_examples(eval_batches(cfg, 1, process_index=0, process_count=1, source=source)))
    assert ex["segment_ids"][ex["box_valid"]].tolist() == [70000, 131] and (ex["segments"] == 5).any()


def test_masks_false_keeps_the_detection_batch(hand):
    cfg = panoptic_config(hand, masks=False)
    batch = next(iter(eval_batches(cfg, 2, process_index=0, process_count=1)))
    assert "segments" not in batch and "segment_ids" not in batch
    assert batch["labels"][0][batch["box_valid"][0]].tolist() == [1, 3, 150]  # stuff boxes are targets too


def test_a_segment_missing_from_its_png_makes_a_filler(hand):
    root = hand + "_absent"
    write_folder(root, {"train": [(60, 80)], "val": [(60, 80), (50, 70)]})
    path = os.path.join(root, "annotations", "panoptic_val2017.json")
    with open(path) as f:
        data = json.load(f)
    data["annotations"][1]["segments_info"][0]["id"] = 4242
    with open(path, "w") as f:
        json.dump(data, f)
    batches = eval_batches(panoptic_config(root), 1, process_index=0, process_count=1)
    seen = list(batches)
    assert [b["image_id"][0] for b in seen] == [10, -1]  # image 11 is a filler
    assert not seen[1]["segments"].any() and not seen[1]["segment_ids"].any()
    assert batches.report.counts["unreadable_image"] == 1 and batches.report.examples["unreadable_image"] == [
        "000000000011.png"]


def test_errors_name_the_field_and_the_file(hand, tmp_path):
    with pytest.raises(ConfigError, match="config.data.masks = True: source 'coco_json' has no panoptic"):
        validate({"data": data_config(source="coco_json", masks=True)})
    with pytest.raises(ConfigError, match="config.data.masks = True: source 'synthetic'"):
        validate({"data": data_config(source="synthetic", masks=True)})
    with pytest.raises(ConfigError, match="config.data.synthetic_stuff = 9: expected an integer >= 0 and <= 4"):
        validate({"data": data_config(source="synthetic", synthetic_stuff=9)})
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ConfigError, match="config.data.masks = True needs panoptic annotations, but source "
                                          "'coco_json' \\(.*instances.json\\) has none"):
        load_dataset(data_config(source="coco_json", masks=True, train_annotations=str(instances),
                                 train_images=str(tmp_path)), "train", process_index=0, process_count=1)

    root = write_folder(str(tmp_path / "broken"), {"train": [(60, 80), (50, 70)]})
    path = os.path.join(root, "annotations", "panoptic_train2017.json")
    with open(path) as f:
        good = json.load(f)
    os.remove(os.path.join(root, "panoptic_train2017", "000000000011.png"))
    with pytest.raises(DataError, match="the panoptic PNG .*000000000011.png of 000000000011.png \\(image id 11; "
                                        "its annotation entry's file_name\\) is not in"):
        load_dataset(panoptic_config(root), "train", process_index=0, process_count=1)
    for change, message in (
            (lambda d: d["annotations"][1]["segments_info"][2].update(id="x"),
             "annotations\\[1\\] \\(image id 11\\).segments_info\\[2\\].id = 'x': expected an integer"),
            (lambda d: d["annotations"][0]["segments_info"][1].update(id=70000),
             "annotations\\[0\\] \\(image id 10\\).segments_info\\[1\\].id = 70000: expected an id in 1..16777215 .* unique within the image"),
            (lambda d: d["categories"][0].pop("isthing"), "categories\\[0\\] has no field 'isthing'"),
            (lambda d: d["annotations"].pop(), "images\\[1\\] \\(id 11\\) has no entry in 'annotations'")):
        data = json.loads(json.dumps(good))
        change(data)
        with open(path, "w") as f:
            json.dump(data, f)
        with pytest.raises(DataError, match=re.escape(path) + ": not a valid COCO annotation file: " + message):
            load_dataset(panoptic_config(root), "train", process_index=0, process_count=1)


# --- the synthetic dataset with stuff

SPEC = Spec(num_train=6, num_val=2, seed=2, min_size=48, max_size=80, stuff=2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synthetic") / "stuff"), SPEC)


def test_synthetic_panoptic_pngs_hold_the_shapes_and_the_stuff(synthetic):
    with open(os.path.join(synthetic, "annotations", "panoptic_train.json")) as f:
        data = json.load(f)
    assert [(c["id"], c["name"], c["isthing"]) for c in data["categories"]] == \
        [(k + 1, name, 1) for k, name in enumerate(CLASSES)] + [(6, "sky", 0), (7, "ground", 0)]
    for image, ann in zip(data["images"], data["annotations"]):
        ids = rgb2id(np.asarray(Image.open(os.path.join(synthetic, "panoptic_train", ann["file_name"]))))
        assert ids.shape == (image["height"], image["width"])
        segments = ann["segments_info"]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in segments}
        for s in segments:
            mask = ids == s["id"]
            x0, y0, x1, y1 = masks_to_boxes(mask[None])[0]
            assert s["area"] == mask.sum() and s["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
        scene = render_scene(np.random.default_rng([SPEC.seed, 0, image["id"] - 1]), SPEC)
        covered = np.zeros(ids.shape, bool)
        things = [s for s in segments if s["category_id"] <= len(CLASSES)]
        for (cls, _, _), (x, y, w, h), s in reversed(list(zip(scene.objects, scene.placed, things))):
            shape = np.zeros(ids.shape, bool)
            shape[y:y + h, x:x + w] = shape_mask(cls, h, w)
            assert s["category_id"] == cls + 1
            np.testing.assert_array_equal(ids == s["id"], shape & ~covered)  # the shape, less the later ones
            covered |= shape
        assert len(things) == len(scene.objects)
        stuff = {s["category_id"]: ids == s["id"] for s in segments if s["category_id"] > len(CLASSES)}
        background = ~covered
        assert (ids[background] == 0).sum() < 16 * len(STUFF)  # stuff covers what things don't (but tiny bands)
        if len(stuff) == 2:
            assert np.argwhere(stuff[6])[:, 0].mean() < np.argwhere(stuff[7])[:, 0].mean()  # sky above ground


def test_synthetic_stuff_is_deterministic_and_the_detection_data_unchanged(synthetic, tmp_path):
    again = generate(str(tmp_path / "again"), SPEC)
    for sub in ("panoptic_train", "train"):
        for name in os.listdir(os.path.join(synthetic, sub)):
            with open(os.path.join(synthetic, sub, name), "rb") as a, open(os.path.join(again, sub, name), "rb") as b:
                assert a.read() == b.read()
    assert "stuff" not in Spec().to_json()  # the detection dataset's synthetic.json and folder name are unchanged
    assert data_config(source="synthetic").synthetic_stuff == 0
    assert sorted(os.listdir(synthetic)) == ["annotations", "panoptic_train", "panoptic_val", "synthetic.json",
                                             "train", "val"]


def test_synthetic_with_stuff_trains_masks_and_boxes(synthetic):
    common = dict(source="synthetic", data_dir=synthetic, synthetic_num_train=6, synthetic_num_val=2,
                  synthetic_seed=2, synthetic_stuff=2, **{**SMALL, "max_boxes": 16})
    source = load_dataset(data_config(masks=True, **common), "train", process_index=0, process_count=1)
    assert source.panoptic and source.info.num_classes == 8 and source.info.isthing[1:] == (True,) * 5 + (False,) * 2
    batch = next(train_batches(data_config(masks=True, **common), 1, seed=0, process_index=0, process_count=1,
                               source=source))
    for i in range(1):
        valid = batch["box_valid"][i]
        assert set(batch["segment_ids"][i][valid] // 1000) == set(batch["labels"][i][valid])  # id = 1000 category + k
    boxes_only = next(train_batches(data_config(masks=False, **common), 1, seed=0, process_index=0, process_count=1))
    assert "segments" not in boxes_only and {6, 7} <= set(boxes_only["labels"][boxes_only["box_valid"]].tolist())


# --- tfds coco/2017_panoptic

NUM = {"train": 4, "validation": 3}


def tfds_examples(split):
    examples = []
    for i in range(NUM[split]):
        h, w = 40 + 8 * i, 56
        ids = hand_ids(h, w, i)
        objects = []
        for sid, label, crowd in ((70000, 0, False), (131, 2, True), (5, 119, False)):  # person, car, sky-other-merged
            x0, y0, x1, y1 = masks_to_boxes((ids == sid)[None])[0]
            objects.append((sid, (ids == sid).sum(), [y0 / h, x0 / w, (y1 + 1) / h, (x1 + 1) / w], label, crowd))
        sid, area, bbox, label, crowd = (np.asarray(v) for v in zip(*objects))
        examples.append({
            "image": tf.io.encode_jpeg(np.full((h, w, 3), 90, np.uint8)).numpy(),
            "image/filename": f"{i:012d}.jpg", "image/id": 100 * len(split) + i,
            "panoptic_image": tf.io.encode_png(id2rgb(ids)).numpy(), "panoptic_image/filename": f"{i:012d}.png",
            "panoptic_objects": {"id": sid.astype(np.int64), "area": area.astype(np.int64),
                                 "bbox": bbox.astype(np.float32), "label": label.astype(np.int64),
                                 "is_crowd": crowd.astype(bool)}})
    return examples


EXAMPLES = {split: tfds_examples(split) for split in NUM}
SIGNATURE = {"image": tf.TensorSpec([], tf.string), "image/filename": tf.TensorSpec([], tf.string),
             "image/id": tf.TensorSpec([], tf.int64), "panoptic_image": tf.TensorSpec([], tf.string),
             "panoptic_image/filename": tf.TensorSpec([], tf.string),
             "panoptic_objects": {"id": tf.TensorSpec([None], tf.int64), "area": tf.TensorSpec([None], tf.int64),
                                  "bbox": tf.TensorSpec([None, 4], tf.float32),
                                  "label": tf.TensorSpec([None], tf.int64), "is_crowd": tf.TensorSpec([None], tf.bool)}}


def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """tfds's reader for 'name[lo:hi]'; this test reads with SkipDecoding only."""
    name, lo, hi = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", split).groups()
    assert set(decoders) == {"image", "panoptic_image"}
    chosen = EXAMPLES[name][int(lo):int(hi)]
    return tf.data.Dataset.from_generator(lambda: iter(chosen), output_signature=SIGNATURE)


@pytest.fixture(scope="module")
def mocked_panoptic(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch, tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
        patch.setattr(tempfile, "tempdir", data_dir)
        builder = tfds.builder("coco/2017_panoptic")
        builder.info.set_splits(tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in NUM.items()]))
        builder.info.features["panoptic_objects"]["label"].names = [c[1] for c in PANOPTIC_CATEGORIES]
        folder = os.path.join(data_dir, "coco", "2017_panoptic", str(builder.info.version))
        os.makedirs(folder)
        builder.info.write_to_directory(folder)
    with tfds.testing.mock_data(data_dir=data_dir, as_dataset_fn=as_dataset):
        yield


def test_tfds_panoptic_maps_labels_to_category_ids(mocked_panoptic):
    cfg = data_config(source="tfds", tfds_name="coco/2017_panoptic", masks=True, **SMALL)
    source = load_dataset(cfg, "val", process_index=0, process_count=1)
    info = source.info
    assert info.num_classes == 201 and PANOPTIC_CATEGORIES[119] == (187, "sky-other-merged", False)
    assert info.class_names[187] == "sky-other-merged" and not info.isthing[187] and info.isthing[3]
    assert sum(info.isthing[c] for c, _, _ in PANOPTIC_CATEGORIES) == 80
    assert source.report.counts["crowd_kept"] == 3
    examples = sorted(valid_examples(eval_batches(cfg, 2, process_index=0, process_count=1, source=source)),
                      key=lambda ex: ex["image_id"])
    assert [ex["image_id"] for ex in examples] == [ex["image/id"] for ex in EXAMPLES["validation"]]
    for ex, given in zip(examples, EXAMPLES["validation"]):
        assert ex["segments"].shape == ex["image"].shape[:2] and ex["segment_ids"].shape == (SMALL["max_boxes"],)
        valid = ex["box_valid"]
        assert ex["labels"][valid].tolist() == [1, 3, 187] and ex["segment_ids"][valid].tolist() == [70000, 131, 5]
        h, w = ex["size"]
        ids = rgb2id(tf.io.decode_png(given["panoptic_image"]).numpy())
        rows = np.floor((np.arange(h) + 0.5) * ids.shape[0] / h).astype(int)
        cols = np.floor((np.arange(w) + 0.5) * ids.shape[1] / w).astype(int)
        np.testing.assert_array_equal(ex["segments"][:h, :w], ids[rows][:, cols])
    lo, hi = source.targets.splits[1:3]
    np.testing.assert_array_equal(source.targets.boxes[lo:hi], masks_to_boxes(
        rgb2id(tf.io.decode_png(EXAMPLES["validation"][1]["panoptic_image"]).numpy())[None]
        == np.array([70000, 131, 5])[:, None, None]))
    ids, segments = source.panoptic_ground_truth(2)
    np.testing.assert_array_equal(ids, rgb2id(tf.io.decode_png(EXAMPLES["validation"][2]["panoptic_image"]).numpy()))
    assert segments[2] == {"id": 5, "category_id": 187, "iscrowd": 0}


def test_tfds_panoptic_train_batches(mocked_panoptic):
    cfg = data_config(source="tfds", tfds_name="coco/2017_panoptic", masks=True, shuffle_window=2, **SMALL)
    batch = next(train_batches(cfg, 1, seed=0, process_index=0, process_count=1))
    b, h, w, _ = batch["image"].shape
    assert batch["segments"].shape == (b, h, w) and batch["segments"].dtype == np.int32
    assert batch["segment_ids"].shape == (b, SMALL["max_boxes"]) and batch["segment_ids"].dtype == np.int32
    assert batch["example_valid"].all()
