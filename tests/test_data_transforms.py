"""Transforms, buckets and batch grouping, checked by hand and against official DETR's arithmetic."""
import numpy as np
import pytest
import tensorflow as tf

from detr_jax.config import data_config
from detr_jax.data.buckets import assign_buckets, default_buckets, padding_fraction
from detr_jax.data.pipeline import group_into_batches, rank_in_batch, steps_per_epoch
from detr_jax.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, NUM_DRAWS, Params, decode_rgb, eval_params,
                                      normalize_and_pad, resample_image, resized_size, train_params, transform_boxes,
                                      uniforms)


def official_size(h, w, size, max_size=None):
    """facebookresearch/detr datasets/transforms.py get_size_with_aspect_ratio, as plain Python."""
    if max_size is not None:
        mn, mx = float(min(w, h)), float(max(w, h))
        if mx / mn * size > max_size:
            size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def params(flip, crop, resize1, crop_box, size, orig):
    """Params of one image from hand-chosen values (region as train_params maps the crop back)."""
    h, w = orig
    top, left, ch, cw = crop_box
    sy, sx = h / resize1[0], w / resize1[1]
    region = [top * sy, left * sx, ch * sy, cw * sx] if crop else [0, 0, h, w]
    return Params(flip=np.array([flip]), region=np.array([region], float), size=np.array([size]),
                  crop=np.array([crop]), resize1=np.array([resize1]), crop_box=np.array([crop_box]))


def test_resized_size_matches_official():
    rng = np.random.default_rng(0)
    h, w = rng.integers(1, 3000, 500), rng.integers(1, 3000, 500)
    size = rng.choice([480, 512, 800], 500)
    got_h, got_w = resized_size(h, w, size, 1333)
    expected = np.array([official_size(int(a), int(b), int(s), 1333) for a, b, s in zip(h, w, size)])
    np.testing.assert_array_equal(np.stack([got_h, got_w], 1), expected)
    # by hand: 480x640 -> 800x1066; a 1:10 strip is capped by max_size: round(1333 * 100 / 1000) = 133
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(100, 1000, 800, 1333) == (133, 1330)
    assert resized_size(800, 600, 800) == (1066, 800)


def test_uniforms_are_stateless_per_key():
    a = uniforms(3, 7, [5, 9, 11], NUM_DRAWS)
    b = uniforms(3, 7, [11, 5], NUM_DRAWS)
    np.testing.assert_array_equal(a[[2, 0]], b)
    assert a.min() >= 0 and a.max() < 1
    assert not np.allclose(uniforms(3, 8, [5], 4), uniforms(3, 7, [5], 4))
    assert not np.allclose(uniforms(4, 7, [5], 4), uniforms(3, 7, [5], 4))
    big = uniforms(0, 0, np.arange(20000), 2)
    assert abs(big.mean() - 0.5) < 0.01 and abs(np.corrcoef(big.T)[0, 1]) < 0.03


def test_boxes_after_flip_and_resize_by_hand():
    # image h=100, w=200; box x 20..60, y 10..50. Flip: x -> 140..180. Resize 100x200 -> 50x100 (x0.5):
    # x 70..90, y 5..25 -> cxcywh (80, 15, 20, 20) / (100, 50)
    orig = np.array([[100, 200]])
    p = params(True, False, (100, 200), (0, 0, 100, 200), (50, 100), (100, 200))
    boxes, keep = transform_boxes([[20, 10, 60, 50]], np.array([0]), orig, p)
    np.testing.assert_allclose(boxes, [[0.8, 0.3, 0.2, 0.4]], atol=1e-6)
    assert keep.all()


def test_boxes_after_crop_by_hand():
    # resize to 80x160 (x0.8): box -> x 16..48, y 8..40; crop top 20, left 30, 40x60: x -14..18, y -12..20,
    # clipped to x 0..18, y 0..20; resize crop 40x60 -> 20x30 (x0.5): x 0..9, y 0..10 -> (4.5, 5, 9, 10) / (30, 20).
    # Second box, x 150..190 y 90..99 -> x 90..122 y 52..59.2 after the crop shift: outside, dropped.
    orig = np.array([[100, 200]])
    p = params(False, True, (80, 160), (20, 30, 40, 60), (20, 30), (100, 200))
    boxes, keep = transform_boxes([[20, 10, 60, 50], [150, 90, 190, 99]], np.array([0, 0]), orig, p)
    np.testing.assert_allclose(boxes[0], [0.15, 0.25, 0.3, 0.5], atol=1e-6)
    assert keep.tolist() == [True, False]
    # flip first: x 140..180 -> x0.8 112..144; crop left 100: x 12..44, y -12..20 -> clip y 0..20;
    # x0.5: x 6..22, y 0..10 -> (14, 5, 16, 10) / (30, 20)
    p = params(True, True, (80, 160), (20, 100, 40, 60), (20, 30), (100, 200))
    boxes, keep = transform_boxes([[20, 10, 60, 50]], np.array([0]), orig, p)
    np.testing.assert_allclose(boxes[0], [14 / 30, 0.25, 16 / 30, 0.5], atol=1e-6)


def test_train_params_follow_the_draws():
    cfg = data_config(train_scales=(20, 40), train_max_size=1000, crop_resize_scales=(80, 90), crop_min_size=30,
                      crop_max_size=60)
    u = np.zeros((2, NUM_DRAWS))
    u[0] = [0.9, 0.9, 0.0, 0, 0, 0, 0, 0]  # no flip, no crop, first scale
    u[1] = [0.1, 0.1, 0.99, 0.0, 0.999, 0.0, 0.999, 0.0]  # flip, crop: resize 80, h max, w min, bottom, left
    p = train_params(u, np.array([[100, 200], [100, 200]]), cfg)
    assert p.flip.tolist() == [False, True] and p.crop.tolist() == [False, True]
    assert p.size[0].tolist() == [20, 40]
    np.testing.assert_array_equal(p.region[0], [0, 0, 100, 200])
    # resize1 80x160; crop h = randint(30, min(80, 60)) at u=.999 -> 60, w = 30; top = 80 - 60 = 20, left 0
    assert p.resize1[1].tolist() == [80, 160] and p.crop_box[1].tolist() == [20, 0, 60, 30]
    np.testing.assert_allclose(p.region[1], [25, 0, 75, 37.5])
    assert tuple(p.size[1]) == official_size(60, 30, 40, 1000) == (80, 40)


def test_train_params_stay_in_range():
    cfg = data_config()
    rng = np.random.default_rng(1)
    orig = np.stack([rng.integers(50, 1500, 3000), rng.integers(50, 1500, 3000)], 1)
    p = train_params(uniforms(0, 0, np.arange(3000), NUM_DRAWS), orig, cfg)
    assert 0.4 < p.flip.mean() < 0.6 and 0.4 < p.crop.mean() < 0.6
    assert (p.region[:, :2] >= 0).all() and (p.region[:, 0] + p.region[:, 2] <= orig[:, 0] + 1e-9).all()
    assert (p.region[:, 1] + p.region[:, 3] <= orig[:, 1] + 1e-9).all()
    crop_hw = p.crop_box[p.crop, 2:]
    assert (crop_hw >= 384).all() and (crop_hw <= 600).all()
    # short side one of the scales, unless the long side was capped at 1333 (to rounding: half the aspect ratio)
    short, long = p.size.min(1), p.size.max(1)
    resized_from = np.where(p.crop[:, None], p.crop_box[:, 2:], orig)
    aspect = resized_from.max(1) / resized_from.min(1)
    assert (np.isin(short, cfg.train_scales) | (np.abs(long - 1333) <= 0.5 * aspect + 1)).all()
    assert (short <= 800).all() and (long <= 1333 + 0.5 * aspect + 1).all()


def test_eval_params():
    p = eval_params(np.array([[480, 640], [640, 427]]), data_config())
    assert p.size.tolist() == [[800, 1066], [1199, 800]] and not p.flip.any() and not p.crop.any()


def bright_extent(image, axis):
    """Rows (axis 1) or columns (axis 0) whose mean brightness is above half: (first, last + 1)."""
    profile = image.mean(axis=(axis, 2))
    inside = np.flatnonzero(profile > 0.5 * profile.max())
    return inside[0], inside[-1] + 1


@pytest.mark.parametrize("flip,crop", [(False, False), (True, False), (False, True), (True, True)])
def test_pixels_follow_boxes(flip, crop):
    """A white rectangle lands where its transformed box says, to within a pixel."""
    h, w, box = 100, 200, np.array([40.0, 30.0, 120.0, 70.0])
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[30:70, 40:120] = 255
    p = params(flip, crop, (80, 160), (10, 20, 60, 120), (90, 180) if crop else (60, 120), (h, w))
    (cx, cy, bw, bh), = transform_boxes(box[None], np.array([0]), np.array([[h, w]]), p)[0]
    out = resample_image(tf.constant(pixels), tf.constant([h, w]), tf.constant(flip),
                         tf.constant(p.region[0], tf.float32), tf.constant(p.size[0], tf.int32)).numpy()
    out_h, out_w = p.size[0]
    x0, x1 = bright_extent(out, 0)
    y0, y1 = bright_extent(out, 1)
    np.testing.assert_allclose([x0, x1], [(cx - bw / 2) * out_w, (cx + bw / 2) * out_w], atol=1.0)
    np.testing.assert_allclose([y0, y1], [(cy - bh / 2) * out_h, (cy + bh / 2) * out_h], atol=1.0)


def test_resample_follows_the_annotated_frame():
    """A file twice the annotated size: the region is scaled, so the content lands in the same place."""
    small = np.zeros((50, 100, 3), np.uint8)
    small[10:30, 20:60] = 255
    big = np.repeat(np.repeat(small, 2, 0), 2, 1)
    args = (tf.constant([50, 100]), tf.constant(False), tf.constant([5.0, 10.0, 40.0, 80.0]), tf.constant([40, 80]))
    for image in (small, big):
        out = resample_image(tf.constant(image), *args).numpy()
        assert out.shape == (40, 80, 3)
        assert bright_extent(out, 0) == (10, 50) and bright_extent(out, 1) == (5, 25)


def test_normalize_and_pad():
    image = tf.fill([2, 3, 3], 255.0)
    out, mask = normalize_and_pad(image, tf.constant([4, 5]))
    assert out.shape == (4, 5, 3) and mask.shape == (4, 5)
    expected = (1.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    np.testing.assert_allclose(out[:2, :3].numpy(), np.broadcast_to(expected, (2, 3, 3)), rtol=1e-6)
    assert not out[2:].numpy().any() and not out[:, 3:].numpy().any()
    assert not mask[:2, :3].numpy().any() and mask[2:].numpy().all() and mask[:, 3:].numpy().all()


def test_decode_rgb_converts_grayscale_rgba_and_16_bit():
    gray = np.full((4, 5, 1), 200, np.uint8)
    rgba = np.concatenate([np.full((4, 5, 3), 30, np.uint8), np.zeros((4, 5, 1), np.uint8)], -1)
    deep = np.full((4, 5, 3), 257 * 99, np.uint16)
    for encoded, value in ((tf.io.encode_png(gray), 200), (tf.io.encode_jpeg(gray, quality=100), 200),
                           (tf.io.encode_png(rgba), 30), (tf.io.encode_png(deep), 99)):
        out = decode_rgb(encoded).numpy()
        assert out.shape == (4, 5, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(out, value, atol=1)


def test_default_buckets_official():
    buckets = default_buckets(data_config())
    assert len(buckets) == 10 and all(h % 32 == 0 and w % 32 == 0 for h, w in buckets)
    assert (640, 640) in buckets and (800, 1344) in buckets and (1344, 800) in buckets
    cfg = data_config(train_scales=(96, 128, 160), train_max_size=250, eval_size=160, eval_max_size=250,
                      size_divisor=16)
    small = default_buckets(cfg)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in small) and max(max(b) for b in small) == 256


def test_default_buckets_hold_every_transformed_image_with_little_padding():
    cfg = data_config()
    rng = np.random.default_rng(2)
    orig = np.stack([rng.integers(200, 700, 4000), rng.integers(200, 700, 4000)], 1)
    sizes = np.concatenate([train_params(uniforms(1, 0, np.arange(4000), NUM_DRAWS), orig, cfg).size,
                            eval_params(orig, cfg).size])
    _, _, shrunk = assign_buckets(sizes, default_buckets(cfg))
    assert not shrunk.any()
    assert padding_fraction(sizes, default_buckets(cfg)) < 0.5 * padding_fraction(sizes, [(1344, 1344)])


def test_assign_buckets_smallest_containing_and_shrink():
    buckets = np.array([[64, 64], [64, 128], [128, 64]])
    bucket, sizes, shrunk = assign_buckets([[60, 60], [64, 65], [100, 40], [60, 200], [300, 300]], buckets)
    assert bucket[:4].tolist() == [0, 1, 2, 1] and shrunk.tolist() == [False, False, False, True, True]
    assert sizes[3].tolist() == [38, 128]  # 60x200 scaled by 128/200 to fit 64x128
    assert (sizes[4] <= buckets[bucket[4]]).all() and (sizes[4] >= 63).all()


def test_group_into_batches():
    # buckets in arrival order; batch size 2
    bucket = [0, 1, 0, 1, 1, 0, 2, 1]
    batch, num_full = group_into_batches(bucket, 2)
    # full batches by arrival of their last image: bucket 0 {0, 2} at 2, bucket 1 {1, 3} at 3,
    # bucket 1 {4, 7} at 7; then partial: bucket 0 {5}, bucket 2 {6}
    assert num_full == 3
    assert batch.tolist() == [0, 1, 0, 1, 2, 3, 4, 2]
    batch, num_full = group_into_batches([], 4)
    assert batch.shape == (0,) and num_full == 0


def test_rank_in_batch():
    # the batches of test_group_into_batches: positions within each batch in arrival order
    assert rank_in_batch([0, 1, 0, 1, 2, 3, 4, 2]).tolist() == [0, 0, 1, 1, 0, 0, 0, 1]
    assert rank_in_batch([]).tolist() == []


def test_steps_per_epoch():
    assert steps_per_epoch(100, 4, 3) == 23  # ceil((100 - 3 * 3) / 4): 91 images in full batches at least
    assert steps_per_epoch(10, 4, 3) == 1  # worst split 3 + 3 + 4 still fills one batch
    assert steps_per_epoch(8, 8, 1) == 1  # one bucket: every image in it
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        steps_per_epoch(8, 4, 3)  # 3 + 3 + 2 fills none
