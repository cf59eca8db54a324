"""The official DETR transforms, split into geometry (numpy) and pixels (TensorFlow).

Every random choice is drawn here, in numpy, as a stateless function of (seed, epoch, image id)
(``uniforms``), before any image is read. A transform is then a handful of numbers per image
(``Params``): a horizontal flip, a region of the (flipped) original image and the output size. The
boxes follow the official step-by-step arithmetic (``transform_boxes``); the pixels are resampled
once, region to output size, with an antialiased bilinear kernel (``resample_image``); a panoptic
segment-id map (``decode_segment_ids``) is sampled nearest, at the same pixel centres
(``resample_segments``), so masks move exactly with the image. The official
crop branch resizes twice (to 400/500/600, crop, to the final size): here the crop is mapped back to
the original image, so the geometry is the same and the image is interpolated only once.

Train (official ``make_coco_transforms('train')``): flip with ``flip_prob``; then with probability
``1 - crop_prob`` resize the short side to one of ``train_scales`` (long side at most
``train_max_size``), otherwise resize the short side to one of ``crop_resize_scales``, crop a random
region of ``crop_min_size..crop_max_size`` pixels per side and resize that as above. Eval: short side
``eval_size``, long side at most ``eval_max_size``. Targets are (cx, cy, w, h) normalised by the
output (unpadded) size.
"""
import dataclasses

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# columns of the uniform draws of one image in one epoch
_FLIP, _CROP, _SCALE, _CROP_SCALE, _CROP_H, _CROP_W, _CROP_TOP, _CROP_LEFT = range(8)
NUM_DRAWS = 8


def _mix64(x):
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, keys, num: int) -> np.ndarray:
    """Counter-based uniform draws in [0, 1): keys [N] int -> [N, num] float64.

    Row i depends only on (seed, epoch, keys[i]), never on the other keys or their order, so an
    image gets the same augmentation whatever host, batch or resume position it is read from.
    """
    with np.errstate(over="ignore"):
        state = _mix64(np.asarray([seed], np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        state = _mix64(state ^ np.asarray([epoch], np.int64).astype(np.uint64))
        keyed = _mix64(state ^ np.asarray(keys, np.int64).astype(np.uint64))[:, None]
        bits = _mix64(keyed ^ (np.arange(1, num + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def resized_size(h, w, size, max_size=None):
    """Official ``get_size_with_aspect_ratio``: short side ``size``, long side at most ``max_size``.

    h, w, size: int arrays (broadcast) -> (out_h, out_w) int64 arrays.
    """
    h, w, size = (np.asarray(v, np.float64) for v in np.broadcast_arrays(h, w, size))
    if max_size is not None:
        short, long = np.minimum(h, w), np.maximum(h, w)
        size = np.where(long / short * size > max_size, np.round(max_size * short / long), size)
    unchanged = np.minimum(h, w) == size
    out_h = np.where(w < h, np.floor(size * h / w), size)
    out_w = np.where(w < h, size, np.floor(size * w / h))
    return np.where(unchanged, h, out_h).astype(np.int64), np.where(unchanged, w, out_w).astype(np.int64)


def _choice(values, u):
    """values [K], u [N] in [0, 1) -> [N], each of values with equal chance."""
    values = np.asarray(values)
    return values[np.minimum((u * len(values)).astype(np.int64), len(values) - 1)]


def _randint(low, high, u):
    """Inclusive integer in [low, high] per element (Python's random.randint)."""
    return low + np.minimum(np.floor(u * (high - low + 1)), high - low).astype(np.int64)


@dataclasses.dataclass
class Params:
    """Per-image transform, arrays over N images (original size [N, 2] = (h, w)).

    flip [N] bool: mirror the original first. region [N, 4] float64 (y, x, h, w): the part of the
    flipped original that becomes the output, in original pixels. size [N, 2] int64: output (h, w).
    crop [N] bool: the official crop branch was taken; then resize1 [N, 2] is the first resize
    (h1, w1) and crop_box [N, 4] int64 (top, left, h, w) the crop in that resized frame.
    """
    flip: np.ndarray
    region: np.ndarray
    size: np.ndarray
    crop: np.ndarray
    resize1: np.ndarray
    crop_box: np.ndarray

    def take(self, rows) -> "Params":
        """The params of images ``rows`` (an index array)."""
        return Params(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def train_params(u, orig_size, cfg) -> Params:
    """Official train augmentation drawn from u [N, NUM_DRAWS] for images orig_size [N, 2]."""
    h, w = orig_size[:, 0].astype(np.int64), orig_size[:, 1].astype(np.int64)
    flip = u[:, _FLIP] < cfg.flip_prob
    crop = u[:, _CROP] < cfg.crop_prob
    h1, w1 = resized_size(h, w, _choice(cfg.crop_resize_scales, u[:, _CROP_SCALE]))
    crop_h = _randint(np.minimum(cfg.crop_min_size, h1), np.minimum(h1, cfg.crop_max_size), u[:, _CROP_H])
    crop_w = _randint(np.minimum(cfg.crop_min_size, w1), np.minimum(w1, cfg.crop_max_size), u[:, _CROP_W])
    top = _randint(0, h1 - crop_h, u[:, _CROP_TOP])
    left = _randint(0, w1 - crop_w, u[:, _CROP_LEFT])
    in_h, in_w = np.where(crop, crop_h, h), np.where(crop, crop_w, w)
    out_h, out_w = resized_size(in_h, in_w, _choice(cfg.train_scales, u[:, _SCALE]), cfg.train_max_size)
    sy, sx = h / h1, w / w1
    crop_region = np.stack([top * sy, left * sx, crop_h * sy, crop_w * sx], 1)
    full = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], 1).astype(np.float64)
    return Params(flip=flip, region=np.where(crop[:, None], crop_region, full),
                  size=np.stack([out_h, out_w], 1), crop=crop, resize1=np.stack([h1, w1], 1),
                  crop_box=np.stack([top, left, crop_h, crop_w], 1))


def eval_params(orig_size, cfg) -> Params:
    """The official eval transform (no randomness) for images orig_size [N, 2]."""
    h, w = orig_size[:, 0].astype(np.int64), orig_size[:, 1].astype(np.int64)
    out_h, out_w = resized_size(h, w, cfg.eval_size, cfg.eval_max_size)
    zeros = np.zeros_like(h)
    return Params(flip=zeros.astype(bool), region=np.stack([zeros, zeros, h, w], 1).astype(np.float64),
                  size=np.stack([out_h, out_w], 1), crop=zeros.astype(bool), resize1=np.stack([h, w], 1),
                  crop_box=np.stack([zeros, zeros, h, w], 1))


def transform_boxes(boxes, owner, orig_size, params: Params):
    """Boxes through flip, (resize, crop, clip, drop empty,) resize, as official; then cxcywh / size.

    boxes [T, 4] xyxy in original pixels, owner [T] the image (row of orig_size / params) of each box
    -> (boxes [T, 4] float32 (cx, cy, w, h) normalised by the output size, keep [T] bool: False for
    boxes the crop left empty).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = (orig_size[owner, i].astype(np.float64) for i in (0, 1))
    flip = params.flip[owner]
    b = np.where(flip[:, None], np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1), b)

    crop = params.crop[owner]
    h1, w1 = (params.resize1[owner, i].astype(np.float64) for i in (0, 1))
    top, left, ch, cw = (params.crop_box[owner, i].astype(np.float64) for i in range(4))
    cropped = b * np.stack([w1 / w, h1 / h, w1 / w, h1 / h], 1) - np.stack([left, top, left, top], 1)
    cropped = np.clip(cropped, 0.0, np.stack([cw, ch, cw, ch], 1))
    keep = ~crop | ((cropped[:, 2] > cropped[:, 0]) & (cropped[:, 3] > cropped[:, 1]))
    in_h, in_w = np.where(crop, ch, h), np.where(crop, cw, w)
    b = np.where(crop[:, None], cropped, b)

    out_h, out_w = (params.size[owner, i].astype(np.float64) for i in (0, 1))
    b = b * np.stack([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h], 1)
    cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    return (cxcywh / np.stack([out_w, out_h, out_w, out_h], 1)).astype(np.float32), keep


def resample_image(pixels, orig_size, flip, region, size):
    """The pixel side of a transform (TensorFlow, runs inside tf.data).

    pixels [h0, w0, 3] uint8; orig_size [2] int32, the annotated (h, w) that region refers to (when
    the file's size differs, region is scaled to it); flip bool; region [4] float32 (y, x, h, w);
    size [2] int32 output (h, w) -> [h, w, 3] float32 in [0, 255], antialiased bilinear, sampled at
    pixel centres (a box's edges and the image's move together).
    """
    pixels = tf.cond(flip, lambda: tf.image.flip_left_right(pixels), lambda: pixels)
    file_scale = tf.cast(tf.shape(pixels)[:2], tf.float32) / tf.cast(orig_size, tf.float32)
    region = region * tf.tile(file_scale, [2])
    scale = tf.cast(size, tf.float32) / region[2:]
    translation = -region[:2] * scale
    return tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(pixels, tf.float32)[None], size=size, scale=scale, translation=translation,
        kernel_type="triangle", antialias=True)[0]


def resample_segments(ids, orig_size, flip, region, size):
    """The segment-id side of a transform, nearest (TensorFlow, inside tf.data).

    ids [h0, w0] int32 (``decode_segment_ids``); orig_size, flip, region, size as ``resample_image``
    -> [h, w] int32: output pixel (i, j) takes the id of the flipped original's pixel
    (floor(y + (i + 0.5) h_r / h), floor(x + (j + 0.5) w_r / w)) for region (y, x, h_r, w_r): the
    source pixel under the output pixel's centre, as ``resample_image`` maps it.
    """
    ids = tf.cond(flip, lambda: tf.reverse(ids, [1]), lambda: ids)
    shape = tf.shape(ids)
    region = region * tf.tile(tf.cast(shape, tf.float32) / tf.cast(orig_size, tf.float32), [2])

    def sources(start, extent, out, limit):
        centres = (tf.range(out, dtype=tf.float32) + 0.5) * extent / tf.cast(out, tf.float32)
        return tf.clip_by_value(tf.cast(tf.floor(start + centres), tf.int32), 0, limit - 1)

    rows = sources(region[0], region[2], size[0], shape[0])
    cols = sources(region[1], region[3], size[1], shape[1])
    return tf.gather(tf.gather(ids, rows, axis=0), cols, axis=1)


def pad_segments(ids, canvas):
    """ids [h, w] int32, canvas [2] int32 -> [H, W] int32, 0 (void) on the bottom/right padding."""
    hw = tf.shape(ids)
    return tf.pad(ids, [[0, canvas[0] - hw[0]], [0, canvas[1] - hw[1]]])


def decode_segment_ids(data):
    """Encoded panoptic PNG bytes -> [h, w] int32 segment ids, R + 256 G + 256^2 B (panopticapi's
    ``rgb2id``; 0 is void). Raises on corrupt or truncated data."""
    rgb = tf.cast(tf.io.decode_png(data, channels=3), tf.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def normalize_and_pad(image, canvas):
    """image [h, w, 3] float32 in [0, 255], canvas [2] int32 -> (ImageNet-normalised image padded with
    zeros at the bottom/right to [H, W, 3], padding_mask [H, W] bool True on padding)."""
    image = (image / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
    hw = tf.shape(image)[:2]
    pad = [[0, canvas[0] - hw[0]], [0, canvas[1] - hw[1]]]
    mask = tf.pad(tf.zeros(hw, tf.bool), pad, constant_values=True)
    return tf.pad(image, pad + [[0, 0]]), mask


def safely(fn, fallback):
    """A tf.data ``interleave`` function applying ``fn`` to an element, or ``fallback`` where ``fn``
    raises (a corrupt, truncated or missing file): ``ds.interleave(safely(fn, fallback), ...)``.

    fn and fallback map the element to structures of the same types; order is kept with
    ``deterministic=True``, since each element yields exactly one output.
    """
    def apply(element):
        tried = tf.data.Dataset.from_tensors(element).map(fn).ignore_errors()
        return tried.concatenate(tf.data.Dataset.from_tensors(element).map(fallback)).take(1)
    return apply


def decode_rgb(data):
    """Encoded JPEG / PNG / GIF / BMP bytes -> [h, w, 3] uint8 (grayscale replicated, alpha dropped,
    16-bit scaled to 8-bit). Raises on corrupt or truncated data.

    JPEG files are decoded with libjpeg's accurate integer DCT, as PIL (and so official DETR) decodes
    them: the same pixels for baseline and progressive RGB, 4:2:0 and grayscale files (tf's default,
    the fast DCT, is off by up to ~16 levels and 0.8 darker on average). The other formats are
    lossless and decode as PIL's ``convert("RGB")`` does (tests/test_jpeg_decoding.py measures both)."""
    return tf.cond(tf.io.is_jpeg(data),
                   lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False))


EXIF_POLICIES = ("ignore", "apply")  # config.data.exif, where the annotated size cannot tell
# what exif_orient did to an image ("_exif" of a decoded row)
EXIF_NONE, EXIF_APPLIED, EXIF_IGNORED, EXIF_BY_SETTING = range(4)


def _orientation_of(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of an encoded image; 1 when it has none (or is not a JPEG)."""
    import io

    from PIL import Image

    if data[:2] != b"\xff\xd8":
        return 1
    try:
        orientation = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged header: the image decodes (or fails) on its own
        return 1
    return int(orientation) if orientation in range(1, 9) else 1


def exif_orientation(data) -> tf.Tensor:
    """Encoded image bytes (scalar string tensor) -> int32 scalar, its EXIF orientation (1: none).
    Reads the header only (PIL, on the host)."""
    tag = tf.py_function(lambda b: np.int32(_orientation_of(b.numpy())), [data], tf.int32)
    return tf.ensure_shape(tag, [])


def _transposed(pixels, orientation):
    """pixels [h, w, 3] as shown by a viewer honouring EXIF ``orientation`` (PIL's exif_transpose)."""
    swap = lambda p: tf.transpose(p, [1, 0, 2])
    rows, cols, both = (lambda p: tf.reverse(p, [0])), (lambda p: tf.reverse(p, [1])), (lambda p: tf.reverse(p, [0, 1]))
    return tf.switch_case(orientation - 1, [
        lambda: pixels,
        lambda: cols(pixels),  # 2: mirrored
        lambda: both(pixels),  # 3: rotated 180
        lambda: rows(pixels),  # 4: flipped top to bottom
        lambda: swap(pixels),  # 5: transposed
        lambda: cols(swap(pixels)),  # 6: rotated 90 clockwise to show
        lambda: both(swap(pixels)),  # 7: transversed
        lambda: rows(swap(pixels)),  # 8: rotated 90 counter-clockwise to show
    ])


def exif_orient(pixels, orientation, orig_size, apply_when_unsure: bool):
    """The image in the frame its annotation uses -> (pixels, one of EXIF_NONE/APPLIED/IGNORED/BY_SETTING).

    pixels [h, w, 3] as stored in the file; orientation int32 scalar (``exif_orientation``);
    orig_size [2] the annotated (h, w). A tag is applied when the annotated size is the displayed
    (EXIF-transposed) size and not the stored one, as labelling tools that honour EXIF write; it is
    ignored when the annotated size is the stored size and not the displayed one, as in COCO;
    otherwise (a square image, a tag that keeps the size, or neither size) ``apply_when_unsure``
    (config.data.exif == "apply") decides.
    """
    stored = tf.shape(pixels)[:2]
    shown = tf.where(orientation >= 5, stored[::-1], stored)
    is_stored, is_shown = tf.reduce_all(stored == orig_size), tf.reduce_all(shown == orig_size)
    sure = is_stored != is_shown
    apply = (orientation > 1) & tf.where(sure, is_shown, apply_when_unsure)
    case = tf.where(orientation == 1, EXIF_NONE,
                    tf.where(sure, tf.where(is_shown, EXIF_APPLIED, EXIF_IGNORED), EXIF_BY_SETTING))
    return tf.cond(apply, lambda: _transposed(pixels, orientation), lambda: pixels), case
