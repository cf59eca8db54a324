r"""Detect objects in image files with a DETR checkpoint; write detections.json and, on request,
the images with their detections drawn and the attention figures of the DETR paper.

  # a training run's latest checkpoint (its model, eval sizes and class names) on a folder:
  python -m detr_jax.detect --workdir=runs/synthetic --images=photos/ --output=out --draw
  # an official checkpoint on a glob, with the attention figures:
  python -m detr_jax.detect --config=configs/detr_coco.py:r50 --checkpoint=detr-r50-e632da11.pth \
      --images='photos/*.jpg' --output=out --draw --decoder_attention --encoder_pixel=200,150
  # a panoptic model (the mask head): the panoptic picture and PNG of each image
  python -m detr_jax.detect --config=configs/detr_panoptic_coco.py:r50 \
      --checkpoint=detr-r50-panoptic-00ce5173.pth --images=photos/ --output=out --masks

Images are resized as evaluation does (config.data.eval_size / eval_max_size) and run in jit-compiled
batches; see ``detr_jax.visualize.detect`` for the output files.
"""
from absl import flags
from ml_collections import config_flags

from detr_jax import cli
from detr_jax.config import PADDINGS

config_flags.DEFINE_config_file("config", None, "Config file[:variant], e.g. configs/detr_coco.py:r50: config.model "
                                "for an official checkpoint file, config.data for the eval sizes and class names. "
                                "Default: the training run's config (--workdir).")
flags.DEFINE_string("images", None, "An image file, a folder of images, or a glob pattern (quote it).", required=True)
flags.DEFINE_string("output", None, "Directory for detections.json and the pictures (created).", required=True)
flags.DEFINE_string("workdir", None, "A training run: its latest checkpoint is used when --checkpoint is empty.")
flags.DEFINE_string("checkpoint", "", "A directory written by python -m detr_jax.convert, or an official DETR "
                    ".pth/.npz file (converted for config.model).")
flags.DEFINE_integer("step", None, "Use this training checkpoint step of --workdir instead of the latest.")
flags.DEFINE_float("threshold", 0.7, "Keep detections scoring at least this.")
flags.DEFINE_integer("topk", 0, "Consider only each image's k best detections (0: softmax models all queries, "
                     "sigmoid_focal models the 100 best (query, class) pairs).")
flags.DEFINE_integer("batch_size", 8, "Images per batch.")
flags.DEFINE_bool("draw", False, "Write each image with its detections drawn (NAME.png).")
flags.DEFINE_bool("decoder_attention", False, "Write each image's decoder cross-attention figure, one panel per "
                  "detection (NAME_decoder_attention.png).")
flags.DEFINE_multi_string("encoder_pixel", [], "X,Y: a pixel of the original image whose encoder self-attention "
                          "is drawn (NAME_encoder_attention.png); repeat the flag for several pixels")
flags.DEFINE_enum("padding", None, list(PADDINGS), "config.model.padding for the detection (default: "
                  "config.eval.padding, 'exact': each image's detections are those of the image alone).")
flags.DEFINE_bool("masks", False, "A model with the mask head (config.model.masks): write each image's panoptic "
                  "result, drawn (NAME_panoptic.png) and as a COCO panoptic PNG (NAME_panoptic_ids.png).")
flags.DEFINE_float("panoptic_threshold", None, "With --masks: the score a query needs to make a segment (default: "
                   "config.eval.panoptic_threshold, 0.85 as official).")
flags.DEFINE_list("class_names", [], "Comma-separated name of every class index (default: COCO's for a 91-class "
                  "model, else the dataset's category names).")


def main(argv):
    del argv
    from detr_jax.visualize.detect import detect_checkpoint, parse_pixels

    f = flags.FLAGS
    detect_checkpoint(f.config, f.images, f.output, workdir=f.workdir, checkpoint=f.checkpoint, step=f.step,
                      class_names_override=f.class_names, encoder_pixels=parse_pixels(f.encoder_pixel),
                      threshold=f.threshold, topk=f.topk, batch_size=f.batch_size, draw_boxes=f.draw,
                      decoder_attention=f.decoder_attention, padding=f.padding, masks=f.masks,
                      panoptic_threshold=f.panoptic_threshold)


if __name__ == "__main__":
    cli.run(main)
