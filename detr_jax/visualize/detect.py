"""Detection on image files: what ``python -m detr_jax.detect`` does.

The images are resized, bucketed and padded exactly as evaluation does it (``eval_batches`` over an
``ImageFilesSource``), then run through evaluation's jit-compiled ``Predictor`` in batches sharded
over the local devices. Output directory:
  detections.json          {"checkpoint", "threshold", "topk", "class_names", "images": [{"file",
                           "width", "height", "detections": [{"class", "label", "score", "box":
                           [x0, y0, x1, y1] original pixels, "query"}], best first}]}
  NAME.png                 (draw) the image with its detections drawn
  NAME_decoder_attention.png  (decoder_attention) each detection's last-layer cross-attention
  NAME_encoder_attention.png  (encoder_pixels) the last encoder layer's self-attention of those pixels
  NAME_panoptic.png        (masks) the panoptic result drawn: each segment filled, its class written
  NAME_panoptic_ids.png    (masks) the COCO panoptic PNG (id = R + 256 G + 256^2 B, 0 void), whose
                           segments detections.json lists under "panoptic": [{"id", "class", "label",
                           "isthing", "area"}]
NAME is the image file's name without its suffix (made unique with _2, _3, ... when names repeat).
"""
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image

from detr_jax.data.records import make_info
from detr_jax.data.tfds_coco import COCO_CATEGORIES
from detr_jax.visualize import attention, draw
from detr_jax.errors import ConfigError, UsageError
from detr_jax.models.decoders import DECODERS

COCO_NUM_CLASSES = 91  # official DETR's COCO models: class index = COCO category id (1..90)


def coco_class_names() -> list[str]:
    """The 91 names of official DETR's COCO classes, index = category id, 'N/A' for unused ids."""
    return [name or "N/A" for name in make_info(COCO_CATEGORIES, "category_id", 0).class_names]


def class_names(num_classes: int, data_config=None, override=(), saved=None) -> list[str]:
    """A name per class index 0..num_classes-1.

    ``override`` (one name per class) wins; else ``saved``, the names a training checkpoint keeps of
    the dataset it was trained on; else COCO's names for a COCO model (91 classes); else the
    category names of ``data_config``'s dataset (its val split's annotations); 'class i' where none
    is known.
    """
    if override:
        if len(override) != num_classes:
            raise ConfigError(f"--class_names has {len(override)} names; the model has {num_classes} classes")
        return list(override)
    if saved:
        known = list(saved)
    elif num_classes == COCO_NUM_CLASSES:
        known = coco_class_names()
    elif data_config is not None:
        from detr_jax.data import load_dataset

        known = list(load_dataset(data_config, "val", process_index=0, process_count=1).info.class_names)
    else:
        known = []
    return [known[i] if i < len(known) and known[i] else f"class {i}" for i in range(num_classes)]


def original_pixels(path) -> Image.Image:
    """An image file as the model saw it before resizing (``decode_rgb``: 16-bit scaled to 8-bit,
    grayscale replicated, alpha dropped), to draw on."""
    import tensorflow as tf

    from detr_jax.data.transforms import decode_rgb

    return Image.fromarray(decode_rgb(tf.io.read_file(str(path))).numpy())


def select_detections(prediction: dict, names, threshold: float) -> list[dict]:
    """One image's predictions (scores [K], labels [K], boxes [K, 4], queries [K]) -> the detections
    scoring at least ``threshold``, best first (ties: lower query), as json-ready dicts."""
    scores = np.asarray(prediction["scores"])
    keep = np.flatnonzero(scores >= threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return [{"class": names[int(prediction["labels"][k])], "label": int(prediction["labels"][k]),
             "score": float(scores[k]), "box": [float(v) for v in prediction["boxes"][k]],
             "query": int(prediction["queries"][k])} for k in keep]


def output_names(paths) -> list[str]:
    """File names without suffix, made unique in order: a.jpg, b/a.png -> a, a_2."""
    names, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _attention_figures(out_dir: Path, name: str, image: np.ndarray, detections, slot: dict, row: dict,
                       stride, encoder_pixels, decoder: bool) -> None:
    """Write NAME_decoder_attention.png / NAME_encoder_attention.png of one image.

    slot: the Predictor's outputs of this image (numpy); row: orig_size and size of the image;
    stride (sy, sx): canvas pixels per feature cell."""
    mask = slot["feature_mask"]
    rows, cols = attention.valid_region(mask)
    if decoder and detections:
        rank = {int(q): k for k, q in enumerate(slot["queries"])}
        maps = [slot["decoder_attention"][rank[d["query"]]].reshape(mask.shape)[:rows, :cols] for d in detections]
        draw.save_figure(draw.decoder_attention_figure(image, detections, maps),
                         out_dir / f"{name}_decoder_attention.png")
    if encoder_pixels:
        cells = [attention.feature_cell(p, row["orig_size"], row["size"], stride, (rows, cols)) for p in encoder_pixels]
        maps = [attention.encoder_map(slot["encoder_attention"], mask.shape, c)[:rows, :cols] for c in cells]
        draw.save_figure(draw.encoder_attention_figure(image, encoder_pixels, maps),
                         out_dir / f"{name}_encoder_attention.png")


def thing_labels(num_classes: int, data_config) -> np.ndarray:
    """[num_classes] bool, which labels are things (the rest stuff, merged per class by the panoptic
    post-processing): the run's dataset's own (a synthetic or COCO panoptic folder, read here), else
    official DETR's COCO panoptic rule (labels = category ids, things 1..90: the official 250-class
    models, tfds coco/2017_panoptic)."""
    if data_config is not None and data_config.source in ("synthetic", "coco_panoptic") and data_config.masks:
        from detr_jax.data import load_dataset

        isthing = np.ones(num_classes, bool)
        known = np.asarray(load_dataset(data_config, "val", process_index=0, process_count=1).info.isthing, bool)
        isthing[:min(num_classes, len(known))] = known[:num_classes]
        return isthing
    return np.arange(num_classes) <= 90


def _panoptic_outputs(out_dir: Path, name: str, pixels, slot: dict, size, orig_size, names, is_thing,
                      num_classes: int, threshold: float) -> list[dict]:
    """Write NAME_panoptic.png and NAME_panoptic_ids.png of one image -> its segments for the json."""
    from detr_jax.evaluation.masks import panoptic_prediction
    from detr_jax.evaluation.panoptic import panoptic_png

    ids, segments = panoptic_prediction(slot, size, orig_size, is_thing, num_classes, threshold)
    draw.draw_panoptic(pixels, ids, segments, names).save(out_dir / f"{name}_panoptic.png")
    (out_dir / f"{name}_panoptic_ids.png").write_bytes(panoptic_png(ids))
    return [{"id": s["id"], "class": names[s["label"]], "label": s["label"], "isthing": s["isthing"],
             "area": s["area"]} for s in segments]


def detect(model, variables, data_config, paths, out_dir, *, names, threshold: float = 0.7, topk: int = 0,
           batch_size: int = 8, draw_boxes: bool = False, decoder_attention: bool = False, encoder_pixels=(),
           masks: bool = False, is_thing=None, panoptic_threshold: float = 0.85, checkpoint_name: str = "",
           padding: str = "exact", log=print) -> dict:
    """Detect objects in the image files ``paths``; write ``out_dir`` (see the module docstring).

    model, variables: a DETR module and its variables; data_config: eval sizes and buckets;
    names: a name per class (``class_names``); threshold: keep detections scoring at least this;
    topk: only each image's k best detections (``postprocess``; 0: official); batch_size: images per batch (rounded up to a
    multiple of the local devices); encoder_pixels: (x, y) original-image pixels whose encoder
    self-attention is drawn (clamped to each image); padding: config.model.padding for the
    detection ("exact": each image as if alone); masks: the panoptic result of a model with the mask
    head (``is_thing`` [num_classes] bool, ``thing_labels``; queries scoring more than
    ``panoptic_threshold`` make segments). -> the contents of detections.json.
    """
    from detr_jax.data import eval_batches
    from detr_jax.data.image_files import load_image_files
    from detr_jax.evaluation.inference import has_mask_head, host_batch_size, predictor, run_batches
    from detr_jax.parallel import local_mesh

    with_attention = decoder_attention or bool(encoder_pixels)
    if with_attention and DECODERS[model.decoder].multi_scale:
        raise UsageError(f"attention maps need dense attention; the {model.decoder!r} decoder samples a few points "
                         "per query and level (multi-scale deformable attention): drop --decoder_attention and "
                         "--encoder_pixels")
    if masks and not has_mask_head(model):
        raise UsageError("--masks draws the panoptic result of a model with the mask head (config.model.masks); "
                         "this checkpoint's model has none")
    is_thing = np.arange(model.num_classes) <= 90 if is_thing is None else np.asarray(is_thing, bool)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_config = ml_collections.ConfigDict({**data_config.to_dict(), "masks": False})  # image files: no targets
    source = load_image_files(paths, data_config)
    records = source.records
    files = {int(i): (str(p), n) for i, p, n in zip(records.image_id, records.path, output_names(records.path))}
    predict = predictor(model, topk, with_attention, padding=padding)
    batches = eval_batches(data_config, host_batch_size(batch_size, 1, jax.local_device_count()), process_index=0,
                           process_count=1, source=source)
    images, total = {}, source.info.num_images  # image id (= position in paths) -> its json entry
    for batch, output in run_batches(predict, variables, batches, local_mesh()):
        output = jax.device_get(output)
        for i in np.flatnonzero(batch["example_valid"]):
            slot = {k: v[i] for k, v in output.items()}
            image_id = int(batch["image_id"][i])
            path, name = files[image_id]
            h, w = (int(v) for v in batch["orig_size"][i])
            detections = select_detections(slot, names, threshold)
            images[image_id] = {"file": path, "width": w, "height": h, "detections": detections}
            if draw_boxes or with_attention or masks:
                pixels = original_pixels(path)
            if masks:
                images[image_id]["panoptic"] = _panoptic_outputs(
                    out_dir, name, pixels, slot, batch["size"][i], (h, w), names, is_thing, model.num_classes,
                    panoptic_threshold)
            if draw_boxes:
                draw.draw_detections(pixels, detections).save(out_dir / f"{name}.png")
            if with_attention:
                stride = np.asarray(batch["padding_mask"].shape[1:3]) / np.asarray(slot["feature_mask"].shape)
                _attention_figures(out_dir, name, np.asarray(pixels), detections, slot,
                                   {"orig_size": (h, w), "size": batch["size"][i]}, stride, encoder_pixels,
                                   decoder_attention)
        log(f"detect: {len(images)}/{total} images, {sum(len(im['detections']) for im in images.values())} "
            "detections")
    result = {"checkpoint": checkpoint_name, "threshold": threshold, "topk": topk, "class_names": list(names),
              **({"panoptic_threshold": panoptic_threshold} if masks else {}),
              "images": [images[k] for k in sorted(images)]}
    (out_dir / "detections.json").write_text(json.dumps(result, indent=1) + "\n")
    log(source.report.summary())
    log(f"wrote {out_dir / 'detections.json'}" + (f" and the pictures in {out_dir}"
                                                   if draw_boxes or with_attention or masks else ""))
    return result


def parse_pixels(specs) -> list[tuple[float, float]]:
    """['X,Y', ...] (command line) -> [(x, y)]; a clear error for anything else."""
    pixels = []
    for spec in specs:
        parts = spec.split(",")
        try:
            x, y = (float(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--encoder_pixel={spec!r}: expected X,Y in original-image pixels, e.g. 120,80") from None
        pixels.append((x, y))
    return pixels



def detect_checkpoint(config, images, output, *, workdir=None, checkpoint: str = "", step=None,
                      class_names_override=(), encoder_pixels=(), padding: str | None = None, log=print,
                      **settings) -> dict:
    """What the command line does: load a checkpoint (``load_for_eval``: a training workdir's latest
    or ``step``, a converted directory, an official .pth/.npz for config.model), take the eval sizes
    from config.data (else the training run's), find the images (a file, folder or glob, or a list
    of image paths) and ``detect``. padding: None for config.eval.padding (of config, else of the
    training run; default "exact"). settings: threshold, topk, batch_size, draw_boxes, decoder_attention,
    masks, panoptic_threshold (None: config.eval.panoptic_threshold)."""
    from detr_jax import build_model
    from detr_jax.data.image_files import find_images
    from detr_jax.evaluation.checkpoints import data_config_for, eval_settings, load_for_eval
    from detr_jax.validation import validate

    if config is not None:
        validate(config)
    if not checkpoint and not workdir:
        raise ConfigError("nothing to load: pass --workdir (a training run) or --checkpoint (a converted directory "
                         "or an official .pth file)")
    model_config = config.model if config is not None and "model" in config else None
    loaded = load_for_eval(checkpoint, workdir=workdir, step=step, model_config=model_config, warn=log)
    data_config = data_config_for(config, loaded)
    settings_of = eval_settings(config if config is not None else loaded.run_config)
    padding = padding or settings_of.padding
    if settings.get("panoptic_threshold") is None:
        settings["panoptic_threshold"] = float(settings_of.panoptic_threshold)
    if settings.get("masks"):
        settings["is_thing"] = thing_labels(loaded.model_config.num_classes, data_config)
    paths = find_images(images) if isinstance(images, str) else list(images)
    names = class_names(loaded.model_config.num_classes, data_config, class_names_override, loaded.class_names)
    log(f"detecting with {loaded.name} ({loaded.model_config.backbone}, {loaded.model_config.num_classes} classes) "
        f"on {len(paths)} images, eval size {data_config.eval_size} / {data_config.eval_max_size}")
    return detect(build_model(loaded.model_config), loaded.variables, data_config, paths, output, names=names,
                  encoder_pixels=encoder_pixels, checkpoint_name=loaded.name, padding=padding, log=log, **settings)
