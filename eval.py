"""Evaluate DETR with COCO metrics: python eval.py --config=configs/FILE.py[:VARIANT] --workdir=DIR.

Not ready yet: evaluation lands with the evaluation issue. Today the command says so and exits
with status 2, so that scripts cannot mistake it for a finished evaluation.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file[:variant], e.g. configs/detr_coco.py:r50.")
flags.DEFINE_string("workdir", None, "Directory with checkpoints; results are written there.")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory (e.g. from python -m detr_jax.convert).")


def main(argv):
    del argv
    print("eval.py is not ready yet: detr-jax has the model and weight conversion so far; COCO evaluation "
          "comes with the evaluation issue (see README, 'Status').", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main)
