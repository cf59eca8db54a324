r"""Evaluate DETR with COCO metrics (pycocotools COCOeval, bbox) on the val split of config.data.

  # the latest training checkpoint of a run (its model and, without --config, its data config):
  python eval.py --workdir=runs/detr-r50
  # an official checkpoint, converted on the fly for the config's model, on tfds COCO val2017 against
  # the official annotations:
  python eval.py --config=configs/detr_coco.py:r50 --workdir=runs/official-r50 \
      --checkpoint=detr-r50-e632da11.pth --ground_truth=annotations/instances_val2017.json

Several hosts: run it on every host, with --multihost (Cloud TPU) or --coordinator_address,
--num_processes and --process_id; process 0 prints and writes.

Prints pycocotools' 12-number summary and a per-class AP table; writes WORKDIR/eval/NAME/
(coco_results.json, metrics.json, per_class_ap.csv, summary.txt), NAME = step_%06d for a training
checkpoint, else the checkpoint's name. Settings: flags > config.eval > defaults
(see ``detr_jax.config.eval_config``).
"""
from absl import flags
from ml_collections import config_flags

from detr_jax import cli
from detr_jax.config import PADDINGS

config_flags.DEFINE_config_file("config", None, "Config file[:variant], e.g. configs/detr_coco.py:r50: config.data "
                                "is the dataset evaluated (its val split), config.model the model of an official "
                                "checkpoint file. Default: the training run's config (training checkpoints).")
flags.DEFINE_string("workdir", None, "Run directory: its checkpoints/ are evaluated when --checkpoint is empty; "
                    "results go to WORKDIR/eval/.", required=True)
flags.DEFINE_string("checkpoint", "", "Empty: the workdir's latest training checkpoint. Or a directory written by "
                    "python -m detr_jax.convert, or an official DETR .pth/.npz file (converted for config.model).")
flags.DEFINE_integer("step", None, "Evaluate this training checkpoint step instead of the latest.")
flags.DEFINE_integer("batch_size", None, "Global eval batch size (default: config.eval.batch_size, 8).")
flags.DEFINE_float("score_threshold", None, "Keep detections scoring at least this (default 0: all, official).")
flags.DEFINE_integer("topk", None, "Keep each image's k best detections (default 0, official: softmax models all "
                     "queries, sigmoid_focal models the 100 best (query, class) pairs).")
flags.DEFINE_string("ground_truth", None, "An instances json to evaluate against (e.g. the official "
                    "instances_val2017.json with tfds COCO); default: the dataset's own annotations.")
flags.DEFINE_enum("padding", None, list(PADDINGS), "The model's padding for the evaluation (default: "
                  "config.eval.padding, 'exact': each image's outputs are those of the image alone, whatever the "
                  "batch and bucket; 'official': official DETR's padded-batch computation).")
flags.DEFINE_float("panoptic_threshold", None, "A model with the mask head: the score a query needs to make a "
                   "panoptic segment (default: config.eval.panoptic_threshold, 0.85 as official).")
cli.define_multihost_flags()


def main(argv):
    del argv
    import jax

    from detr_jax.evaluation import evaluate_checkpoint

    f = flags.FLAGS
    cli.start()
    log = print if jax.process_index() == 0 else (lambda *args: None)
    evaluate_checkpoint(f.config, f.workdir, checkpoint=f.checkpoint, step=f.step, log=log,
                        batch_size=f.batch_size, score_threshold=f.score_threshold, topk=f.topk,
                        ground_truth=f.ground_truth, padding=f.padding, panoptic_threshold=f.panoptic_threshold)


if __name__ == "__main__":
    cli.run(main)
