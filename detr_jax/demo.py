r"""The first command's job: train the CPU demo, evaluate it, and draw what it learned.

  python -m detr_jax.demo                                  # configs/synthetic.py:deformable_refine, runs/demo-<time>
  python -m detr_jax.demo --config=configs/synthetic.py:tiny --workdir=/tmp/smoke   # seconds
  python -m detr_jax.demo --panoptic                       # the panoptic demo (configs/synthetic_panoptic.py)

In one run folder (named at the end): the synthetic dataset is generated on first use, the config
trains (backbone pretraining, then DETR, with step / ETA lines and periodic COCO evaluation of the
val split), then
  plots/          losses.png, ap.png, summary.md  (``python -m detr_jax.plot_runs``)
  detections/     detections.json, NAME.png with boxes (and, for decoders with dense attention,
                  NAME_decoder_attention.png and NAME_encoder_attention.png) for the first val
                  images  (``python -m detr_jax.detect``)
and a last summary: the final COCO AP, the wall time and where everything is. Run again with the
same --workdir to resume an interrupted run.

``--panoptic``: the official panoptic recipe on the synthetic shapes over two stuff classes, in
WORKDIR/detector (a detector of every segment's box) and WORKDIR/masks (the mask head on the frozen
detector), then WORKDIR/panoptic/ (``detect --masks``: NAME_panoptic.png, the panoptic result drawn,
and the COCO panoptic NAME_panoptic_ids.png) and a summary with PQ / SQ / RQ, segm AP and box AP.
``--panoptic_scale=tiny``: the same in seconds (the smoke test).
"""
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from configs.synthetic import DEMO_DECODER
from detr_jax import cli

config_flags.DEFINE_config_file("config", f"configs/synthetic.py:{DEMO_DECODER}", "Config file[:variant] to train "
                                "(default: the CPU demo, configs/synthetic.py's DEMO_DECODER).")
flags.DEFINE_string("workdir", "", "Run folder (default: runs/demo-<date>-<time>); an existing run resumes.")
flags.DEFINE_integer("num_images", 6, "Val images to draw detections and attention maps for.")
flags.DEFINE_float("threshold", 0.5, "Score threshold of the drawn detections.")
flags.DEFINE_bool("panoptic", False, "Run the panoptic demo instead (configs/synthetic_panoptic.py: the detector, "
                  "then the mask head on it; --config is not used).")
flags.DEFINE_enum("panoptic_scale", "demo", ["demo", "tiny"], "--panoptic: the demo's budget, or tiny models "
                  "and a few steps (seconds).")


def demo_images(data_config, count: int) -> list[str]:
    """The first ``count`` images (by file name) of the dataset's val image folder."""
    from detr_jax.data.coco_json import split_paths
    from detr_jax.data.image_files import find_images

    if data_config.source == "tfds":
        raise ValueError("python -m detr_jax.demo draws images of a synthetic or coco_json dataset (image files); "
                         f"config.data.source is {data_config.source!r}")
    return sorted(find_images(split_paths(data_config, "val")[1]))[:count]


def final_ap(workdir) -> dict:
    """The last row of WORKDIR/history/eval.jsonl ({} if the run was never evaluated)."""
    from detr_jax.visualize.plots import read_history

    rows = read_history(Path(workdir) / "history" / "eval.jsonl")
    return rows[-1] if rows else {}


def baseline(config) -> str:
    """For the demo's own budget (configs/synthetic.py's model, optimizer and training settings):
    what plain DETR reached on it in the CPU study; "" for any other config."""
    from configs.synthetic import DETR_AP_ON_DEMO_BUDGET, get_config

    demo = get_config(DEMO_DECODER)
    if any(config[section].to_dict() != demo[section].to_dict() for section in ("model", "optim", "train", "init")):
        return ""
    return f" (plain DETR on the same budget: AP {DETR_AP_ON_DEMO_BUDGET:.3f}, the CPU study's mean; README)"


def run_demo(config, workdir, *, num_images: int, threshold: float, log=print) -> dict:
    """Train ``config`` in ``workdir``, then write plots/ and detections/ there -> the final eval
    metrics (step, AP, AP50, ...; {} if never evaluated)."""
    from detr_jax.models.decoders import DECODERS
    from detr_jax.training import train_and_evaluate
    from detr_jax.visualize.detect import detect_checkpoint
    from detr_jax.visualize.plots import plot_runs

    workdir = Path(workdir).resolve()
    started = time.time()
    train_and_evaluate(config, workdir)
    trained = time.time()
    plot_runs([str(workdir)], workdir / "plots", log=log)
    images = demo_images(config.data, num_images)
    dense = not DECODERS[config.model.decoder].multi_scale  # deformable attention has no dense maps to draw
    detect_checkpoint(None, images, workdir / "detections", workdir=str(workdir), log=log, threshold=threshold,
                      topk=0, batch_size=config.eval.batch_size, draw_boxes=True, decoder_attention=dense,
                      encoder_pixels=[(48, 48)] if dense else [])
    metrics = final_ap(workdir)
    ap = f"COCO AP {metrics['AP']:.3f} (AP50 {metrics['AP50']:.3f}, AP75 {metrics['AP75']:.3f})" if metrics else \
        "no evaluation (config.train.eval_at_end is off)"
    drawn = ", decoder and encoder attention" if dense else ""
    log(f"\ndemo finished in {time.time() - started:.0f} s ({trained - started:.0f} s training): {ap} on the val split "
        f"at step {metrics.get('step', '-')}{baseline(config)}\nrun folder: {workdir}\n"
        f"  curves:     {workdir / 'plots'}\n"
        f"  detections: {workdir / 'detections'} (boxes at score >= {threshold:g}{drawn})\n"
        f"  checkpoints, tensorboard/, history/, eval/ as for train.py")
    return metrics


def run_panoptic_demo(workdir, *, scale: str, num_images: int, log=print) -> dict:
    """The panoptic demo (module docstring) in ``workdir`` -> the mask stage's final eval metrics."""
    from configs.synthetic_panoptic import get_config
    from detr_jax.training import train_and_evaluate
    from detr_jax.visualize.detect import detect_checkpoint
    from detr_jax.visualize.plots import plot_runs

    workdir = Path(workdir).resolve()
    prefix = "tiny_" if scale == "tiny" else ""
    detector, masks = get_config(prefix + "detector"), get_config(prefix + "masks")
    masks.init.checkpoint = str(workdir / "detector")
    started = time.time()
    log(f"panoptic demo, stage 1 of 2: the detector of every segment's box, in {workdir / 'detector'}")
    train_and_evaluate(detector, workdir / "detector")
    detector_done = time.time()
    log(f"panoptic demo, stage 2 of 2: the mask head on the frozen detector, in {workdir / 'masks'}")
    train_and_evaluate(masks, workdir / "masks")
    trained = time.time()
    plot_runs([str(workdir / "detector"), str(workdir / "masks")], workdir / "plots", log=log)
    detect_checkpoint(None, demo_images(masks.data, num_images), workdir / "panoptic", workdir=str(workdir / "masks"),
                      log=log, threshold=0.5, topk=0, batch_size=masks.eval.batch_size, draw_boxes=False,
                      decoder_attention=False, masks=True)
    overview = panoptic_overview(masks.data, workdir / "panoptic")
    metrics = final_ap(workdir / "masks")
    box = final_ap(workdir / "detector")
    if metrics:
        scores = (f"PQ {metrics['PQ']:.3f} (things {metrics['PQ_th']:.3f}, stuff {metrics['PQ_st']:.3f}; SQ "
                  f"{metrics['SQ']:.3f}, RQ {metrics['RQ']:.3f}), segm AP {metrics['segm_AP']:.3f}, box AP "
                  f"{metrics['AP']:.3f}")
    else:
        scores = "no evaluation (config.train.eval_at_end is off)"
    detector_ap = f"box AP {box['AP']:.3f}" if box else "not evaluated"
    log(f"\npanoptic demo finished in {time.time() - started:.0f} s (detector {detector_done - started:.0f} s, "
        f"mask head {trained - detector_done:.0f} s): {scores} on the val split (detector alone: {detector_ap})\n"
        f"run folder: {workdir}\n"
        f"  curves:   {workdir / 'plots'}\n"
        f"  panoptic: {workdir / 'panoptic'} (NAME_panoptic.png drawn, NAME_panoptic_ids.png COCO panoptic PNGs;\n"
        f"            {overview.name}: images, predictions, ground truth)\n"
        f"  eval:     {workdir / 'masks' / 'eval'} (panoptic.json + panoptic/, segm_results.json, metrics.json)")
    return metrics


def panoptic_overview(data_config, detect_dir) -> Path:
    """DETECT_DIR/overview.png: for each image ``detect --masks`` drew there, a column of the image,
    its panoptic prediction and its ground truth (the val split's), drawn alike."""
    import json

    import numpy as np
    from PIL import Image

    from detr_jax.data import load_dataset
    from detr_jax.visualize.detect import original_pixels
    from detr_jax.visualize.draw import draw_panoptic, grid

    source = load_dataset(data_config, "val", process_index=0, process_count=1)
    names = list(source.info.class_names)
    by_name = {Path(str(p)).name: row for row, p in enumerate(source.records.path)}
    columns = []
    for image in json.loads((Path(detect_dir) / "detections.json").read_text())["images"]:
        pixels = original_pixels(image["file"])
        gt_ids, gt_segments = source.panoptic_ground_truth(by_name[Path(image["file"]).name])
        labels = source.info.labels([s["category_id"] for s in gt_segments])
        gt = [{"id": s["id"], "label": int(label), "isthing": bool(source.info.isthing[label])}
              for s, label in zip(gt_segments, labels)]
        name = Path(image["file"]).stem
        predicted = Path(detect_dir) / f"{name}_panoptic.png"
        columns.append([pixels, Image.open(predicted), draw_panoptic(pixels, np.asarray(gt_ids), gt, names)])
    path = Path(detect_dir) / "overview.png"
    grid([list(row) for row in zip(*columns)]).save(path)
    return path


def main(argv):
    del argv
    f = flags.FLAGS
    workdir = f.workdir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    if f.panoptic:
        run_panoptic_demo(workdir, scale=f.panoptic_scale, num_images=f.num_images)
        return
    run_demo(f.config, workdir, num_images=f.num_images, threshold=f.threshold)


if __name__ == "__main__":
    cli.run(main)
