"""Model variables on disk: an orbax checkpoint plus the model config that built them.

Layout of a variables directory:
  DIR/variables/          orbax StandardCheckpointer tree {"params": ..., "buffers": ...}
  DIR/model_config.json   config.model as json, so eval and training rebuild the same module
"""
import json
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp


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
    model_config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / "variables")
    return variables, model_config


class TrainCheckpoints:
    """Periodic training checkpoints in ``directory`` (orbax CheckpointManager), the last ``keep`` kept.

    Each step holds ``state`` (the train state as a pytree of arrays) and ``meta`` (json: config,
    data position, ...). ``restore`` takes the newest checkpoint that reads back whole; a corrupt
    or partial newer one is skipped with a warning naming it.
    """

    def __init__(self, directory, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, warn=print):
        """(step, state, meta) of the newest readable checkpoint, or None when there is none."""
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return step, restored["state"], restored["meta"]
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                warn(f"warning: checkpoint {self.directory / str(step)} cannot be read ({type(error).__name__}: "
                     f"{str(error)[:200]}); falling back to an earlier one")
        return None

    def close(self) -> None:
        self.manager.close()


def latest_train_variables(workdir, step: int | None = None, warn=print):
    """(step, variables {"params", "buffers"}, the run's ConfigDict) from a training workdir's checkpoints:
    the newest readable one, or ``step``. For evaluation: the optimizer state is not read."""
    checkpoints = TrainCheckpoints(Path(workdir) / "checkpoints", keep=None)
    try:
        steps = [step] if step is not None else list(reversed(checkpoints.steps()))
        if not steps:
            raise FileNotFoundError(f"{checkpoints.directory}: no checkpoint to evaluate")
        for candidate in steps:
            try:
                restored = checkpoints.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
                state = restored["state"]
                config = ml_collections.ConfigDict(json.loads(restored["meta"]["config"]))
                return candidate, {"params": state["params"], "buffers": state["buffers"]}, config
            except (ValueError, OSError, KeyError) as error:
                if step is not None:
                    raise
                warn(f"warning: checkpoint {checkpoints.directory / str(candidate)} cannot be read "
                     f"({type(error).__name__}); trying an earlier one")
        raise FileNotFoundError(f"{checkpoints.directory}: no readable checkpoint")
    finally:
        checkpoints.close()
