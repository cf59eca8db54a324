"""Shape buckets: the few canvas sizes images are padded to, so the compiler sees few shapes.

An image's canvas depends on its own (resized) size only: the smallest-area bucket that contains it
(``assign_buckets``). A batch holds images of one bucket, so an epoch has at most ``len(buckets)``
distinct batch shapes, and an image's padded tensor is the same whatever batch it lands in.
"""
import math

import numpy as np

# long side / short side of the aspect-ratio classes: square-ish, up to 4:3, up to 5:3 (wider
# images go to the widest canvas, whose long side is the transform's maximum)
ASPECT_CLASSES = (1.0, 4.0 / 3.0, 5.0 / 3.0)


def round_up(x, divisor: int):
    """Smallest multiple of divisor >= x (ints or int arrays)."""
    return -(-np.asarray(x) // divisor) * divisor


def default_buckets(cfg) -> tuple[tuple[int, int], ...]:
    """Canvas sizes (h, w) derived from the transform sizes of a data config.

    Two short-side levels, the median train scale and the largest short side (train or eval); at
    each, three aspect-ratio classes (``ASPECT_CLASSES``) in landscape and portrait; everything
    rounded up to ``size_divisor``; the long side never beyond the largest ``max_size`` (rounded
    up). Official COCO sizes give 10 canvases from 640 x 640 to 800 x 1344 and 1344 x 800.

    Cost: on a mix approximating COCO's shapes (h x w: 60% 360..480 x 640, 27% 640 x 426..480, 8%
    640 x 640, 5% 250..300 x 640), 21% of canvas pixels are padding under the train transform and
    10% under eval, against 69% / 49% for one 1344 x 1344 canvas and 37% / 12% for the three
    canvases 800 x 800, 800 x 1344, 1344 x 800 (``padding_fraction`` measures it for any sizes).
    """
    scales = sorted(cfg.train_scales)
    top = max(scales[-1], cfg.eval_size)
    longest = round_up(max(cfg.train_max_size, cfg.eval_max_size), cfg.size_divisor)
    buckets = []
    for short in sorted({scales[len(scales) // 2], top}):
        for aspect in ASPECT_CLASSES:
            short_side = int(round_up(short, cfg.size_divisor))
            long_side = int(min(round_up(math.ceil(short * aspect), cfg.size_divisor), longest))
            for hw in ((short_side, long_side), (long_side, short_side)):
                if hw not in buckets:
                    buckets.append(hw)
    return tuple(buckets)


def check_buckets(buckets, size_divisor: int) -> np.ndarray:
    """buckets: sequence of (h, w) -> int64 [K, 2]; a clear error if one is not a positive multiple."""
    arr = np.asarray(buckets, np.int64).reshape(-1, 2)
    if len(arr) == 0 or (arr <= 0).any() or (arr % size_divisor).any():
        raise ValueError(f"data_config.buckets = {list(map(tuple, arr.tolist()))}: expected one or more "
                         f"(h, w) pairs, positive multiples of size_divisor ({size_divisor})")
    return arr


def assign_buckets(sizes, buckets):
    """Each image to the smallest-area canvas that contains it.

    sizes [N, 2] int (h, w) after resize, buckets [K, 2] -> (bucket [N] int64, sizes [N, 2] int64,
    shrunk [N] bool). An image no canvas contains (a custom bucket list too small for the transform,
    or an extreme aspect ratio) is scaled down to fit the canvas that keeps the most resolution; its
    normalised boxes are unchanged by this, and ``shrunk`` reports it.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    b = np.asarray(buckets, np.int64)
    fits = (b[None, :, 0] >= sizes[:, None, 0]) & (b[None, :, 1] >= sizes[:, None, 1])
    area = (b[:, 0] * b[:, 1]).astype(np.float64)
    chosen = np.where(fits, area[None], np.inf).argmin(1)
    shrunk = ~fits.any(1)
    if shrunk.any():
        ratio = np.minimum(b[None, :, 0] / sizes[shrunk, None, 0], b[None, :, 1] / sizes[shrunk, None, 1])
        best = ratio.argmax(1)
        chosen[shrunk] = best
        scale = ratio[np.arange(len(best)), best]
        sizes = sizes.copy()
        sizes[shrunk] = np.maximum(np.floor(sizes[shrunk] * scale[:, None]), 1).astype(np.int64)
    return chosen.astype(np.int64), sizes, shrunk


def padding_fraction(sizes, buckets) -> float:
    """Share of canvas pixels that are padding when images of sizes [N, 2] go to their buckets."""
    bucket, sizes, _ = assign_buckets(sizes, buckets)
    canvas = np.asarray(buckets, np.int64)[bucket]
    return float(1.0 - (sizes[:, 0] * sizes[:, 1]).sum() / (canvas[:, 0] * canvas[:, 1]).sum())
