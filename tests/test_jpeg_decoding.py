"""decode_rgb against PIL (``Image.open(f).convert("RGB")``, what official DETR decodes with) on files
written here by PIL: the maximum pixel difference per kind of file. ``pytest -s`` prints them."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detr_jax.data.transforms import decode_rgb


def picture(h=75, w=98, seed=0) -> np.ndarray:
    """[h, w, 3] uint8: smooth gradients, edges and noise, so that every DCT frequency is used."""
    y, x = np.mgrid[:h, :w]
    rng = np.random.RandomState(seed)
    base = np.stack([255 * x / w, 255 * y / h, 127 + 120 * np.sin(x / 5.0) * np.cos(y / 7.0)], -1)
    base[(x // 16 + y // 16) % 2 == 0] *= 0.6
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encoded(kind: str) -> bytes:
    """``picture()`` saved by PIL as a file of this kind."""
    rgb = Image.fromarray(picture())
    image, options = {
        "baseline": (rgb, dict(format="JPEG", quality=90, subsampling=0)),
        "progressive": (rgb, dict(format="JPEG", quality=90, subsampling=0, progressive=True)),
        "baseline 4:2:0": (rgb, dict(format="JPEG", quality=75, subsampling=2)),
        "progressive 4:2:0": (rgb, dict(format="JPEG", quality=75, subsampling=2, progressive=True)),
        "grayscale": (rgb.convert("L"), dict(format="JPEG", quality=90)),
        "CMYK": (rgb.convert("CMYK"), dict(format="JPEG", quality=90)),
        "PNG": (rgb, dict(format="PNG")),
        "PNG RGBA": (Image.fromarray(np.concatenate([picture(), picture(seed=1)[..., :1]], -1)), dict(format="PNG")),
        "PNG grayscale": (rgb.convert("L"), dict(format="PNG")),
        "GIF": (rgb.convert("P"), dict(format="GIF")),
        "BMP": (rgb, dict(format="BMP")),
        "PNG 16-bit grayscale": (Image.fromarray(picture()[..., 0].astype(np.uint16) * 257), dict(format="PNG")),
    }[kind]
    out = io.BytesIO()
    image.save(out, **options)
    return out.getvalue()


def difference(decoded, data: bytes) -> int:
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert decoded.shape == pil.shape
    return int(np.abs(decoded.astype(int) - pil.astype(int)).max())


# kind -> the maximum difference to PIL (Pillow 13.0, libjpeg-turbo 6.2 API; tensorflow 2.21). Every
# 8-bit file decodes exactly. A 16-bit PNG does not: tf scales it to 8 bits (v / 257), PIL's
# convert("RGB") clips its "I;16" values at 255 (official DETR would see a nearly white image).
EXPECTED = {"baseline": 0, "progressive": 0, "baseline 4:2:0": 0, "progressive 4:2:0": 0, "grayscale": 0,
            "CMYK": 0, "PNG": 0, "PNG RGBA": 0, "PNG grayscale": 0, "GIF": 0, "BMP": 0, "PNG 16-bit grayscale": 254}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_decoding_matches_pil(kind):
    data = encoded(kind)
    got = difference(decode_rgb(data).numpy(), data)
    print(f"{kind}: max |decode_rgb - PIL| = {got}")
    assert got == EXPECTED[kind]


def test_the_fast_dct_differs_from_pil():
    """tf's default JPEG decoding (what decode_rgb replaced) does not match PIL: the test has teeth."""
    data = encoded("baseline")
    fast = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    assert difference(fast, data) >= 3  # 4 on this file


def test_decoding_in_a_graph():
    """decode_rgb inside tf.data (a tf.function): the format check runs in the graph."""
    files = [encoded("baseline"), encoded("PNG")]
    shapes = [x.shape.as_list() for x in tf.data.Dataset.from_tensor_slices(files).map(decode_rgb)]
    assert shapes == [[75, 98, 3], [75, 98, 3]]
