"""What ``eval.py`` does: find the variables to evaluate, settle the settings, call ``evaluate``.

Checkpoints (``--checkpoint``):
  ""                    the newest readable training checkpoint of the workdir (or ``--step``),
                        with the model config of its run (``detr_jax.checkpoint.latest_train_variables``);
  a directory           written by ``python -m detr_jax.convert`` (variables + model_config.json);
  a .pth / .pt / .npz   an official PyTorch DETR checkpoint, converted on the fly for config.model.
"""
import dataclasses
from pathlib import Path

import ml_collections

from detr_jax.config import eval_config, loss_config
from detr_jax.errors import ConfigError

OFFICIAL_SUFFIXES = (".pth", ".pt", ".npz")


def eval_settings(config, **flags) -> ml_collections.ConfigDict:
    """The settings used: ``eval_config()`` defaults, then config.eval, then the flags that are not
    None (command line)."""
    settings = eval_config()
    if config is not None and "eval" in config:
        unknown = set(config.eval.keys()) - set(settings.keys())
        if unknown:
            raise ConfigError(f"config.eval has unknown fields {sorted(unknown)}; expected {sorted(settings.keys())}")
        settings.update(config.eval)
    unknown = set(flags) - set(settings.keys())
    if unknown:
        raise TypeError(f"unknown evaluation settings {sorted(unknown)}")
    settings.update({k: v for k, v in flags.items() if v is not None})
    return settings


@dataclasses.dataclass
class Loaded:
    """Variables to evaluate, the model config that built them, and where they came from."""
    variables: dict
    model_config: ml_collections.ConfigDict
    step: int | None  # training step, for a training checkpoint
    name: str  # for messages and the eval directory of a checkpoint without a step
    run_config: ml_collections.ConfigDict | None  # the training run's config, for a training checkpoint
    class_names: tuple[str, ...] | None = None  # of the dataset it was trained on, for a training checkpoint


def load_for_eval(checkpoint: str, *, workdir, step: int | None = None, model_config=None, warn=print) -> Loaded:
    """The variables ``checkpoint`` names (see the module docstring). ``model_config``: config.model,
    needed for an official file (the file has no model config); ``step``: training checkpoints only."""
    from detr_jax import checkpoint as ckpt
    from detr_jax import convert

    if not checkpoint:
        found_step, variables, run_config, names = ckpt.latest_train_variables(workdir, step, warn=warn)
        return Loaded(variables, run_config.model, found_step, f"step {found_step} of {workdir}",
                      run_config, names)
    path = Path(checkpoint)
    if step is not None:
        raise ConfigError(f"--step selects a training checkpoint of the workdir; it cannot go with --checkpoint={path}")
    if path.is_dir():
        variables, saved_config = ckpt.load_variables(path)
        differences = ckpt.model_differences(saved_config, model_config) if model_config else []
        if differences:
            raise ConfigError(f"{path} was converted for another model than --config's: "
                              f"{ckpt.format_changes(differences)} "
                              f"(converted -> --config). Pass the config it was converted with (its "
                              f"model_config.json), or convert the original file again with this --config")
        return Loaded(variables, saved_config, None, path.name, None)
    if path.suffix not in OFFICIAL_SUFFIXES:
        raise FileNotFoundError(f"{path}: expected a variables directory (python -m detr_jax.convert) or an official "
                                f"DETR checkpoint file ({', '.join(OFFICIAL_SUFFIXES)})")
    if model_config is None:
        raise ConfigError(f"{path}: converting an official checkpoint needs config.model (pass --config, e.g. "
                         "configs/detr_coco.py:r50 for detr-r50-*.pth)")
    variables = convert.from_official_state_dict(convert.load_state_dict_file(path), model_config)
    return Loaded(variables, model_config, None, path.stem, None)


def loss_config_for(config, loaded: Loaded):
    """config.loss of --config, else of the training run that wrote the checkpoint, else the
    official default (``detr_jax.config.loss_config()``): the loss of the val loss terms."""
    for candidate in (config, loaded.run_config):
        if candidate is not None and "loss" in candidate:
            return candidate.loss
    return loss_config()


def data_config_for(config, loaded: Loaded):
    """config.data of --config, else of the training run that wrote the checkpoint: the dataset and
    the eval sizes."""
    for candidate in (config, loaded.run_config):
        if candidate is not None and "data" in candidate:
            return candidate.data
    raise ConfigError("no data config: pass --config with a config.data (e.g. configs/detr_coco.py:r50) to say "
                     "which dataset and eval image sizes to use")


def evaluate_checkpoint(config, workdir, *, checkpoint: str = "", step: int | None = None, log=print,
                        **flags) -> dict:
    """Evaluate a checkpoint (see ``load_for_eval``) on config.data's val split; results in
    WORKDIR/eval/step_%06d (training checkpoint) or WORKDIR/eval/NAME (NAME: the converted directory's
    or official file's name). ``config``: the --config ConfigDict or None (then the training run's
    config); flags: batch_size, score_threshold, topk, ground_truth, padding overriding ``eval_settings``.
    The val loss terms use ``loss_config_for``.
    -> ``evaluate``'s result."""
    from detr_jax import build_model, data
    from detr_jax.evaluation.evaluator import evaluate

    from detr_jax.validation import validate

    if config is not None:
        validate(config)
    model_config = config.model if config is not None and "model" in config else None
    loaded = load_for_eval(checkpoint, workdir=workdir, step=step, model_config=model_config, warn=log)
    data_config = data_config_for(config, loaded)
    settings = eval_settings(config if config is not None else loaded.run_config, **flags)
    source = data.load_dataset(data_config, "val")
    log(f"evaluating {checkpoint or 'the latest training checkpoint'} ({loaded.name}; backbone "
        f"{loaded.model_config.backbone}, {loaded.model_config.num_classes} classes) on {source.info.num_images} "
        f"val images, batch {settings.batch_size}")
    if loaded.model_config.num_classes < source.info.num_classes:
        log(f"warning: the model has {loaded.model_config.num_classes} classes but the dataset's labels go up to "
            f"{source.info.num_classes - 1}: the missing classes are never detected")
    result = evaluate(build_model(loaded.model_config), loaded.variables, data_config,
                      batch_size=settings.batch_size, workdir=workdir, step=loaded.step,
                      name=None if loaded.step is not None else loaded.name, source=source,
                      score_threshold=float(settings.score_threshold), topk=int(settings.topk),
                      ground_truth=settings.ground_truth or None, loss_config=loss_config_for(config, loaded),
                      padding=settings.padding, panoptic_threshold=float(settings.panoptic_threshold), log=log)
    log(source.report.summary())  # after the pass: includes images that could not be read
    return result
