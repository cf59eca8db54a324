"""The built-in synthetic detection dataset: coloured shapes on noisy backgrounds, in COCO format;
with stuff classes, a panoptic dataset too.

    python -m detr_jax.data.synthetic --out DIR [--num_train 512] [--num_val 128] [--seed 0] [--stuff 2]

Layout: DIR/train/*.jpg|png, DIR/val/..., DIR/annotations/instances_{train,val}.json (COCO: images
with sizes, annotations with bbox (x, y, w, h) pixels, area, iscrowd, a box polygon as
segmentation; categories with names), DIR/synthetic.json (what it was generated with).

With S = ``Spec.stuff`` > 0 stuff classes (``STUFF[:S]``: bands from top to bottom, e.g. sky above
ground, split by random wavy boundaries, each with its own colour and texture) the background is
those bands, and DIR also holds a COCO panoptic dataset: DIR/annotations/panoptic_{train,val}.json
(images; annotations with file_name and segments_info {id, category_id, iscrowd 0, bbox (x, y, w,
h) of the segment's pixels, area}; categories with isthing) and DIR/panoptic_{train,val}/*.png
(segment id = R + 256 G + 256^2 B, 0 void). Things (category ids 1..5) are the shapes' exact pixel
masks (``shape_mask``) where no later shape covers them; stuff (ids 6..5+S) is each band's
background pixels, a band with fewer than MIN_STUFF_PIXELS visible pixels left out (void).
instances_*.json still lists the shapes (whole-shape boxes), so the detection readers work too.

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
STUFF = ("sky", "ground", "water", "sand")  # stuff classes, bands from top to bottom; ids follow the shapes'
MIN_STUFF_PIXELS = 16  # a stuff band with fewer visible pixels is left out (void)
OPTIONAL = {"stuff": 0}  # Spec fields written to synthetic.json only when not this (older files lack them)


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
    stuff: int = 0  # stuff classes (STUFF[:stuff]); > 0 also writes the panoptic dataset

    def to_json(self) -> dict:
        fields = {**dataclasses.asdict(self), "object_scale": list(self.object_scale)}
        return {k: v for k, v in fields.items() if k not in OPTIONAL or v != OPTIONAL[k]}


def spec_of(data_config) -> Spec:
    """The Spec a data config asks for (its synthetic_* fields)."""
    return Spec(num_train=data_config.synthetic_num_train, num_val=data_config.synthetic_num_val,
                seed=data_config.synthetic_seed, max_objects=data_config.synthetic_max_objects,
                object_scale=tuple(data_config.synthetic_object_scale), stuff=data_config.synthetic_stuff)


def default_dir(data_config) -> str:
    """data_config.data_dir, or a folder under ~/.cache/detr_jax named by the configured Spec fields."""
    if data_config.data_dir:
        return data_config.data_dir
    spec = spec_of(data_config)
    name = (f"synthetic-s{spec.seed}-{spec.num_train}-{spec.num_val}-o{spec.max_objects}-"
            f"{spec.object_scale[0]:g}-{spec.object_scale[1]:g}" + (f"-stuff{spec.stuff}" if spec.stuff else ""))
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


def _stuff_texture(rng, k: int, h: int, w: int) -> np.ndarray:
    """Stuff class k's fill of an h x w image -> [h, w, 3] float: sky a light blue vertical gradient,
    ground grainy brown, water blue horizontal waves, sand yellow diagonal ripples (colours jittered)."""
    base = np.array([(95, 150, 225), (125, 95, 55), (40, 95, 165), (215, 190, 125)][k], float)
    colour = base + rng.uniform(-25, 25, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    period = rng.uniform(5, 10)
    shade = [0.75 + 0.4 * yy / h, 1 + 0 * yy, 1 + 0.18 * np.sin(2 * np.pi * yy / period),
             1 + 0.1 * np.sin(2 * np.pi * (xx + yy) / period)][k]
    noise = (3.0, 22.0, 5.0, 8.0)[k]
    return colour * shade[..., None] + rng.normal(0, noise, (h, w, 3))


def _stuff_background(rng, h: int, w: int, stuff: int):
    """Bands of STUFF[:stuff] from top to bottom, split by wavy boundaries -> (image [h, w, 3] float,
    band [h, w] int64: the stuff index of each pixel)."""
    yy, xx = np.mgrid[0:h, 0:w]
    bases = np.sort(rng.uniform(0.2, 0.8, stuff - 1)) * h
    band = np.zeros((h, w), np.int64)
    for base in bases:
        amplitude, cycles, phase = rng.uniform(0.03, 0.1) * h, rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        band += yy >= base + amplitude * np.sin(2 * np.pi * cycles * xx / w + phase)
    fills = np.stack([_stuff_texture(rng, k, h, w) for k in range(stuff)])
    return np.take_along_axis(fills, band[None, ..., None], 0)[0], band


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


@dataclasses.dataclass
class Scene:
    """One rendered image: pixels [h, w, 3] uint8; objects [(class, (x, y, w, h) tight box of the whole
    shape, area)]; placed [(x, y, w, h)]: the box each object's ``shape_mask`` was stretched over;
    top [h, w] int64: the object (index into objects) showing at each pixel, -1 where none;
    band [h, w] int64: the stuff band (index into STUFF) of each pixel, None without stuff."""
    pixels: np.ndarray
    objects: list
    placed: list
    top: np.ndarray
    band: np.ndarray | None


def render(rng, spec: Spec):
    """One image -> (pixels [h, w, 3] uint8, objects [(class, (x, y, w, h) tight box, area)])."""
    scene = render_scene(rng, spec)
    return scene.pixels, scene.objects


def render_scene(rng, spec: Spec) -> Scene:
    """One image with what each pixel shows (``Scene``); the draws of ``rng`` are the same as before
    stuff existed when spec.stuff is 0, so the detection dataset is unchanged."""
    h, w = rng.integers(spec.min_size, spec.max_size + 1, 2)
    image, band = _stuff_background(rng, h, w, spec.stuff) if spec.stuff else (_background(rng, h, w), None)
    top = np.full((h, w), -1, np.int64)
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
        top[y:y + bh, x:x + bw][mask] = len(objects)
        placed.append(box)
        objects.append((cls, _tight_box(mask, x, y), int(mask.sum())))
    return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), objects, placed, top, band)


def _tight_box(mask, x: int = 0, y: int = 0) -> tuple:
    """mask [h, w] bool (not empty), placed at (x, y) -> (x, y, w, h) of its pixels (w = max col - min col + 1)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return tuple(int(v) for v in (x + cols[0], y + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1))


def panoptic_segments(scene: Scene):
    """A scene with stuff -> (ids [h, w] int64, segments_info [{id, category_id, iscrowd, bbox, area}]).

    Things first (category class + 1, the visible pixels of each shape; a covered one is left out),
    then stuff bands (category len(CLASSES) + 1 + band, the band's background pixels; left out, void,
    below MIN_STUFF_PIXELS). Segment id = 1000 category_id + position in segments_info + 1.
    """
    ids = np.zeros(scene.top.shape, np.int64)
    regions = [(cls + 1, scene.top == j) for j, (cls, _, _) in enumerate(scene.objects)]
    regions += [(len(CLASSES) + 1 + k, (scene.band == k) & (scene.top < 0)) for k in range(int(scene.band.max()) + 1)]
    segments = []
    for category_id, pixels in regions:
        area = int(pixels.sum())
        if area == 0 or (category_id > len(CLASSES) and area < MIN_STUFF_PIXELS):
            continue
        segment_id = 1000 * category_id + len(segments) + 1
        ids[pixels] = segment_id
        segments.append({"id": segment_id, "category_id": category_id, "iscrowd": 0,
                         "bbox": list(_tight_box(pixels)), "area": area})
    return ids, segments


def id_to_rgb(ids) -> np.ndarray:
    """ids [h, w] int -> [h, w, 3] uint8 (R, G, B) with id = R + 256 G + 256^2 B (panopticapi's id2rgb)."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def _write_split(root: str, split: str, split_code: int, num: int, spec: Spec) -> None:
    import tensorflow as tf

    os.makedirs(os.path.join(root, split))
    pngs = os.path.join(root, f"panoptic_{split}")
    if spec.stuff:
        os.makedirs(pngs)
    images, annotations, panoptic = [], [], []
    for i in range(num):
        scene = render_scene(np.random.default_rng([spec.seed, split_code, i]), spec)
        pixels, objects = scene.pixels, scene.objects
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
        if spec.stuff:
            ids, segments = panoptic_segments(scene)
            tf.io.write_file(os.path.join(pngs, f"{image_id:06d}.png"), tf.io.encode_png(id_to_rgb(ids)))
            panoptic.append({"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": segments})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    if spec.stuff:
        stuff = [{"id": len(CLASSES) + 1 + k, "name": name, "supercategory": "stuff", "isthing": 0}
                 for k, name in enumerate(STUFF[:spec.stuff])]
        with open(os.path.join(root, "annotations", f"panoptic_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": panoptic,
                       "categories": [{**c, "isthing": 1} for c in categories] + stuff}, f)


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


CONFIGURED = ("num_train", "num_val", "seed", "max_objects", "object_scale", "version", "stuff")  # what a data config asks of a synthetic folder


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
    wanted = {k: v for k, v in {**OPTIONAL, **spec.to_json()}.items() if k in CONFIGURED}
    if {k: found.get(k, OPTIONAL.get(k)) for k in CONFIGURED} != wanted:
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
    if not 0 <= f.stuff <= len(STUFF):
        raise ConfigError(f"--stuff={f.stuff}: expected 0..{len(STUFF)} stuff classes")
    if f.max_objects < 1 or not 0 < low <= high <= 1:
        raise ConfigError(f"need --max_objects >= 1 and 0 < MIN <= MAX <= 1 for --object_scale; got {f.max_objects}, "
                          f"{low},{high}")
    spec = Spec(num_train=f.num_train, num_val=f.num_val, seed=f.seed, min_size=f.min_size, max_size=f.max_size,
                max_objects=f.max_objects, object_scale=(low, high), stuff=f.stuff)
    out = generate(f.out, spec)
    print(f"wrote {out}: {f.num_train} train and {f.num_val} val images, classes "
          f"{', '.join(CLASSES + STUFF[:f.stuff])}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "Folder to create (must not exist).", required=True)
    flags.DEFINE_integer("num_train", Spec.num_train, "Train images.")
    flags.DEFINE_integer("num_val", Spec.num_val, "Val images.")
    flags.DEFINE_integer("seed", Spec.seed, "Random seed.")
    flags.DEFINE_integer("min_size", Spec.min_size, "Smallest image side, pixels.")
    flags.DEFINE_integer("max_size", Spec.max_size, "Largest image side, pixels.")
    flags.DEFINE_integer("max_objects", Spec.max_objects, "Most objects per image.")
    flags.DEFINE_integer("stuff", Spec.stuff, f"Stuff classes (0..{len(STUFF)}, bands from top to bottom: "
                         f"{', '.join(STUFF)}); > 0 also writes the COCO panoptic dataset.")
    flags.DEFINE_list("object_scale", [str(v) for v in Spec.object_scale], "MIN,MAX: object side range, as fractions "
                      "of the image's short side.")


if __name__ == "__main__":
    from detr_jax import cli

    _define_flags()
    cli.run(main)
