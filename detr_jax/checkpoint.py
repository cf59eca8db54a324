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
