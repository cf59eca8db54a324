"""Train DETR: python train.py --config=configs/FILE.py[:VARIANT] --workdir=DIR [--config.x.y=...].

Resumes from the newest checkpoint in DIR when there is one. Multi-host: run one process per host;
on Cloud TPU `jax.distributed.initialize()` finds its peers itself (--multihost), elsewhere give
--coordinator_address, --num_processes and --process_id.
"""
from absl import flags
from ml_collections import config_flags

from detr_jax import cli

config_flags.DEFINE_config_file("config", None, "Config file[:variant], e.g. configs/synthetic.py:tiny.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation results.", required=True)
cli.define_multihost_flags()
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    cli.start()
    from detr_jax.training import train_and_evaluate

    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
