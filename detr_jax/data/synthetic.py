"""The built-in synthetic detection dataset: coloured shapes on noisy backgrounds, in COCO format.

    python -m detr_jax.data.synthetic --out DIR [--num_train 512] [--num_val 128] [--seed 0]

Layout: DIR/train/*.jpg|png, DIR/val/..., DIR/annotations/instances_{train,val}.json (COCO: images
with sizes, annotations with bbox (x, y, w, h) pixels, area, iscrowd, a box polygon as
segmentation; categories with names), DIR/synthetic.json (what it was generated with).

Five classes (circle, square, triangle, cross, ring), distinct enough for a tiny DETR on CPU:
images of 128..256 px per side (so varied aspect ratios), 0..12 objects (about 6% of images empty),
objects 12%..50% of the short side (log-uniform), boxes overlapping by at most 40% of the smaller
one, random colours at a clear distance from the background, solid / striped / noisy textures,
backgrounds of two-colour gradients with pixel noise. Deterministic: image i of a split depends
only on (seed, split, i). A few hundred images take a few seconds.
"""
import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from detr_jax.errors import DataError

CLASSES = ("circle", "square", "triangle", "cross", "ring")
SPEC_FILE = "synthetic.json"
FORMAT_VERSION = 1
PNG_EVERY = 8  # every 8th image is a PNG, the others JPEG
MAX_OVERLAP = 0.4  # intersection / smaller box area
MIN_COLOUR_DISTANCE = 110.0  # RGB distance of an object's colour from the background under it


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a synthetic dataset is generated from (written to DIR/synthetic.json)."""
    num_train: int = 512
    num_val: int = 128
    seed: int = 0
    min_size: int = 128  # image side range, pixels
    max_size: int = 256
    max_objects: int = 12
    object_scale: tuple = (0.12, 0.5)  # object side / image short side
    version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "object_scale": list(self.object_scale)}


def spec_of(data_config) -> Spec:
    """The Spec a data config asks for (its synthetic_* fields)."""
    return Spec(num_train=data_config.synthetic_num_train, num_val=data_config.synthetic_num_val,
                seed=data_config.synthetic_seed, max_objects=data_config.synthetic_max_objects,
                object_scale=tuple(data_config.synthetic_object_scale))


def default_dir(data_config) -> str:
    """data_config.data_dir, or a folder under ~/.cache/detr_jax named by the configured Spec fields."""
    if data_config.data_dir:
        return data_config.data_dir
    spec = spec_of(data_config)
    name = (f"synthetic-s{spec.seed}-{spec.num_train}-{spec.num_val}-o{spec.max_objects}-"
            f"{spec.object_scale[0]:g}-{spec.object_scale[1]:g}")
    return os.path.join(os.path.expanduser("~"), ".cache", "detr_jax", name)


def shape_mask(cls: int, h: int, w: int) -> np.ndarray:
    """The filled shape of class ``cls`` stretched over an h x w box -> [h, w] bool."""
    yy = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]
    xx = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]
    r2 = xx ** 2 + yy ** 2
    name = CLASSES[cls]
    if name == "circle":
        mask = r2 <= 1.0
    elif name == "square":
        mask = np.ones((h, w), bool)
    elif name == "triangle":
        mask = np.abs(xx) <= (yy + 1) / 2
    elif name == "cross":
        mask = (np.abs(xx) <= 1 / 3) | (np.abs(yy) <= 1 / 3)
    else:
        mask = (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    return np.broadcast_to(mask, (h, w))


def _background(rng, h: int, w: int) -> np.ndarray:
    """A two-colour linear gradient with pixel noise -> [h, w, 3] float."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(np.ptp(t), 1.0)
    a, b = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    return a * (1 - t[..., None]) + b * t[..., None] + rng.normal(0, rng.uniform(4, 16), (h, w, 3))


def _colour(rng, under: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_COLOUR_DISTANCE from the mean of ``under`` (or the farthest tried)."""
    mean = under.reshape(-1, 3).mean(0)
    tries = rng.uniform(0, 255, (24, 3))
    distance = np.linalg.norm(tries - mean, axis=1)
    good = np.flatnonzero(distance >= MIN_COLOUR_DISTANCE)
    return tries[good[0]] if len(good) else tries[distance.argmax()]


def _texture(rng, colour, h: int, w: int) -> np.ndarray:
    """Solid, striped or noisy fill of an h x w box -> [h, w, 3] float."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3))
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w]
        period = rng.integers(4, 10)
        direction = rng.choice([(1, 0), (0, 1), (1, 1), (1, -1)])
        band = ((xx * direction[0] + yy * direction[1]) // (period // 2)) % 2
        return colour * np.where(band[..., None] == 1, 1.0, 0.65)
    return colour + rng.normal(0, 18, (h, w, 3))


def _overlap(a, b) -> float:
    """Intersection over the smaller area of two (x, y, w, h) boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def render(rng, spec: Spec):
    """One image -> (pixels [h, w, 3] uint8, objects [(class, (x, y, w, h) tight box, area)])."""
    h, w = rng.integers(spec.min_size, spec.max_size + 1, 2)
    image = _background(rng, h, w)
    count = 0 if rng.random() < 0.06 else 1 + rng.binomial(spec.max_objects - 1, 0.3)
    short = min(h, w)
    lo, hi = np.log(spec.object_scale[0] * short), np.log(spec.object_scale[1] * short)
    placed, objects = [], []
    for _ in range(count):
        cls = int(rng.integers(len(CLASSES)))
        side, aspect = np.exp(rng.uniform(lo, hi)), rng.uniform(0.7, 1.4)
        bw = int(np.clip(round(side * np.sqrt(aspect)), 8, w))
        bh = int(np.clip(round(side / np.sqrt(aspect)), 8, h))
        for _ in range(20):
            box = (int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1)), bw, bh)
            if all(_overlap(box, p) <= MAX_OVERLAP for p in placed):
                break
        else:
            continue
        x, y = box[:2]
        mask = shape_mask(cls, bh, bw)
        fill = _texture(rng, _colour(rng, image[y:y + bh, x:x + bw]), bh, bw)
        image[y:y + bh, x:x + bw][mask] = fill[mask]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        tight = (x + cols[0], y + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
        placed.append(box)
        objects.append((cls, tuple(int(v) for v in tight), int(mask.sum())))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _write_split(root: str, split: str, split_code: int, num: int, spec: Spec) -> None:
    import tensorflow as tf

    os.makedirs(os.path.join(root, split))
    images, annotations = [], []
    for i in range(num):
        pixels, objects = render(np.random.default_rng([spec.seed, split_code, i]), spec)
        image_id = i + 1
        png = i % PNG_EVERY == PNG_EVERY - 1
        name = f"{image_id:06d}.{'png' if png else 'jpg'}"
        data = tf.io.encode_png(pixels) if png else tf.io.encode_jpeg(pixels, quality=92)
        tf.io.write_file(os.path.join(root, split, name), data)
        images.append({"id": image_id, "file_name": name, "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
        for cls, (x, y, bw, bh), area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": [x, y, bw, bh], "area": area, "iscrowd": 0,
                                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def generate(out_dir: str, spec: Spec = Spec()) -> str:
    """Write the dataset ``spec`` describes into out_dir (which must not exist) -> its path.

    Atomic: everything goes into a temporary sibling folder renamed to out_dir at the end, so an
    interrupted generation leaves no half dataset (only, at worst, a hidden ``.NAME.tmp-*`` folder).
    """
    out = os.path.abspath(out_dir)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; generate writes a new folder (ensure_synthetic reuses one)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        _write_split(tmp, "train", 0, spec.num_train, spec)
        _write_split(tmp, "val", 1, spec.num_val, spec)
        with open(os.path.join(tmp, SPEC_FILE), "w") as f:
            json.dump(spec.to_json(), f)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


CONFIGURED = ("num_train", "num_val", "seed", "max_objects", "object_scale", "version")  # what a data config asks of a synthetic folder


def _matching(out: str, spec: Spec) -> bool:
    """out holds a dataset generated with spec's CONFIGURED fields (any image sizes); False if out does
    not exist; a ValueError if it holds anything else."""
    path = os.path.join(out, SPEC_FILE)
    if not os.path.exists(path):
        if os.path.exists(out):
            raise DataError(f"{out} exists but is not a synthetic dataset (no {SPEC_FILE}); use another data_dir")
        return False
    with open(path) as f:
        found = json.load(f)
    wanted = {k: v for k, v in spec.to_json().items() if k in CONFIGURED}
    if {k: found.get(k) for k in CONFIGURED} != wanted:
        raise DataError(f"{out} holds a synthetic dataset generated with {found}, not {wanted}; "
                         "use another data_dir or delete it")
    return True


def ensure_synthetic(data_dir: str, spec: Spec) -> str:
    """The synthetic dataset ``spec`` in data_dir, generated there first if absent -> data_dir.

    An existing one must match spec's CONFIGURED fields (it may have other image sizes, from the
    CLI's --min_size / --max_size). Safe when several processes start together: each generates into its
    own temporary folder and the first rename wins; the others find the finished dataset.
    """
    out = os.path.abspath(data_dir)
    if _matching(out, spec):
        return out
    try:
        return generate(out, spec)
    except OSError:
        if _matching(out, spec):
            return out
        raise


def main(argv) -> None:
    from absl import flags

    from detr_jax.errors import ConfigError

    del argv
    f = flags.FLAGS
    try:
        low, high = (float(v) for v in f.object_scale)
    except ValueError:
        raise ConfigError(f"--object_scale={','.join(f.object_scale)}: expected MIN,MAX (two numbers)") from None
    if not 16 <= f.min_size <= f.max_size:
        raise ConfigError(f"need 16 <= --min_size ({f.min_size}) <= --max_size ({f.max_size})")
    if f.max_objects < 1 or not 0 < low <= high <= 1:
        raise ConfigError(f"need --max_objects >= 1 and 0 < MIN <= MAX <= 1 for --object_scale; got {f.max_objects}, "
                          f"{low},{high}")
    spec = Spec(num_train=f.num_train, num_val=f.num_val, seed=f.seed, min_size=f.min_size, max_size=f.max_size,
                max_objects=f.max_objects, object_scale=(low, high))
    out = generate(f.out, spec)
    print(f"wrote {out}: {f.num_train} train and {f.num_val} val images, classes {', '.join(CLASSES)}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "Folder to create (must not exist).", required=True)
    flags.DEFINE_integer("num_train", Spec.num_train, "Train images.")
    flags.DEFINE_integer("num_val", Spec.num_val, "Val images.")
    flags.DEFINE_integer("seed", Spec.seed, "Random seed.")
    flags.DEFINE_integer("min_size", Spec.min_size, "Smallest image side, pixels.")
    flags.DEFINE_integer("max_size", Spec.max_size, "Largest image side, pixels.")
    flags.DEFINE_integer("max_objects", Spec.max_objects, "Most objects per image.")
    flags.DEFINE_list("object_scale", [str(v) for v in Spec.object_scale], "MIN,MAX: object side range, as fractions "
                      "of the image's short side.")


if __name__ == "__main__":
    from detr_jax import cli

    _define_flags()
    cli.run(main)
