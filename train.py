"""Train DETR: python train.py --config=configs/FILE.py[:VARIANT] --workdir=DIR [--config.x=...].

Not ready yet: the training loop lands with the training issue. Today the command says so and
exits with status 2, so that scripts cannot mistake it for a finished run.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file[:variant], e.g. configs/detr_coco.py:r50.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


def main(argv):
    del argv
    print("train.py is not ready yet: detr-jax has the model and weight conversion so far; the training "
          "loop comes with the training issue (see README, 'Status').", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main)
