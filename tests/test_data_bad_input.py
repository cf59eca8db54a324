"""Bad input: every case is handled, counted and named; nothing crashes a run or is dropped silently."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from detr_jax.config import data_config
from detr_jax.data import eval_batches, load_dataset, train_batches
from detr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZES = dict(train_scales=(48, 64), train_max_size=96, crop_resize_scales=(48,), crop_min_size=32, crop_max_size=48,
             eval_size=64, eval_max_size=96, buckets=((96, 96),), max_boxes=5)
MANY = [[2 * k, 2 * k, 4 + k, 4 + k] for k in range(8)]  # 8 boxes, the largest last


def png(pixels):
    return tf.io.encode_png(pixels).numpy()


def jpeg(pixels):
    return tf.io.encode_jpeg(pixels, quality=95).numpy()


def write_dataset(root):
    """A COCO folder with one case of each kind of bad input (see the annotations below)."""
    yy, xx = np.mgrid[0:60, 0:80]
    rgb = np.stack([xx * 3, yy * 4, np.full_like(xx, 128)], -1).astype(np.uint8)  # smooth: resampling keeps it
    files = {
        "good.jpg": jpeg(rgb),
        "corrupt.jpg": b"this is not an image",
        "truncated.jpg": jpeg(rgb)[:400],
        "gray.png": png(np.full((50, 40, 1), 200, np.uint8)),
        "rgba.png": png(np.concatenate([np.full((50, 40, 3), (30, 60, 90), np.uint8),
                                        np.zeros((50, 40, 1), np.uint8)], -1)),
        "deep.png": png(np.full((50, 40, 3), (100 * 257, 150 * 257, 200 * 257), np.uint16)),
        "empty.jpg": jpeg(rgb),
        "many.png": png(rgb),
        "mismatch.png": png(np.repeat(np.repeat(rgb, 2, 0), 2, 1)),  # annotated as 60 x 80
    }
    os.makedirs(os.path.join(root, "images"))
    for name, data in files.items():
        with open(os.path.join(root, "images", name), "wb") as f:
            f.write(data)
    names = ["good.jpg", "corrupt.jpg", "truncated.jpg", "missing.jpg", "gray.png", "rgba.png", "deep.png",
             "empty.jpg", "many.png", "mismatch.png"]
    sizes = {"gray.png": (50, 40), "rgba.png": (50, 40), "deep.png": (50, 40)}
    images = [{"id": i + 1, "file_name": n, "height": sizes.get(n, (60, 80))[0], "width": sizes.get(n, (60, 80))[1]}
              for i, n in enumerate(names)]
    boxes = [  # (image id, bbox, category, iscrowd)
        (1, [10, 10, 20, 20], 1, 0), (1, [5, 5, 0, 10], 1, 0), (1, [5, 5, 10, -3], 2, 0),  # fine, two degenerate
        (1, [100, 10, 20, 20], 1, 0), (1, [70, 50, 20, 20], 2, 0),  # outside, clipped to x 70..80 y 50..60
        (1, [0, 0, 30, 30], 1, 1), (1, [1, 1, 5, 5], 99, 0),  # crowd, unknown category
        (2, [1, 1, 5, 5], 1, 0), (3, [1, 1, 5, 5], 1, 0), (4, [1, 1, 5, 5], 1, 0),
        (5, [4, 5, 10, 20], 1, 0), (6, [4, 5, 10, 20], 1, 0), (7, [4, 5, 10, 20], 1, 0),
        *[(9, b, 1, 0) for b in MANY], (10, [8, 6, 40, 30], 2, 0), (1, [float("nan"), 10, 20, 20], 1, 0),
    ]
    annotations = [{"id": k + 1, "image_id": i, "bbox": b, "category_id": c, "iscrowd": crowd}
                   for k, (i, b, c, crowd) in enumerate(boxes)]
    os.makedirs(os.path.join(root, "annotations"))
    path = os.path.join(root, "annotations", "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, f)
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad"))
    path = write_dataset(root)
    images = os.path.join(root, "images")
    return data_config(source="coco_json", train_annotations=path, train_images=images, val_annotations=path,
                       val_images=images, unknown_category="skip", **SIZES)


def eval_examples(cfg):
    """image file name -> that image's eval example; and the Batches."""
    batches = eval_batches(cfg, 3, process_index=0, process_count=1)
    examples, fillers = {}, 0
    for batch in batches:
        for i in range(3):
            if batch["example_valid"][i]:
                image_id = int(batch["image_id"][i])
                assert image_id not in examples
                examples[image_id] = {k: v[i] for k, v in batch.items()}
            else:
                fillers += 1
    names = dict(zip(batches.source.records.image_id.tolist(), batches.source.records.file_name))
    return {names[i]: e for i, e in examples.items()}, fillers, batches


def test_annotation_problems_are_counted_and_named(bad):
    source = load_dataset(bad, "train", process_index=0, process_count=1)
    counts, examples = source.report.counts, source.report.examples
    assert counts == {"missing_image": 1, "unknown_category": 1, "degenerate_box": 3, "outside_box": 1,
                      "clipped_box": 1, "crowd_excluded": 1, "over_max_boxes": 3, "empty_image": 1}
    assert examples["empty_image"] == ["empty.jpg (image id 8)"]  # kept, and counted
    assert examples["missing_image"][0].endswith("missing.jpg")
    assert "good.jpg (image id 1) annotation id 7: category_id 99" in examples["unknown_category"][0]
    assert examples["degenerate_box"] == ["good.jpg (image id 1) annotation id 2",
                                          "good.jpg (image id 1) annotation id 3",
                                          "good.jpg (image id 1) annotation id 23"]
    assert "many.png (image id 9): 8 boxes" in examples["over_max_boxes"][0]
    assert "missing_image: 1" in source.report.summary()
    assert "missing.jpg" not in source.records.file_name  # left out; the others are kept, even the empty one
    assert len(source.records) == 9 and source.info.num_images == 9
    good = 0
    t = source.targets
    np.testing.assert_array_equal(t.boxes[t.splits[good]:t.splits[good + 1]], [[10, 10, 30, 30], [70, 50, 80, 60]])
    many = list(source.records.file_name).index("many.png")
    kept = t.boxes[t.splits[many]:t.splits[many + 1]]
    np.testing.assert_array_equal(kept, [[x, y, x + w, y + h] for x, y, w, h in MANY[3:]])  # the five largest


def test_evaluation_ground_truth_leaves_out_what_training_leaves_out(bad):
    """The NaN, zero-size and outside boxes are not in the ground truth given to pycocotools (a NaN
    box used to match any detection of the same y, w, h); crowd and clipped boxes stay as given."""
    source = load_dataset(bad, "val", process_index=0, process_count=1)
    by_id = {a["id"]: a for a in source.ground_truth()["annotations"]}
    assert not {2, 3, 4, 23} & by_id.keys()
    assert by_id[6]["iscrowd"] == 1 and by_id[5]["bbox"] == [70, 50, 20, 20] and by_id[1]["bbox"] == [10, 10, 20, 20]
    assert all(np.isfinite(a["bbox"]).all() for a in by_id.values())
    assert source.report.counts["degenerate_box"] == 3 and source.report.counts["outside_box"] == 1


def test_an_image_shrunk_to_its_bucket_is_named_with_plain_numbers(bad):
    cfg = data_config(**{**bad.to_dict(), "eval_size": 160, "eval_max_size": 200})
    batches = eval_batches(cfg, 3, process_index=0, process_count=1)
    example = batches.report.examples["shrunk_to_bucket"][0]
    assert example == "good.jpg eval: (150, 200)", example  # not (np.int64(150), np.int64(200))


def test_unknown_category_error_names_file_and_annotation(bad):
    cfg = data_config(**{**bad.to_dict(), "unknown_category": "error"})
    with pytest.raises(ValueError, match=r"instances\.json: 1 annotations have a category id not in 'categories'"
                                         r".*annotation id 7: category_id 99"):
        load_dataset(cfg, "train", process_index=0, process_count=1)


def test_max_boxes_error_policy(bad):
    cfg = data_config(**{**bad.to_dict(), "max_boxes_policy": "error"})
    with pytest.raises(ValueError, match=r"more than max_boxes = 5.*many\.png \(image id 9\): 8 boxes"):
        load_dataset(cfg, "train", process_index=0, process_count=1)


def test_eval_skips_unreadable_images_and_converts_the_rest(bad):
    examples, fillers, batches = eval_examples(bad)
    assert set(examples) == {"good.jpg", "gray.png", "rgba.png", "deep.png", "empty.jpg", "many.png", "mismatch.png"}
    assert fillers == 3 * batches.num_batches - 7
    report = batches.report
    assert report.counts["unreadable_image"] == 2
    assert sorted(report.examples["unreadable_image"]) == ["corrupt.jpg", "truncated.jpg"]
    assert report.counts["size_mismatch"] == 1 and report.examples["size_mismatch"] == ["mismatch.png"]

    def pixel(name):
        h, w = examples[name]["size"]
        return examples[name]["image"][h // 2, w // 2] * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)

    np.testing.assert_allclose(pixel("gray.png") * 255, [200, 200, 200], atol=0.5)
    np.testing.assert_allclose(pixel("rgba.png") * 255, [30, 60, 90], atol=0.5)
    np.testing.assert_allclose(pixel("deep.png") * 255, [100, 150, 200], atol=0.5)
    assert not examples["empty.jpg"]["box_valid"].any()
    # eval keeps everything but crowd, degenerate and outside boxes; the clipped box is clipped
    good = examples["good.jpg"]
    np.testing.assert_allclose(good["boxes"][good["box_valid"]], [[20 / 80, 20 / 60, 20 / 80, 20 / 60],
                                                                  [75 / 80, 55 / 60, 10 / 80, 10 / 60]], atol=1e-6)
    # the file twice the annotated size: annotated frame kept (orig_size, boxes), pixels resampled to it
    mismatch = examples["mismatch.png"]
    assert mismatch["orig_size"].tolist() == [60, 80]
    np.testing.assert_allclose(mismatch["image"][: mismatch["size"][0], : mismatch["size"][1]],
                               examples["many.png"]["image"][: mismatch["size"][0], : mismatch["size"][1]], atol=0.05)


def test_train_runs_through_bad_images(bad):
    batches = train_batches(bad, 2, seed=0, process_index=0, process_count=1)
    failed = 0
    for batch in [next(batches) for _ in range(4 * batches.num_batches)]:
        failed += int((~batch["example_valid"]).sum())
        assert batch["padding_mask"][~batch["example_valid"]].all()
        assert not batch["box_valid"][~batch["example_valid"]].any()
    assert failed == batches.report.counts["unreadable_image"] > 0


def write_json(tmp_path, content):
    path = tmp_path / "instances_bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


IMAGE = {"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}
ANN = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}
CATS = [{"id": 1, "name": "a"}]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not JSON"),
    ([1, 2], "the top level is a list, expected an object"),
    ({"images": [], "categories": []}, "the top level has no field 'annotations'"),
    ({"images": [], "annotations": [], "categories": {}}, "field 'categories' is a dict, expected a list"),
    ({"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [], "categories": CATS},
     "images\\[0\\] has no field 'file_name'"),
    ({"images": [{**IMAGE, "height": "10"}], "annotations": [], "categories": CATS},
     "images\\[0\\].height = '10': expected an integer"),
    ({"images": [{**IMAGE, "width": 0}], "annotations": [], "categories": CATS}, "images\\[0\\] has height 10 and width 0"),
    ({"images": [IMAGE, IMAGE], "annotations": [], "categories": CATS}, "images\\[1\\].id = 1 repeats"),
    ({"images": [IMAGE], "annotations": [{**ANN, "bbox": [1, 2, 3]}], "categories": CATS},
     "annotations\\[0\\] \\(id 1\\).bbox = \\[1, 2, 3\\]: expected \\[x, y, width, height\\]"),
    ({"images": [IMAGE], "annotations": [{**ANN, "image_id": 5}], "categories": CATS},
     "annotations\\[0\\] \\(id 1\\).image_id = 5: no image has this id"),
    ({"images": [IMAGE], "annotations": [ANN], "categories": [{"id": 1}]}, "categories\\[0\\] has no field 'name'"),
])
def test_not_coco_names_file_and_field(tmp_path, content, message):
    path = write_json(tmp_path, content)
    cfg = data_config(source="coco_json", train_annotations=path, train_images=str(tmp_path))
    with pytest.raises(ValueError, match=f"{path}: not a valid COCO annotation file: .*{message}"):
        load_dataset(cfg, "train", process_index=0, process_count=1)


def test_missing_annotation_file(tmp_path):
    cfg = data_config(source="coco_json", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="instances_val2017.json: annotation file not found"):
        load_dataset(cfg, "val", process_index=0, process_count=1)


def test_wrong_image_folder(bad, tmp_path):
    cfg = data_config(**{**bad.to_dict(), "train_images": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="none of the 10 images listed in .*instances.json is there"):
        load_dataset(cfg, "train", process_index=0, process_count=1)
