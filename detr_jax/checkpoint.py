"""Model variables on disk: an orbax checkpoint plus the model config that built them.

Layout of a variables directory:
  DIR/variables/          orbax StandardCheckpointer tree {"params": ..., "buffers": ...}
  DIR/model_config.json   config.model as json, so eval and training rebuild the same module
"""
import collections
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from detr_jax.config import loss_config as default_loss_config
from detr_jax.config import model_config as default_model_config
from detr_jax.errors import UsageError

# model fields that change how the model computes, not what it is: a resume may change them
# model fields that change neither the variables nor what they compute (freeze_detector: which are trained)
COMPUTE_ONLY_MODEL_FIELDS = ("dtype", "attention", "remat", "padding", "conv_impl", "freeze_detector")


def with_defaults(saved_model_config) -> ml_collections.ConfigDict:
    """A saved config.model with the fields added since it was written set to their defaults (e.g.
    ``padding``: "exact", ``conv_impl``: "auto"). Every saved model config is read through it."""
    return default_model_config(**saved_model_config.to_dict())


def with_model_defaults(saved_config) -> ml_collections.ConfigDict:
    """A saved run config with its config.model read through ``with_defaults`` and its config.loss
    through ``loss_config``'s defaults. A run saved when focal classification was a loss setting
    (``loss.classification``; the model kept an unused no-object logit) is refused: read as today's
    focal model it would have one logit too many, read as softmax its scores would be wrong."""
    config = ml_collections.ConfigDict(saved_config.to_dict())
    old_classification = config.get("loss", {}).get("classification")
    if old_classification == "sigmoid_focal":
        raise IncompatibleCheckpoint(
            "this checkpoint's run trained with the old config.loss.classification = 'sigmoid_focal' (a focal loss "
            "on a model with a no-object logit): today's focal models (config.model.classification) have "
            "num_classes logits, so it cannot be read as either kind; retrain it")
    if "model" in config:
        config.model = with_defaults(config.model)
    if "loss" in config:
        loss = {k: v for k, v in config.loss.items() if k != "classification"}  # "softmax": now the model's default
        config.loss = default_loss_config(**loss)
    return config


def save_variables(directory, variables, model_config) -> None:
    """Write ``variables`` and ``model_config`` to a new ``directory`` (refuses to overwrite)."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new output directory")
    directory.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "variables", variables)
    (directory / "model_config.json").write_text(model_config.to_json(indent=2) + "\n")


def load_variables(directory) -> tuple[dict, ml_collections.ConfigDict]:
    """(variables, model_config) from a directory written by ``save_variables``."""
    directory = Path(directory).absolute()
    config_file = directory / "model_config.json"
    if not config_file.exists() or not (directory / "variables").exists():
        raise FileNotFoundError(f"{directory}: not a detr-jax variables directory (expected variables/ "
                                "and model_config.json, as written by python -m detr_jax.convert)")
    saved = with_defaults(ml_collections.ConfigDict(json.loads(config_file.read_text())))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / "variables")
    return variables, saved


class IncompatibleCheckpoint(UsageError, ValueError):
    """The checkpoint cannot continue this config: another model, or another state tree."""


class UnreadableCheckpoints(UsageError, OSError):
    """A run's checkpoint folder holds checkpoints, none of which can be read."""


def flat_config(config) -> dict:
    """{"section.field": value} of a ConfigDict (sequences as lists, so json round trips compare equal)."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", list(value) if isinstance(value, (tuple, list)) else value

    return dict(walk(json.loads(config.to_json()), ""))


def config_changes(saved, current) -> list[tuple[str, object, object]]:
    """[(field, saved value, current value)] of the fields that differ (a missing one as None)."""
    a, b = flat_config(saved), flat_config(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def format_changes(changes) -> str:
    return "; ".join(f"{field} {old!r} -> {new!r}" for field, old, new in changes)


def model_differences(saved_model, model, ignore=()) -> list[tuple[str, object, object]]:
    """[(field, saved, current)] of the fields in which two model configs (config.model) differ,
    other than COMPUTE_ONLY_MODEL_FIELDS and ``ignore``: weights of one do not compute the other."""
    return [c for c in config_changes(saved_model, model) if c[0] not in COMPUTE_ONLY_MODEL_FIELDS + tuple(ignore)]


def _is_model_change(field: str) -> bool:
    section, _, name = field.partition(".")
    return section == "model" and name not in COMPUTE_ONLY_MODEL_FIELDS


def _shapes(leaves) -> collections.Counter:
    """How many arrays of each shape (arrays, numpy scalars or orbax ArrayMetadata)."""
    return collections.Counter(tuple(x.shape) if hasattr(x, "shape") else np.shape(x) for x in leaves)


def tree_mismatch(saved_metadata, abstract_state) -> str:
    """'' when the saved state (orbax tree metadata) has the arrays of ``abstract_state`` (same
    number, same shapes), else a description naming a few saved arrays this state has no place for."""
    saved = jax.tree_util.tree_leaves(saved_metadata.tree)
    current = _shapes(jax.tree_util.tree_leaves(abstract_state))
    if _shapes(saved) == current:
        return ""
    unplaced = sorted((x for x in saved if current[tuple(x.shape)] == 0), key=lambda x: not x.name.startswith("params"))
    unplaced = [f"{x.name} {tuple(x.shape)}" for x in unplaced[:5]]
    return (f"the checkpoint holds {len(saved)} arrays, this config's state {sum(current.values())}"
            + (f"; saved arrays with no place here: {', '.join(unplaced)}" if unplaced else ""))


class TrainCheckpoints:
    """Periodic training checkpoints in ``directory`` (orbax CheckpointManager), the last ``keep`` kept.

    Each step holds ``state`` (the train state as a pytree of arrays) and ``meta`` (json: config,
    data position, ...). Saves are asynchronous: ``save`` returns once orbax holds the arrays (the
    caller passes host copies) and writes them in the background; the next save, ``wait`` and
    ``close`` wait for it. Every process calls every method (orbax decides what each one writes).
    """

    def __init__(self, directory, keep: int | None, async_save: bool = True, create: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        """Until every save started so far is on disk."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, config, warn=print):
        """(step, state, meta, changes) of the newest readable checkpoint, or None when there is none.

        - A corrupt or partial checkpoint (meta, tree or arrays unreadable) is skipped with a warning
          naming it; the previous one is tried. Once one is read, the unreadable newer ones are
          moved aside (``set_aside``), so that the run saves those steps afresh. When none can be
          read, ``UnreadableCheckpoints``: the run never starts over beside checkpoints it could
          not read.
        - A checkpoint of another model (a ``model.*`` field other than ``COMPUTE_ONLY_MODEL_FIELDS``
          differs from ``config``) or of another state tree raises ``IncompatibleCheckpoint``, naming
          the differing fields and how to start afresh.
        - Other changes (lr, schedule, steps, evaluation, logging, ...) are allowed: ``changes`` lists
          them as (field, saved, current), for the caller to log.
        """
        unreadable = []
        for step in reversed(self.steps()):
            where = self.directory / str(step)
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                saved_config = with_model_defaults(ml_collections.ConfigDict(json.loads(meta["config"])))
                saved_tree = self.manager.item_metadata(step)["state"]
            except Exception as error:  # noqa: BLE001 - unreadable: fall back to the previous checkpoint
                warn(f"warning: checkpoint {where} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                     "falling back to an earlier one")
                unreadable.append(step)
                continue
            changes = config_changes(saved_config, with_model_defaults(config))
            model_changes = [c for c in changes if _is_model_change(c[0])]
            mismatch = tree_mismatch(saved_tree, abstract_state)
            if model_changes or mismatch:
                raise IncompatibleCheckpoint(
                    f"checkpoint {where} was written by another model and cannot continue this config: "
                    f"{format_changes(model_changes or changes) or 'no config field differs'}"
                    + (f" ({mismatch})" if mismatch else "") + ". To continue that run, use its config "
                    f"({self.directory.parent / 'config.json'}); to start a new run, use a new --workdir (or move "
                    f"{self.directory} aside).")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 - the tree fits, so the arrays themselves are damaged
                warn(f"warning: checkpoint {where} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                     "falling back to an earlier one")
                unreadable.append(step)
                continue
            for moved in self.set_aside(unreadable):
                warn(f"warning: moved the unreadable checkpoint aside to {moved}; the run continues from step {step}")
            return step, restored["state"], restored["meta"], changes
        if self.steps():
            raise UnreadableCheckpoints(
                f"none of the checkpoints {self.steps()} in {self.directory} can be read (see the warnings above); "
                f"move {self.directory} aside to start afresh, or use a new --workdir")
        return None

    def set_aside(self, steps) -> list[Path]:
        """Moves the checkpoints of ``steps`` to DIR_unreadable/STEP (STEP.1, ... when taken), kept
        for inspection, out of the manager's sight. -> the new places. Every process calls it
        (process 0 moves; the others wait for it)."""
        aside = self.directory.with_name(self.directory.name + "_unreadable")
        targets = []
        for step in steps:
            target, n = aside / str(step), 0
            while target.exists():
                n += 1
                target = aside / f"{step}.{n}"
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(target)
            targets.append(target)
        if steps:
            multihost_utils.sync_global_devices("detr_jax: unreadable checkpoints set aside")
            self.manager.reload()
        return targets

    def close(self) -> None:
        """Waits for the last save, then releases orbax's resources."""
        self.manager.wait_until_finished()
        self.manager.close()


def latest_train_variables(workdir, step: int | None = None, warn=print):
    """(step, variables {"params", "buffers"}, the run's ConfigDict, the class names saved with it or
    None) from a training workdir's checkpoints:
    the newest readable one, or ``step``. For evaluation: the optimizer state is not read, and
    nothing is written (a workdir without checkpoints/ is an error, left as it is)."""
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder; {workdir} is not a training workdir "
                                "(train.py --workdir=... writes its checkpoints there)")
    checkpoints = TrainCheckpoints(directory, keep=None, async_save=False, create=False)
    try:
        steps = [step] if step is not None else list(reversed(checkpoints.steps()))
        if not steps:
            raise FileNotFoundError(f"{checkpoints.directory}: no checkpoint to evaluate")
        for candidate in steps:
            try:
                restored = checkpoints.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
                state = restored["state"]
                config = with_model_defaults(ml_collections.ConfigDict(json.loads(restored["meta"]["config"])))
                names = restored["meta"].get("class_names")
                return (candidate, {"params": state["params"], "buffers": state["buffers"]}, config,
                        tuple(names) if names else None)
            except (ValueError, OSError, KeyError) as error:
                if step is not None:
                    raise
                warn(f"warning: checkpoint {checkpoints.directory / str(candidate)} cannot be read "
                     f"({type(error).__name__}); trying an earlier one")
        raise FileNotFoundError(f"{checkpoints.directory}: no readable checkpoint")
    finally:
        checkpoints.close()
