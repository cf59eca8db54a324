"""The built-in synthetic dataset: deterministic, COCO-format, varied, written atomically."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO

from conftest import REPO
from detr_jax.data import synthetic
from detr_jax.data.synthetic import CLASSES, Spec, ensure_synthetic, generate

SPEC = Spec(num_train=40, num_val=8, seed=5, min_size=64, max_size=128)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synthetic") / "shapes"), SPEC)


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_layout_and_coco_format(dataset):
    assert sorted(os.listdir(dataset)) == ["annotations", "synthetic.json", "train", "val"]
    coco = COCO(os.path.join(dataset, "annotations", "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 40 and len(os.listdir(os.path.join(dataset, "train"))) == 40
    names = {im["file_name"] for im in coco.dataset["images"]}
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "png"}
    for ann in coco.dataset["annotations"]:
        im = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    assert len(COCO(os.path.join(dataset, "annotations", "instances_val.json")).getImgIds()) == 8


def test_variety(dataset):
    with open(os.path.join(dataset, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    sizes = np.array([(im["height"], im["width"]) for im in data["images"]])
    assert sizes.min() >= 64 and sizes.max() <= 128 and len({tuple(s) for s in sizes}) > 30
    aspect = sizes[:, 1] / sizes[:, 0]
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    assert per_image.max() <= 12 and per_image.mean() > 2
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, 6))
    area = np.array([a["bbox"][2] * a["bbox"][3] for a in data["annotations"]])
    assert area.max() > 8 * area.min()


def test_object_count_and_scale_follow_the_spec():
    spec = Spec(min_size=64, max_size=96, max_objects=3, object_scale=(0.3, 0.5))
    for i in range(40):
        pixels, objects = synthetic.render(np.random.default_rng([0, 0, i]), spec)
        short = min(pixels.shape[:2])
        assert len(objects) <= 3
        for _, (_, _, w, h), _ in objects:  # side = short * U(0.3, 0.5), stretched by sqrt(0.7..1.4)
            assert 0.3 * short * 0.7 ** 0.5 - 2 <= max(w, h) <= 0.5 * short * 1.4 ** 0.5 + 1


def test_some_images_are_empty():
    rng_counts = [len(synthetic.render(np.random.default_rng([0, 0, i]), Spec(min_size=64, max_size=96))[1])
                  for i in range(120)]
    assert 0 in rng_counts and max(rng_counts) >= 8


def test_files_hold_the_rendered_images_and_boxes(dataset):
    import tensorflow as tf

    with open(os.path.join(dataset, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    im = next(im for im in data["images"] if im["file_name"].endswith(".png"))  # lossless: compare pixels
    pixels = tf.io.decode_png(tf.io.read_file(os.path.join(dataset, "train", im["file_name"]))).numpy()
    expected, objects = synthetic.render(np.random.default_rng([SPEC.seed, 0, im["id"] - 1]), SPEC)
    np.testing.assert_array_equal(pixels, expected)
    anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
    assert [(a["category_id"] - 1, tuple(a["bbox"]), a["area"]) for a in anns] == objects


def test_deterministic(dataset, tmp_path):
    again = generate(str(tmp_path / "again"), SPEC)
    assert digest(again) == digest(dataset)
    other = generate(str(tmp_path / "other"), Spec(num_train=40, num_val=8, seed=6, min_size=64, max_size=128))
    assert digest(other) != digest(dataset)
    # image i does not depend on how many images are generated
    fewer = generate(str(tmp_path / "fewer"), Spec(num_train=3, num_val=1, seed=5, min_size=64, max_size=128))
    for name in os.listdir(os.path.join(fewer, "train")):
        with open(os.path.join(fewer, "train", name), "rb") as a, open(os.path.join(dataset, "train", name), "rb") as b:
            assert a.read() == b.read()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    original = synthetic._write_split
    monkeypatch.setattr(synthetic, "_write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(str(tmp_path / "half"), Spec(num_train=3, num_val=2))
    assert os.listdir(tmp_path) == []


def test_ensure_generates_once_and_checks_the_spec(tmp_path):
    out, spec = str(tmp_path / "data"), Spec(num_train=4, num_val=2, seed=1)
    assert ensure_synthetic(out, spec) == out
    stamp = os.path.getmtime(os.path.join(out, "synthetic.json"))
    assert ensure_synthetic(out, spec) == out
    assert os.path.getmtime(os.path.join(out, "synthetic.json")) == stamp
    for other in (Spec(num_train=5, num_val=2, seed=1), Spec(num_train=4, num_val=2, seed=1, max_objects=3),
                  Spec(num_train=4, num_val=2, seed=1, object_scale=(0.2, 0.5))):
        with pytest.raises(ValueError, match="generated with"):
            ensure_synthetic(out, other)
    os.makedirs(tmp_path / "other")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        ensure_synthetic(str(tmp_path / "other"), spec)
    with pytest.raises(FileExistsError):
        generate(out, Spec(num_train=4, num_val=2, seed=1))


def test_cli(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "detr_jax.data.synthetic", *args], cwd=REPO,
                                       capture_output=True, text=True, timeout=300)
    result = run("--help")
    assert result.returncode == 1 and "--num_train" in result.stdout and "--seed" in result.stdout  # absl's --help
    out = tmp_path / "cli"
    result = run("--out", str(out), "--num_train", "3", "--num_val", "2", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert len(os.listdir(out / "train")) == 3 and len(os.listdir(out / "val")) == 2
    with open(out / "synthetic.json") as f:
        assert json.load(f)["seed"] == 4
    result = run("--out", str(out))
    assert result.returncode == 2 and f"error: {out} exists" in result.stderr and "Traceback" not in result.stderr
    result = run("--out", str(tmp_path / "bad"), "--object_scale=0.5")
    assert result.returncode == 2 and "error: --object_scale=0.5: expected MIN,MAX" in result.stderr


def test_eval_split_train_evaluates_the_training_images(dataset):
    from detr_jax.config import data_config
    from detr_jax.data import load_dataset

    config = data_config(source="synthetic", data_dir=str(dataset), synthetic_num_train=SPEC.num_train,
                         synthetic_num_val=SPEC.num_val, synthetic_seed=SPEC.seed)
    val = load_dataset(config, "val", process_index=0, process_count=1)
    config.eval_split = "train"
    on_train = load_dataset(config, "val", process_index=0, process_count=1)
    train = load_dataset(config, "train", process_index=0, process_count=1)
    assert val.info.num_images == SPEC.num_val and on_train.info.num_images == SPEC.num_train
    np.testing.assert_array_equal(on_train.records.image_id, train.records.image_id)
    assert on_train.ground_truth()["annotations"] == train.ground_truth()["annotations"]
