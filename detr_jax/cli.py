"""What the entry points share: one way to run, multi-host start-up flags and a quiet console.

  from detr_jax import cli
  cli.define_multihost_flags()      # at import, beside the script's own flags
  cli.start()                       # first thing in a multi-host main(): jax.distributed if asked
  cli.run(main)                     # instead of absl's app.run: quiet logs, operator errors as one line, exit 2
"""
import logging
import sys

from absl import app, flags

from detr_jax.errors import UsageError

# what an operator can mend, shown as one line: a file or folder given that is not there, or a
# UsageError (config, data, checkpoint, workdir)
OPERATOR_ERRORS = (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError)


def fail(message) -> None:
    """One ``error: ...`` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def override_error(argv, error: Exception) -> str:
    """The message of a --config.x.y=v override that ml_collections could not apply: the override
    (found by the field name the error quotes) and ml_collections' hint ("Did you mean ...")."""
    text = str(error).strip("'\"").replace("\\'", "'").replace("\\n", "\n")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in overrides if f"'{a.split('=')[0].rsplit('.', 1)[-1]}'" in text]
    field, _, hint = text.partition("\n")
    if isinstance(error, (AttributeError, KeyError)) and hint:
        return f"{', '.join(named or overrides)}: the config has no field {field}. {hint}"
    return f"{', '.join(named or overrides) or 'the config'}: {type(error).__name__}: {' '.join(text.split())}"


def flag_error(error: flags.Error) -> str:
    """absl's message of a flag that cannot be parsed; of a config file that raised, its first line
    and the exception's last line, not the traceback."""
    text = str(error)
    if "Traceback (most recent call last)" not in text:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"


def parse_flags(argv):
    """absl's flag parsing, with every flag or override mistake as one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # unknown or missing flag, a value of the wrong type, a config file that raised
        fail(flag_error(error))
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a --config.x.y=v that cannot apply
        fail(override_error(argv, error))


def run(main) -> None:
    """``app.run(main)`` for every entry point: orbax's and JAX's INFO chatter dropped (``quiet``);
    flag mistakes and ``OPERATOR_ERRORS`` are one line on stderr and exit 2; a second Ctrl-C
    (``KeyboardInterrupt``) exits 130 without a traceback."""
    def guarded(argv):
        quiet()
        try:
            main(argv)
        except OPERATOR_ERRORS as error:
            fail(error)
        except KeyboardInterrupt:
            print("interrupted: exiting without saving", file=sys.stderr, flush=True)
            sys.exit(130)

    app.run(guarded, flags_parser=parse_flags)


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
    """jax.distributed.initialize() when the flags ask for it."""
    import jax

    f = flags.FLAGS
    if f.coordinator_address or f.multihost:
        jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)


def quiet() -> None:
    """Keep the console for progress lines: drop orbax's and JAX's INFO chatter."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_LibraryChatter())
