"""A soak: every kind of bad input mixed into 200 good images trains the tiny model for 50 steps and
evaluates, with no crash, no NaN, and every bad item named in the data report; and bad annotations
that leave the schedule's images unchanged leave the run unchanged (the same AP)."""
import io
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO
from detr_jax.data.synthetic import Spec, generate
from test_train import read_history

STEPS = 50


def load_config(annotations, images, val_root, steps=STEPS):
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "synthetic.py"))["get_config"]("tiny")
    config.data.update(source="coco_json", train_annotations=str(annotations), train_images=str(images),
                       val_annotations=str(val_root / "annotations" / "instances_val.json"),
                       val_images=str(val_root / "val"), max_boxes=8, unknown_category="skip")
    config.model.num_classes = 6  # labels are the synthetic category ids 1..5
    config.train.update(num_steps=steps, log_every_steps=10, checkpoint_every_steps=steps, eval_at_end=True)
    return config


def jpeg(pixels, orientation=None) -> bytes:
    out, exif = io.BytesIO(), Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def annotation_mistakes(dataset, next_id):
    """Bad annotations on good images, and entries of missing files: none of them changes which
    images the schedule sees. -> (annotations, images) to add, and the report kind of each."""
    first = dataset["images"][0]["id"]
    bad = [([float("nan"), 4, 10, 10], 1, 0, "degenerate_box"), ([4, 4, 0, 9], 1, 0, "degenerate_box"),
           ([5000, 5, 10, 10], 1, 0, "outside_box"), ([4, 4, 10, 10], 99, 0, "unknown_category"),
           ([2, 2, 30, 30], 1, 1, "crowd_excluded")]
    annotations = [{"id": next_id + k, "image_id": first, "bbox": b, "category_id": c, "iscrowd": crowd}
                   for k, (b, c, crowd, _) in enumerate(bad)]
    missing = {"id": 10_000, "file_name": "missing.jpg", "height": 64, "width": 64}
    annotations.append({"id": next_id + len(bad), "image_id": 10_000, "bbox": [1, 1, 9, 9], "category_id": 1,
                        "iscrowd": 0})
    return annotations, [missing], [kind for *_, kind in bad] + ["missing_image"]


def bad_files(folder, next_id):
    """Files that are bad, odd, or both, each with an annotation -> (images, annotations, kinds)."""
    rng = np.random.RandomState(5)
    smooth = rng.randint(0, 255, (60, 80, 3)).astype(np.uint8)
    files = {
        "corrupt.jpg": (b"this is not an image", (60, 80), "unreadable_image"),
        "truncated.jpg": (jpeg(smooth)[:300], (60, 80), "unreadable_image"),
        "png_as.jpg": (tf.io.encode_png(smooth).numpy(), (60, 80), None),
        "gray.png": (tf.io.encode_png(smooth[..., :1]).numpy(), (60, 80), None),
        "rgba.png": (tf.io.encode_png(np.concatenate([smooth, smooth[..., :1]], -1)).numpy(), (60, 80), None),
        "deep.png": (tf.io.encode_png(smooth.astype(np.uint16) * 257).numpy(), (60, 80), None),
        "ünïcode.jpg": (jpeg(smooth), (60, 80), None),
        "tiny.png": (tf.io.encode_png(smooth[:1, :1]).numpy(), (1, 1), "degenerate_box"),
        "wide.jpg": (jpeg(np.zeros((300, 5000, 3), np.uint8)), (300, 5000), "shrunk_to_bucket"),
        "sideways.jpg": (jpeg(np.ascontiguousarray(np.rot90(smooth)), 6), (60, 80), "exif_applied"),
        "crowded.jpg": (jpeg(smooth), (60, 80), "over_max_boxes"),
        "mismatch.png": (tf.io.encode_png(np.repeat(smooth, 2, 0)).numpy(), (60, 80), "size_mismatch"),
    }
    images, annotations, kinds = [], [], []
    for k, (name, (data, (h, w), kind)) in enumerate(files.items()):
        (folder / name).write_bytes(data)
        image_id = 20_000 + k
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        boxes = [[2 + 2 * j, 2 + j, 10, 8] for j in range(12)] if name == "crowded.jpg" else [[4, 4, 20, 16]]
        annotations += [{"id": next_id + len(annotations), "image_id": image_id, "bbox": b, "category_id": 2,
                         "iscrowd": 0} for b in boxes]
        kinds += [kind] if kind else []
    return images, annotations, kinds


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    generate(str(root / "good"), Spec(num_train=200, num_val=16, seed=3, min_size=64, max_size=128, max_objects=4))
    clean = json.loads((root / "good" / "annotations" / "instances_train.json").read_text())
    next_id = 1 + max(a["id"] for a in clean["annotations"])
    notes, missing, note_kinds = annotation_mistakes(clean, next_id)
    with_notes = {**clean, "images": clean["images"] + missing, "annotations": clean["annotations"] + notes}
    images = root / "all_images"
    shutil.copytree(root / "good" / "train", images)
    files, file_annotations, file_kinds = bad_files(images, next_id + 100)
    everything = {**with_notes, "images": with_notes["images"] + files,
                  "annotations": with_notes["annotations"] + file_annotations}
    paths = {}
    for name, dataset in (("clean", clean), ("notes", with_notes), ("everything", everything)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(dataset))
    return root, paths, images, note_kinds + file_kinds


def train(root, annotations, images, name, steps=STEPS):
    from detr_jax.training import train_and_evaluate

    workdir = root / "runs" / name
    train_and_evaluate(load_config(annotations, images, root / "good", steps), workdir)
    return workdir


def test_every_bad_case_trains_evaluates_and_is_named(datasets):
    from detr_jax.data import load_dataset

    root, paths, images, kinds = datasets
    workdir = train(root, paths["everything"], images, "everything")
    history = read_history(workdir)
    assert history[-1]["step"] == STEPS and all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)
    (evaluation,) = read_history(workdir, "eval")
    assert 0 <= evaluation["AP"] <= 1 and np.isfinite(evaluation["val_loss"])
    config = load_config(paths["everything"], images, root / "good")
    source = load_dataset(config.data, "train", process_index=0, process_count=1)
    from detr_jax.data import train_batches

    batches = train_batches(config.data, 4, seed=0, source=source)
    for _ in range(batches.num_batches):  # one epoch: every image decoded once
        next(batches)
    assert set(kinds) <= set(source.report.counts), sorted(set(kinds) - set(source.report.counts))
    named = " ".join(" ".join(v) for v in source.report.examples.values())
    for name in ("corrupt.jpg", "truncated.jpg", "missing.jpg", "sideways.jpg", "crowded.jpg", "wide.jpg",
                 "mismatch.png", "tiny.png"):
        assert name in named, name


def test_bad_annotations_leave_the_run_unchanged(datasets):
    """The same 200 images scheduled: NaN, zero-size and outside boxes, an unknown category, a crowd
    box and a missing file change nothing, down to the AP and the val loss (20 steps: equality does
    not need more)."""
    root, paths, _, _ = datasets
    clean = read_history(train(root, paths["clean"], root / "good" / "train", "clean", 20), "eval")[-1]
    notes = read_history(train(root, paths["notes"], root / "good" / "train", "notes", 20), "eval")[-1]
    assert clean["AP"] == notes["AP"] and clean["val_loss"] == notes["val_loss"], (clean, notes)
