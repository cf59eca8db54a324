"""What the entry points share: multi-host start-up flags and a quiet console.

  from detr_jax import cli
  cli.define_multihost_flags()      # at import, beside the script's own flags
  cli.start()                       # first thing in main(): jax.distributed if asked, quiet logs
  cli.quiet()                       # single-host entry points: quiet logs only
"""
import logging

from absl import flags


def define_multihost_flags() -> None:
    flags.DEFINE_bool("multihost", False, "Several hosts: jax.distributed.initialize() finds its peers "
                      "(Cloud TPU, SLURM).")
    flags.DEFINE_string("coordinator_address", None, "Several hosts elsewhere: host:port of process 0 (with "
                        "--num_processes and --process_id).")
    flags.DEFINE_integer("num_processes", None, "Number of hosts, with --coordinator_address.")
    flags.DEFINE_integer("process_id", None, "This host's index, with --coordinator_address.")


class _LibraryChatter(logging.Filter):
    """Drops the INFO lines orbax and JAX's backend probing write at every checkpoint and start."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(name in record.pathname for name in ("orbax", "xla_bridge", "tensorstore"))
        return record.levelno >= logging.WARNING or not noisy


def start() -> None:
    """jax.distributed.initialize() when the flags ask for it; keep the console for progress lines."""
    import jax

    f = flags.FLAGS
    if f.coordinator_address or f.multihost:
        jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    quiet()


def quiet() -> None:
    """Keep the console for progress lines: drop orbax's and JAX's INFO chatter."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_LibraryChatter())
