"""``evaluate``: a model's COCO bbox metrics and DETR loss terms on the val split of a data config.

Steps: every host runs forward + PostProcess + the loss sums over its ``eval_batches`` share
(``inference``), the predictions and loss sums are gathered (the val loss is then known on every
process, see ``val_loss_terms``), and process 0 turns them into COCO results (true category ids,
original pixels), runs pycocotools COCOeval over the evaluated images, prints the standard summary
and the per-class table, and writes the files below; the 12 numbers are then sent to every host.

Output files (process 0, when ``workdir`` is given), in WORKDIR/eval/NAME/ with NAME ``step_%06d``
of the given step (e.g. eval/step_000100/), else the given ``name``, else ``results``:
  coco_results.json  the detections: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]
  metrics.json       the 12 numbers, the val loss terms (val_loss, val_loss_ce, ...), num_images,
                     num_detections, per_class and the settings used
  per_class_ap.csv   category_id, name, num_gt, AP, AP50, AP75 per category
  summary.txt        pycocotools' summary and the per-class table, as printed
and for a model with the mask head (``config.model.masks``, ``detr_jax.evaluation.masks``):
  panoptic/*.png, panoptic.json   the panoptic predictions in the COCO panoptic format (ids 1..n)
  segm_results.json  the instance masks of the detections, COCO segm results (RLE)
  metrics.json gains PQ, SQ, RQ (All, Things, Stuff: PQ_th ...; fractions), per-class PQ and the 12
  segm COCOeval numbers (segm_AP, segm_AP50, ...); summary.txt the PQ table and the segm summary.
"""
import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from detr_jax import config as config_lib
from detr_jax.classification import classification as classification_of
from detr_jax.evaluation import coco
from detr_jax.evaluation.inference import gather_hosts, has_mask_head, host_batch_size, predict_batches, predictor
from detr_jax.evaluation.masks import MaskScorer
from detr_jax.evaluation.panoptic_quality import format_table
from detr_jax.parallel import local_mesh

NUMBERS = (*coco.METRIC_NAMES, "num_images", "num_detections")  # what process 0 sends to the others
PQ_NAMES = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
SEGM_NAMES = tuple(f"segm_{name}" for name in coco.METRIC_NAMES)


def eval_dir(workdir, *, step: int | None = None, name: str | None = None) -> Path:
    """WORKDIR/eval/step_%06d (step given), else WORKDIR/eval/NAME, else WORKDIR/eval/results."""
    if step is not None:
        return Path(workdir) / "eval" / f"step_{int(step):06d}"
    return Path(workdir) / "eval" / (name or "results")


def ground_truth_coco(source, ground_truth_file: str | None = None):
    """pycocotools COCO of the val split: the given instances json (e.g. the official
    instances_val2017.json for tfds COCO), else ``source.ground_truth()`` (the annotations as the
    source read them, crowd included: the same as a well-formed annotation file, and also right for
    files that leave out optional fields such as 'area' or 'iscrowd')."""
    if ground_truth_file:
        return coco.load_ground_truth_file(ground_truth_file)
    return coco.coco_from_dict(source.ground_truth())


def evaluated_images(record, source) -> np.ndarray:
    """record [n] int32 (rows of source.records, -1 for fillers) -> the image ids evaluated [m];
    an image evaluated twice is an error (every image must be evaluated exactly once)."""
    rows = record[record >= 0]
    counts = np.bincount(rows, minlength=len(source.records))
    if (counts > 1).any():
        twice = source.records.image_id[counts > 1]
        raise RuntimeError(f"{(counts > 1).sum()} images were evaluated more than once, e.g. image ids "
                           f"{twice[:5].tolist()}; the eval batches must hold every image exactly once")
    return source.records.image_id[rows]


def score_predictions(predictions: dict, source, gt, *, score_threshold: float = 0.0) -> dict:
    """Gathered predictions (see ``inference.predict_batches``) -> COCO evaluation.

    -> {METRIC_NAMES: float, "num_images", "num_detections", "per_class", "summary" (pycocotools'
    text), "results" (the COCO results entries)}.
    """
    valid = predictions["record"] >= 0
    image_ids = evaluated_images(predictions["record"], source)
    results = coco.detections_to_results(image_ids, predictions["scores"][valid], predictions["labels"][valid],
                                         predictions["boxes"][valid], source.info.label_to_category_id,
                                         score_threshold=score_threshold)
    evaluator, summary = coco.run_cocoeval(gt, results, image_ids)
    return {**coco.stats_dict(evaluator), "num_images": int(len(image_ids)), "num_detections": len(results),
            "per_class": coco.per_class_ap(evaluator), "summary": summary, "results": results}


def score_masks(scorer) -> dict:
    """A gathered ``MaskScorer`` -> {PQ_NAMES: float, "per_class_pq", SEGM_NAMES: float, "segm_summary",
    "pq_table", "segm_results"} (process 0)."""
    results = scorer.summary()
    numbers = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        numbers.update({f"{k.upper()}{suffix}": results[group][k] for k in ("pq", "sq", "rq")})
    gt = coco.coco_from_dict(scorer.segm_ground_truth())
    evaluator, segm_summary = coco.run_cocoeval(gt, scorer.segm_results, [i["id"] for i in scorer.images],
                                                iou_type="segm")
    segm = {f"segm_{k}": v for k, v in coco.stats_dict(evaluator).items()}
    return {**numbers, **segm, "per_class_pq": results["per_class"], "pq_table": format_table(results),
            "segm_summary": segm_summary, "segm_results": scorer.segm_results}


def val_loss_terms(loss_sums: dict, loss_config) -> dict:
    """The loss of the whole val split from its per-batch sums: {"val_loss" (weighted total),
    "val_" + each term of ``compute_loss`` (val_loss_ce, val_loss_bbox, val_loss_giou,
    val_cardinality_error, val_class_error, aux layers' val_loss_ce_0 ...)}: floats.

    loss_sums: {term: [num_batches, 2]} (numerator, denominator) of ``losses.loss_sums`` per batch,
    every host's batches. A batch's term is numerator / denominator, the official normalisation:
    loss_bbox and loss_giou (and focal loss_ce) = sum over its matched boxes / its number of boxes,
    softmax loss_ce = sum of weight x NLL / sum of the weights, cardinality_error = sum over images /
    images, class_error = 100 x wrong / matched. The split's term is (sum of the numerators) / (sum of
    the denominators) over all batches, i.e. each batch's term weighted by its box count, weight sum,
    image count or matched count: exactly ``compute_loss`` on all val images in one batch, whatever
    the batch size. Fillers count nowhere (``loss_sums`` with example_valid)."""
    from detr_jax.losses import normalise

    sums = {name: tuple(np.asarray(v, np.float64).sum(0)) for name, v in loss_sums.items()}
    total, terms = normalise(sums, loss_config)
    return {"val_loss": float(total), **{f"val_{name}": float(value) for name, value in terms.items()}}


def write_outputs(directory: Path, scored: dict, val_loss: dict, settings: dict) -> None:
    """The files of the module docstring into ``directory`` (created; existing files replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "coco_results.json").write_text(json.dumps(scored["results"]))
    metrics = {**settings, **{k: scored[k] for k in coco.METRIC_NAMES}, **val_loss,
               **{k: scored[k] for k in ("num_images", "num_detections", "per_class")}}
    text = scored["summary"] + "\n" + coco.format_per_class(scored["per_class"]) + "\n"
    if "PQ" in scored:
        metrics.update({k: scored[k] for k in PQ_NAMES + SEGM_NAMES}, panoptic_threshold=scored["panoptic_threshold"],
                       per_class_pq={str(k): v for k, v in scored["per_class_pq"].items()})
        (directory / "segm_results.json").write_text(json.dumps(scored["segm_results"]))
        text += "panoptic quality:\n" + scored["pq_table"] + "\nsegm:\n" + scored["segm_summary"]
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    coco.write_per_class_csv(directory / "per_class_ap.csv", scored["per_class"])
    (directory / "summary.txt").write_text(text)


def broadcast_numbers(values: np.ndarray) -> np.ndarray:
    """float64 values of process 0 on every process, bit for bit (sent as int32 words: jax without
    x64 would round float64 to float32)."""
    if jax.process_count() == 1:
        return values
    words = np.frombuffer(np.ascontiguousarray(values, np.float64).tobytes(), np.int32)
    words = np.asarray(multihost_utils.broadcast_one_to_all(words), np.int32)
    return np.frombuffer(words.tobytes(), np.float64)


def _check_options(model, batch_size: int, score_threshold: float, topk: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}; expected a positive integer")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold = {score_threshold}; expected a probability in [0, 1] (0 keeps all)")
    most = classification_of(model.classification).max_topk(model.num_queries, model.num_classes)
    if not isinstance(topk, (int, np.integer)) or not 0 <= topk <= most:
        raise ValueError(f"topk = {topk!r}; expected 0 (official) or 1..{most} (the most detections per image of a "
                         f"{model.classification} model with {model.num_queries} queries)")


def evaluate(model, variables, data_config, *, batch_size: int, workdir=None, step: int | None = None,
             name: str | None = None, source=None, score_threshold: float = 0.0, topk: int = 0,
             ground_truth: str | None = None, loss_config=None, padding: str = "exact",
             panoptic_threshold: float = 0.85, log=print) -> dict:
    """COCO bbox evaluation and loss terms of ``model`` with ``variables`` on the val split of ``data_config``.

    model: ``build_model(config.model)``; variables: {"params", "buffers"} (numpy or jax arrays);
    data_config: ``config.data`` (tfds COCO, a COCO-format folder or the synthetic dataset).
    batch_size: global, over all hosts; each host takes its share rounded up to a multiple of its
      devices (extra slots are fillers). The result does not depend on it.
    workdir, step, name: where the files go (see the module docstring; nothing written without workdir).
    source: ``detr_jax.data.load_dataset(data_config, "val")`` to reuse (periodic evaluation during
      training loads it once); default: loaded here.
    score_threshold: keep detections scoring at least this (0: all, official); topk: keep each
      image's k best queries (0: all, official). ground_truth: an instances json to evaluate against
      (e.g. the official instances_val2017.json with tfds COCO); default: ``source.ground_truth()``.
    loss_config: config.loss of the run, for the val loss terms (default: ``config.loss_config()``,
      the official loss).
    padding: config.model.padding of the evaluation, whatever the model was trained with
      (config.eval.padding; "exact": each image as if alone, so no bucket or batch moves a box).
    panoptic_threshold: a model with the mask head: the score a query needs to make a panoptic
      segment (config.eval.panoptic_threshold; 0.85 as official).
    log: where process 0 prints the summary and per-class table (None: silent).

    Detections whose label has no category id (unused labels, -1 in
    ``info.label_to_category_id``) are left out of the results: pycocotools ignores them anyway.
    Fillers and unreadable images (fillers too, counted in the data report) are not evaluated;
    COCOeval's imgIds are the evaluated images.

    Works with several hosts (each evaluates its share; predictions gathered; process 0 runs
    COCOeval and writes) and several local devices (batches sharded over them).

    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
    (floats, pycocotools' COCOeval.stats), the val loss terms of ``val_loss_terms`` ("val_loss",
    "val_loss_ce", "val_loss_bbox", "val_loss_giou", "val_class_error", ...: floats), "num_images"
    (evaluated images), "num_detections"
    (results entries): the same on every process; "per_class" ([{"category_id", "name", "num_gt",
    "AP", "AP50", "AP75"}]; process 0, [] elsewhere), "summary" (pycocotools' printed summary;
    process 0, "" elsewhere), "eval_dir" (str or None), "inference_seconds", "cocoeval_seconds"
    (this process's)}.
    """
    from detr_jax import data

    _check_options(model, batch_size, score_threshold, topk)
    source = source if source is not None else data.load_dataset(data_config, "val")
    if source.info.num_images == 0:
        raise ValueError("the val split has no images to evaluate (see the data report)")
    loss_config = loss_config if loss_config is not None else config_lib.loss_config()
    start = time.perf_counter()
    scorer = (MaskScorer(source, num_classes=model.num_classes, threshold=panoptic_threshold) if has_mask_head(model)
              else None)
    predictions = predict_split(model, variables, data_config, source, batch_size=batch_size, topk=topk,
                                loss_config=loss_config, padding=padding, masks=scorer)
    val_loss = val_loss_terms(predictions["loss_sums"], loss_config)  # the same on every process
    timings = {"inference_seconds": time.perf_counter() - start, "cocoeval_seconds": 0.0}
    directory = None if workdir is None else eval_dir(workdir, step=step, name=name)
    if scorer is not None:
        if directory is not None:
            scorer.write_pngs(directory)
        scorer.gather()
    numbers_of = NUMBERS + (PQ_NAMES + SEGM_NAMES if scorer is not None else ())
    scored = None
    if jax.process_index() == 0:
        start = time.perf_counter()
        scored = score_predictions(predictions, source, ground_truth_coco(source, ground_truth),
                                   score_threshold=score_threshold)
        if scorer is not None:
            scored.update(score_masks(scorer), panoptic_threshold=panoptic_threshold)
            if directory is not None:
                scorer.write_json(directory)
        timings["cocoeval_seconds"] = time.perf_counter() - start
        if log is not None:
            _log_scored(log, scored, val_loss, source, ground_truth)
        if directory is not None:
            write_outputs(directory, scored, val_loss, {"step": step, "name": name, "batch_size": batch_size,
                                              "score_threshold": score_threshold, "topk": topk,
                                              "ground_truth": ground_truth or "source"})
    numbers = broadcast_numbers(np.asarray([scored[k] for k in numbers_of] if scored else [0.0] * len(numbers_of)))
    named = dict(zip(numbers_of, numbers.tolist()))
    return {**{k: float(named[k]) for k in numbers_of if k not in ("num_images", "num_detections")}, **val_loss,
            "num_images": int(named["num_images"]), "num_detections": int(named["num_detections"]),
            "per_class": scored["per_class"] if scored else [], "summary": scored["summary"] if scored else "",
            "eval_dir": None if directory is None else str(directory), **timings}


def predict_split(model, variables, data_config, source, *, batch_size: int, topk: int, loss_config,
                  padding: str, masks=None) -> dict:
    """Every host's predictions and loss sums of the val split (``predict_batches``), gathered on
    every process. batch_size: global (see ``evaluate``). masks: a MaskScorer (model with the mask
    head), fed this host's masks batch by batch."""
    from detr_jax import data

    host_batch = host_batch_size(batch_size, jax.process_count(), jax.local_device_count())
    batches = data.eval_batches(data_config, host_batch, source=source)
    predict = predictor(model, topk, loss_config=loss_config, padding=padding)
    return gather_hosts(predict_batches(predict, variables, batches, source.records.image_id, local_mesh(), masks))


def _log_scored(log, scored: dict, val_loss: dict, source, ground_truth) -> None:
    """Print the evaluation: image counts, pycocotools' summary, the per-class table, the val loss."""
    total, done = source.info.num_images, scored["num_images"]
    log(f"COCO bbox evaluation: {done} of {total} val images evaluated"
        + (f" ({total - done} unreadable, left out: see the data report)" if done < total else "")
        + f", {scored['num_detections']} detections, ground truth: {ground_truth or 'the dataset annotations'}")
    log(scored["summary"].rstrip("\n"))
    log("per-class AP (IoU 0.50:0.95, area all, 100 detections; -1: no ground truth):")
    log(coco.format_per_class(scored["per_class"]))
    if "PQ" in scored:
        log(f"panoptic quality (official PostProcessPanoptic, threshold {scored['panoptic_threshold']:g}):\n"
            + scored["pq_table"])
        log("segm (official PostProcessSegm):\n" + scored["segm_summary"].rstrip("\n"))
    log(f"val loss: {format_val_loss(val_loss)}")


def format_val_loss(val_loss: dict) -> str:
    """The final layer's val loss terms on one line: 'loss 1.2345 ce 0.123 bbox ...'."""
    return (f"loss {val_loss['val_loss']:.4f} ce {val_loss['val_loss_ce']:.3f} bbox {val_loss['val_loss_bbox']:.3f} "
            f"giou {val_loss['val_loss_giou']:.3f} class_err {val_loss['val_class_error']:.1f}")
