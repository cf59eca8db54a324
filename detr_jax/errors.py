"""The mistakes an operator can mend. Entry points (``detr_jax.cli.run``) print their message alone,
as one ``error: ...`` line, and exit with status 2; any other exception is a bug and keeps its
traceback."""


class UsageError(Exception):
    """A flag, config field, file or folder the operator gave cannot be used; the message names it
    and, where there is one, the way out."""


class ConfigError(UsageError, ValueError):
    """A config field or a flag has a value outside its type, range or allowed values, or fields and
    flags disagree."""


class DataError(UsageError, ValueError):
    """A dataset file or folder cannot be used as it is; the message names the file and the field."""


class WorkdirInUse(UsageError, OSError):
    """Another run holds the workdir."""
