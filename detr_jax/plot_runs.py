r"""Convergence plots of training runs: loss terms and COCO AP on shared axes, one line per run, and
a table of each run's best and final AP. Works while the runs are still going.

  python -m detr_jax.plot_runs --workdirs=runs/a,runs/b --output=plots
  python -m detr_jax.plot_runs --workdirs=runs/a,runs/b --labels=baseline,prenorm --x=epoch --output=plots

Writes OUTPUT/losses.png, OUTPUT/ap.png and OUTPUT/summary.md (see ``detr_jax.visualize.plots``).
"""
from absl import flags

from detr_jax import cli

flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs (each with history/train.jsonl, "
                  "history/eval.jsonl).", required=True)
flags.DEFINE_string("output", None, "Directory for losses.png, ap.png and summary.md (created).", required=True)
flags.DEFINE_list("labels", [], "Comma-separated legend name of each workdir (default: the folder names).")
flags.DEFINE_enum("x", "step", ["step", "epoch"], "Horizontal axis.")


def main(argv):
    del argv
    from detr_jax.visualize.plots import plot_runs

    f = flags.FLAGS
    plot_runs(f.workdirs, f.output, x=f.x, labels=f.labels)


if __name__ == "__main__":
    cli.run(main)
