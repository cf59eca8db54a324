"""EXIF orientation: the annotated size decides whether the tag applies; config.data.exif decides
where it cannot; every case is counted in the data report."""
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from detr_jax.config import data_config
from detr_jax.data import eval_batches
from detr_jax.data.transforms import (EXIF_APPLIED, EXIF_BY_SETTING, EXIF_IGNORED, EXIF_NONE, IMAGENET_MEAN,
                                      IMAGENET_STD, decode_rgb, exif_orient, exif_orientation)

RED = (220, 20, 20)


def jpeg_with_orientation(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def shown_to_stored(shown: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that a viewer honouring ``orientation`` shows ``shown``: the
    inverse of PIL's exif_transpose for that tag."""
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    return np.asarray(Image.fromarray(shown).transpose(inverse[orientation])) if orientation > 1 else shown


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_turn_is_pils_exif_transpose(orientation):
    stored = np.random.RandomState(orientation).randint(0, 256, (24, 40, 3)).astype(np.uint8)
    data = jpeg_with_orientation(stored, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    tag = exif_orientation(tf.constant(data))
    assert int(tag) == orientation
    shown, case = exif_orient(decode_rgb(tf.constant(data)), tag, tf.constant(expected.shape[:2], tf.int32),
                              apply_when_unsure=True)
    np.testing.assert_array_equal(shown.numpy(), expected)  # the same pixels (PIL-exact JPEG decoding)
    swaps = orientation >= 5
    assert int(case) == (EXIF_NONE if orientation == 1 else EXIF_APPLIED if swaps else EXIF_BY_SETTING)


def test_which_frame_by_size():
    stored = np.zeros((24, 40, 3), np.uint8)
    data = tf.constant(jpeg_with_orientation(stored, 6))
    pixels, tag = decode_rgb(data), exif_orientation(data)
    for annotated, unsure, shape, case in (((40, 24), False, (40, 24), EXIF_APPLIED),  # displayed frame: turned
                                           ((24, 40), True, (24, 40), EXIF_IGNORED),  # stored frame (COCO): kept
                                           ((30, 30), False, (24, 40), EXIF_BY_SETTING),  # neither: the setting
                                           ((30, 30), True, (40, 24), EXIF_BY_SETTING)):
        out, got = exif_orient(pixels, tag, tf.constant(annotated, tf.int32), unsure)
        assert tuple(out.shape[:2]) == shape and int(got) == case
    assert int(exif_orientation(tf.constant(b"\x89PNG not a jpeg"))) == 1
    assert int(exif_orientation(tf.constant(jpeg_with_orientation(stored, 1)[:2] + b"\xff\xe1garbage"))) == 1


def write_photos(root):
    """Three photos of a red square, each with a tag: a portrait taken sideways (tag 6) annotated in
    its displayed frame, the same annotated in its stored frame, and a square one (tag 6)."""
    def scene(h, w, box):
        image = np.full((h, w, 3), 200, np.uint8)
        x, y, bw, bh = box
        image[y:y + bh, x:x + bw] = RED
        return image

    (root / "images").mkdir()
    shown_box, square_box = [8, 40, 24, 16], [6, 30, 20, 12]
    photos = {
        "portrait.jpg": (jpeg_with_orientation(shown_to_stored(scene(96, 48, shown_box), 6), 6), (96, 48), shown_box),
        "coco_like.jpg": (jpeg_with_orientation(scene(48, 96, [40, 8, 16, 24]), 6), (48, 96), [40, 8, 16, 24]),
        "square.jpg": (jpeg_with_orientation(shown_to_stored(scene(64, 64, square_box), 6), 6), (64, 64), square_box),
    }
    images, annotations = [], []
    for i, (name, (data, (h, w), box)) in enumerate(photos.items(), 1):
        (root / "images" / name).write_bytes(data)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        annotations.append({"id": i, "image_id": i, "bbox": box, "category_id": 1, "iscrowd": 0})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "red"}]}))
    return str(path), str(root / "images")


def redness_in_boxes(cfg) -> dict:
    """file name -> the mean of (R - G) inside its box on the eval image, in pixel levels."""
    batches = eval_batches(cfg, 4, process_index=0, process_count=1)
    batch = next(batches)
    names = dict(zip(batches.source.records.image_id.tolist(), batches.source.records.file_name))
    found = {}
    for i in np.flatnonzero(batch["example_valid"]):
        h, w = batch["size"][i]
        cx, cy, bw, bh = batch["boxes"][i][0] * [w, h, w, h]
        crop = batch["image"][i][int(cy - bh / 2) + 1:int(cy + bh / 2) - 1, int(cx - bw / 2) + 1:int(cx + bw / 2) - 1]
        rgb = crop * np.float32(IMAGENET_STD) * 255 + np.float32(IMAGENET_MEAN) * 255
        found[names[int(batch["image_id"][i])]] = float((rgb[..., 0] - rgb[..., 1]).mean())
    return found, batches.report


@pytest.mark.parametrize("policy", ["ignore", "apply"])
def test_boxes_cover_their_object_and_each_case_is_counted(tmp_path, policy):
    annotations, images = write_photos(tmp_path)
    cfg = data_config(source="coco_json", train_annotations=annotations, train_images=images,
                      val_annotations=annotations, val_images=images, eval_size=64, eval_max_size=128,
                      buckets=((128, 128),), exif=policy)
    redness, report = redness_in_boxes(cfg)
    assert redness["portrait.jpg"] > 150 and redness["coco_like.jpg"] > 150  # the box is on the red square
    assert (redness["square.jpg"] > 150) == (policy == "apply")  # the setting decides
    assert report.counts["exif_applied"] == 1 and report.examples["exif_applied"] == ["portrait.jpg"]
    assert report.counts["exif_ignored"] == 1 and report.examples["exif_ignored"] == ["coco_like.jpg"]
    assert report.counts["exif_by_setting"] == 1 and report.examples["exif_by_setting"] == ["square.jpg"]
    assert "size_mismatch" not in report.counts  # no more stretching to the annotated frame
