"""COCO evaluation of DETR: PostProcess, data-parallel inference, pycocotools COCOeval, per-class AP.

    from detr_jax.evaluation import evaluate
    result = evaluate(model, variables, config.data, batch_size=8, workdir=workdir, step=step)
    result["AP"], result["AP50"], ..., result["ARl"]    # pycocotools' 12 numbers
    result["num_images"], result["per_class"]           # evaluated images; per-category AP

``evaluate`` is what periodic evaluation during training calls; ``eval.py`` calls
``evaluate_checkpoint`` (training checkpoints, converted directories, official .pth files).
Modules: ``postprocess`` (official PostProcess), ``inference`` (jit per shape, batch sharded over
the local devices, gathered over hosts), ``coco`` (results json, COCOeval, per-class AP),
``evaluator`` (``evaluate`` and the output files), ``checkpoints`` (what eval.py evaluates).
"""
from detr_jax.evaluation.checkpoints import eval_config, eval_settings, evaluate_checkpoint, load_for_eval
from detr_jax.evaluation.coco import METRIC_NAMES, detections_to_results, per_class_ap, run_cocoeval
from detr_jax.evaluation.evaluator import eval_dir, evaluate
from detr_jax.evaluation.postprocess import postprocess

__all__ = ["METRIC_NAMES", "detections_to_results", "eval_config", "eval_dir", "eval_settings", "evaluate",
           "evaluate_checkpoint", "load_for_eval", "per_class_ap", "postprocess", "run_cocoeval"]
