"""Official PyTorch DETR (and Conditional DETR, DAB-DETR, Deformable DETR) and torchvision ResNet weights <-> detr-jax
Flax variables.

The mapping is derived from the Flax model itself: every Flax leaf names the official key it comes
from (``official_key``), so any variant (R50/R101, DC5, pre-norm, learned position embedding, any
num_classes) converts with the same code, and a checkpoint that does not fit gets an error naming
the missing, unexpected and mis-shaped keys.

Layouts: conv weights torch (O, I, kh, kw) <-> Flax (kh, kw, I, O); linear weights (out, in) <-> (in,
out); the packed attention ``in_proj_weight`` [3d, d] <-> q/k/v projections; LayerNorm weight <->
scale; FrozenBatchNorm buffers <-> the ``buffers`` collection.

Command line (``--help`` lists the flags):

  python -m detr_jax.convert --config=configs/detr_coco.py:r50 \
      --input=detr-r50-e632da11.pth --output=checkpoints/detr-r50
"""
import re
from dataclasses import dataclass
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.classification import classification as classification_of
from detr_jax.errors import DataError, UsageError
from detr_jax.models.detr import MASK_HEAD_MODULES, build_model, class_head, init_inputs

BACKBONE_PREFIX = "backbone.0.body."
_QKV = ("q_proj", "k_proj", "v_proj")
_EMBEDDINGS = ("query_embed", "refpoint_embed", "row_embed", "col_embed", "label_enc")  # official nn.Embedding: key.weight
# --source: the code base a whole-model checkpoint comes from -> config.model's (decoder, classification,
# label_embedding)
SOURCES = {
    "official": ("detr", "softmax", False),  # facebookresearch/detr
    "conditional_detr": ("conditional", "sigmoid_focal", False),  # Atten4Vis/ConditionalDETR
    "dab_detr": ("dab", "sigmoid_focal", False),  # IDEA-Research/DAB-DETR
    "dn_dab_detr": ("dab", "sigmoid_focal", True),  # IDEA-Research/DN-DETR, DN-DAB-DETR
    "deformable_detr": ("deformable", "sigmoid_focal", False),  # fundamentalvision/Deformable-DETR
}
CLASS_HEAD_WEIGHT = re.compile(r"(detr\.)?class_embed(\.\d+)?\.weight")
# official DETRsegm (config.model.masks): the detector's keys under "detr.", the mask head's as they are
DETR_PREFIX = "detr."


def aliases(model_config) -> dict[str, str]:
    """The official model's state_dict keys that repeat a shared module: alias prefix -> the prefix
    of the key it repeats (DAB-DETR's decoder box head; Deformable DETR's per-layer heads, which are
    one module without box refinement, and the decoder's references to them)."""
    prefix = DETR_PREFIX if model_config.masks else ""
    return {prefix + alias: prefix + original for alias, original in _detector_aliases(model_config).items()}


def _detector_aliases(model_config) -> dict[str, str]:
    cfg = model_config
    if cfg.decoder == "dab":
        return {"transformer.decoder.bbox_embed.": "bbox_embed."}
    if cfg.decoder != "deformable":
        return {}
    heads = range(cfg.num_decoder_layers + int(cfg.two_stage))
    if cfg.with_box_refine:
        out = {f"transformer.decoder.bbox_embed.{i}.": f"bbox_embed.{i}." for i in heads}
        canonical = lambda i: f"class_embed.{i}."
    else:
        out = {f"{name}.{i}.": f"{name}.0." for name in ("class_embed", "bbox_embed") for i in heads if i}
        canonical = lambda i: "class_embed.0."
    if cfg.two_stage:
        out.update({f"transformer.decoder.class_embed.{i}.": canonical(i) for i in heads})
    return out


class CheckpointMismatchError(UsageError, ValueError):
    """A state_dict that does not fit the configured model; the message names every bad key."""


@dataclass(frozen=True)
class Leaf:
    collection: str  # "params" or "buffers"
    path: tuple[str, ...]  # Flax path inside the collection
    shape: tuple[int, ...]  # Flax shape
    key: str  # official state_dict key
    qkv: int | None  # 0/1/2: the q/k/v slice of a packed in_proj entry


def has_mask_head(state_dict) -> bool:
    """Whether an official state_dict is a DETRsegm's (with the mask head), not a detector's."""
    return any(key.startswith(tuple(m + "." for m in MASK_HEAD_MODULES)) for key in state_dict)


def _segm_key(key: str, model_config) -> str:
    """The official key of a model with ``masks``: the detector's under DETR_PREFIX."""
    if not model_config.masks or key.startswith(tuple(m + "." for m in MASK_HEAD_MODULES)):
        return key
    return DETR_PREFIX + key


def official_key(path: tuple[str, ...]) -> tuple[str, int | None]:
    """Official state_dict key of a Flax variable path, and its q/k/v slice index if packed."""
    *modules, leaf = path
    parts = []
    for m in modules:
        if m == "backbone":
            parts += ["backbone", "0", "body"]
        elif m == "position_embedding":
            parts += ["backbone", "1"]
        elif m == "ffn":
            continue
        elif match := re.fullmatch(r"(encoder|decoder)_layers_(\d+)", m):
            parts += [match[1], "layers", match[2]]
        elif match := re.fullmatch(r"(encoder|decoder)_(norm|query_scale|ref_point_head|ref_anchor_head)", m):
            parts += [match[1], match[2]]
        elif match := re.fullmatch(r"(layer\d|layers|class_embed|bbox_embed)_(\d+)", m):
            parts += [match[1], match[2]]
        elif match := re.fullmatch(r"input_proj_(\d+)_(\d+)", m):
            parts += ["input_proj", match[1], match[2]]
        elif m in ("downsample_conv", "downsample_bn"):
            parts += ["downsample", "0" if m.endswith("conv") else "1"]
        else:
            parts.append(m)
    if parts and parts[-1] in _QKV:
        qkv = _QKV.index(parts.pop())
        return ".".join(parts + ["in_proj_weight" if leaf == "kernel" else "in_proj_bias"]), qkv
    if leaf in _EMBEDDINGS:
        parts.append(leaf)
    name = "weight" if leaf in ("kernel", "scale") + _EMBEDDINGS else leaf
    return ".".join(parts + [name]), None


def variable_shapes(model_config) -> dict:
    """Abstract variables {collection: tree of ShapeDtypeStruct} of the model (no compute)."""
    model = build_model(model_config)
    image, mask = init_inputs(model_config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, mask))


def model_leaves(model_config) -> list[Leaf]:
    leaves = []
    for collection, tree in variable_shapes(model_config).items():
        for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
            key, qkv = official_key(path)
            leaves.append(Leaf(collection, path, tuple(value.shape), _segm_key(key, model_config), qkv))
    natural = lambda leaf: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", leaf.key)]
    return sorted(leaves, key=natural)  # layer3.6 before layer3.10 in listings


def _official_shape(leaf: Leaf) -> tuple[int, ...]:
    s = leaf.shape
    if leaf.qkv is not None:
        return (3 * s[-1], s[0]) if len(s) == 2 else (3 * s[0],)
    if leaf.path[-1] == "kernel" and len(s) == 4:
        return (s[3], s[2], s[0], s[1])
    if leaf.key.removeprefix(DETR_PREFIX) == "input_proj.weight":
        return (s[1], s[0], 1, 1)
    if leaf.path[-1] == "kernel":
        return (s[1], s[0])
    return s


def official_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """{official key: shape} that a checkpoint for this model must have."""
    return {leaf.key: _official_shape(leaf) for leaf in model_leaves(model_config)}


def _to_flax(leaf: Leaf, array: np.ndarray) -> np.ndarray:
    if leaf.qkv is not None:
        d = array.shape[0] // 3
        array = array[leaf.qkv * d:(leaf.qkv + 1) * d]
        return array.T if array.ndim == 2 else array
    if leaf.path[-1] == "kernel" and array.ndim == 4 and len(leaf.shape) == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf.path[-1] == "kernel":
        return array.reshape(array.shape[0], -1).T  # linear, or the 1x1 input_proj conv
    return array


def _from_flax(leaf: Leaf, array: np.ndarray) -> np.ndarray:
    if leaf.path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf.path[-1] == "kernel":
        return array.T.reshape(_official_shape(leaf) if leaf.qkv is None else array.T.shape)
    return array


def _check(state_dict, expected: dict[str, tuple], ignore=lambda key: False, hint: str = "") -> None:
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected and not ignore(k)]
    bad = [f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, model expects {expected[k]}"
           for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
    if not (missing or extra or bad):
        return
    lines = [f"the checkpoint does not fit the configured model{hint}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", bad)):
        if items:
            shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
            lines.append(f"  {len(items)} {title}:\n    " + "\n    ".join(shown))
    raise CheckpointMismatchError("\n".join(lines))


def _check_num_classes(state_dict, model_config) -> None:
    key = next((k for k in state_dict if CLASS_HEAD_WEIGHT.fullmatch(k)), None)
    kind = classification_of(model_config.classification)
    if key is not None and np.shape(state_dict[key])[0] != kind.num_logits(model_config.num_classes):
        weight = state_dict[key]
        n = kind.num_classes(np.shape(weight)[0])
        logits = f"num_classes={n} + no-object" if kind.name == "softmax" else f"num_classes={n}, sigmoid_focal"
        raise CheckpointMismatchError(
            f"{key} has {np.shape(weight)[0]} logits ({logits}) but config.model.num_classes="
            f"{model_config.num_classes}. To evaluate this checkpoint set --config.model.num_classes={n}; to "
            "fine-tune it on your classes keep your num_classes and drop its class head "
            "(drop_class_head=True, or --drop_class_head on the command line), which loads everything else "
            "and initialises a new class_embed.")


def check_source(source: str, model_config) -> None:
    """A clear error when config.model is not the model of the code base ``source`` (SOURCES)."""
    decoder, classification, label_embedding = SOURCES[source]
    ours = (model_config.decoder, model_config.classification, bool(model_config.get("label_embedding", False)))
    if ours != (decoder, classification, label_embedding):
        raise CheckpointMismatchError(
            f"--source={source} checkpoints are models with decoder {decoder!r}, classification "
            f"{classification!r} and label_embedding {label_embedding}, but config.model has decoder={ours[0]!r}, "
            f"classification={ours[1]!r} and label_embedding={ours[2]}: pass the config of that model "
            "(configs/detr_coco.py:r50, configs/conditional_coco.py:r50, configs/dab_coco.py:r50, "
            "configs/dn_dab_coco.py:r50 or configs/deformable_coco.py:KIND) or set those fields")


def without_aliases(state_dict, model_config) -> dict:
    """The state_dict without the keys that repeat a shared module (``aliases``), each checked equal
    to the key it repeats (a file whose aliases differ is not an official model)."""
    repeats = aliases(model_config)
    out = {}
    for key, value in state_dict.items():
        alias = next((a for a in repeats if key.startswith(a)), None)
        if alias is None:
            out[key] = value
            continue
        original = repeats[alias] + key[len(alias):]
        if original in state_dict and not np.array_equal(np.asarray(value), np.asarray(state_dict[original])):
            raise CheckpointMismatchError(f"{key} should repeat {original} (one shared module), but the values differ")
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for (collection, path), value in flat.items():
        tree.setdefault(collection, {})[path] = jnp.asarray(value)
    return {c: flax.traverse_util.unflatten_dict(t) for c, t in tree.items()}


def from_official_state_dict(state_dict, model_config, *, drop_class_head: bool = False, rng=None) -> dict:
    """Flax variables {"params", "buffers"} for ``build_model(model_config)`` from an official DETR
    state_dict (official key -> array, as in ``torch.load(f)["model"]``).

    ``drop_class_head``: ignore the checkpoint's class_embed and initialise a new one for
    ``model_config.num_classes`` from ``rng`` (fine-tuning on another set of classes).
    """
    state_dict = without_aliases({k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")},
                                 model_config)
    leaves = model_leaves(model_config)
    expected = {leaf.key: _official_shape(leaf) for leaf in leaves}
    is_head = lambda key: key.removeprefix(DETR_PREFIX).startswith("class_embed.")
    if drop_class_head:
        expected = {k: s for k, s in expected.items() if not is_head(k)}
    else:
        _check_num_classes(state_dict, model_config)
    _check(state_dict, expected, ignore=is_head if drop_class_head else lambda k: False)
    flat = {(leaf.collection, leaf.path): _to_flax(leaf, np.asarray(state_dict[leaf.key], np.float32))
            for leaf in leaves if leaf.key in expected}
    if drop_class_head:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        names = sorted({leaf.path[0] for leaf in leaves if leaf.collection == "params" and is_head(leaf.key)})
        for i, module in enumerate(names):
            head = class_head(model_config.num_classes, model_config.hidden_dim, model_config.classification).init(
                rng if i == 0 else jax.random.fold_in(rng, i), jnp.zeros((1, model_config.hidden_dim)))
            for name, value in head["params"].items():
                flat[("params", (module, name))] = value
    return _unflatten(flat)


def to_official_state_dict(variables, model_config) -> dict[str, np.ndarray]:
    """The inverse of ``from_official_state_dict``: official key -> float32 numpy array, loadable
    by the official PyTorch model with ``load_state_dict(..., strict=True)`` (shared modules under
    each of their keys, ``aliases``)."""
    flat = {c: flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) for c, tree in variables.items()}
    grouped: dict[str, list] = {}
    for leaf in model_leaves(model_config):
        value = np.asarray(flat[leaf.collection][leaf.path], np.float32)
        grouped.setdefault(leaf.key, []).append((leaf.qkv, _from_flax(leaf, value)))
    state_dict = {key: parts[0][1] if parts[0][0] is None else np.concatenate([p for _, p in sorted(parts)])
                  for key, parts in grouped.items()}
    for alias, original in aliases(model_config).items():
        state_dict.update({alias + k[len(original):]: v for k, v in list(state_dict.items()) if k.startswith(original)})
    return state_dict


def from_torchvision_resnet(state_dict, model_config, variables) -> dict:
    """``variables`` with the backbone replaced by torchvision ImageNet ResNet weights
    (``resnet50-*.pth`` keys: conv1.weight, bn1.running_mean, layer1.0.conv1.weight, ...).
    The classifier (fc.*) and num_batches_tracked entries are ignored."""
    backbone = _segm_key(BACKBONE_PREFIX, model_config)
    leaves = [leaf for leaf in model_leaves(model_config) if leaf.key.startswith(backbone)]
    expected = {leaf.key[len(backbone):]: _official_shape(leaf) for leaf in leaves}
    _check(state_dict, expected, ignore=lambda k: k.startswith("fc.") or k.endswith("num_batches_tracked"),
           hint=f" backbone {model_config.backbone!r} (torchvision ResNet layout)")
    flat = {(c, p): v for c, tree in variables.items()
            for p, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}
    for leaf in leaves:
        array = np.asarray(state_dict[leaf.key[len(backbone):]], np.float32)
        flat[(leaf.collection, leaf.path)] = _to_flax(leaf, array)
    return _unflatten(flat)


def load_state_dict_file(path) -> dict[str, np.ndarray]:
    """key -> numpy array from an official ``.pth`` (``{'model': state_dict}`` or a bare
    state_dict, read without torch) or an ``.npz`` of official keys."""
    from detr_jax import torch_pickle

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    obj = torch_pickle.load(path)
    state_dict = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, np.ndarray) for v in state_dict.values()):
        raise DataError(f"{path}: expected a state_dict (key -> tensor) or {{'model': state_dict}}; "
                         f"found {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, dict) else '-'}")
    return state_dict


def convert_file(input_path, output_dir, model_config, *, source: str = "official",
                 drop_class_head: bool = False, seed: int = 0) -> dict:
    """Convert a checkpoint file and save it with ``detr_jax.checkpoint.save_variables``.

    source: one of SOURCES, a whole model of that code base ("official": facebookresearch/detr;
    "conditional_detr", "dab_detr"), config.model must describe it; or "torchvision": an ImageNet
    ResNet whose weights go into the backbone of a freshly initialised model (seed ``seed``).
    Returns the variables.
    """
    from detr_jax import checkpoint

    if source in SOURCES:
        check_source(source, model_config)
    state_dict = load_state_dict_file(input_path)
    rng = jax.random.PRNGKey(seed)
    if source in SOURCES:
        variables = from_official_state_dict(state_dict, model_config, drop_class_head=drop_class_head, rng=rng)
    elif source == "torchvision":
        model = build_model(model_config)
        fresh = jax.jit(model.init)(rng, *init_inputs(model_config))
        variables = from_torchvision_resnet(state_dict, model_config, fresh)
    else:
        raise ValueError(f"source must be one of {', '.join(SOURCES)} or 'torchvision', got {source!r}")
    checkpoint.save_variables(output_dir, variables, model_config)
    return variables


def main(argv) -> None:
    from absl import flags

    from detr_jax.validation import validate

    del argv
    f = flags.FLAGS
    validate(f.config)
    variables = convert_file(f.input, f.output, f.config.model, source=f.source,
                             drop_class_head=f.drop_class_head, seed=f.seed)
    n = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    print(f"wrote {f.output}: {n:,} values ({f.source} weights from {f.input})\n{assumed_architecture(f.config.model)}")


def assumed_architecture(model) -> str:
    """What the conversion took the file to be, for the operator to check: official files of R50 and
    R50-DC5 (and of R101 and R101-DC5) have the same keys and shapes, so no file can tell them apart."""
    return (f"assumed architecture (config.model, recorded in model_config.json, checked at every load): "
            f"{model.backbone}{' DC5 (dilated last stage)' if model.dilation else ''}, "
            f"{model.num_encoder_layers} + {model.num_decoder_layers} layers, "
            f"{'pre' if model.pre_norm else 'post'}-norm, "
            f"{model.decoder} decoder{deformable_options(model)}, {model.classification} classification, "
            f"{model.num_queries} queries, {model.num_classes} classes. Official DC5 files have the keys and shapes "
            f"of their non-DC5 twins: if the file is detr-r50-dc5-*.pth or detr-r101-dc5-*.pth, the --config "
            f"variant must be r50_dc5 or r101_dc5.")


def deformable_options(model) -> str:
    """" (box refinement, two-stage)" for a Deformable DETR with those options, else ""."""
    options = [name for name, on in (("box refinement", model.with_box_refine), ("two-stage", model.two_stage)) if on]
    return f" ({', '.join(options)})" if options else ""


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/detr_coco.py:r50", "Config file[:variant]; its "
                                    "config.model describes the model (override with --config.model.x=...).")
    flags.DEFINE_string("input", None, "Checkpoint to convert: an official .pth or .npz of official keys, "
                        "or a torchvision ResNet .pth with --source=torchvision.", required=True)
    flags.DEFINE_string("output", None, "Directory to write (must not exist).", required=True)
    flags.DEFINE_enum("source", "official", [*SOURCES, "torchvision"],
                      "official: a whole facebookresearch/detr model; conditional_detr, dab_detr, deformable_detr: "
                      "a whole Atten4Vis/ConditionalDETR, IDEA-Research/DAB-DETR or fundamentalvision/Deformable-DETR "
                      "model (with the config of that model: configs/conditional_coco.py, configs/dab_coco.py, "
                      "configs/deformable_coco.py:deformable|refine|two_stage); torchvision: ImageNet ResNet "
                      "weights for the backbone only.")
    flags.DEFINE_bool("drop_class_head", False, "Initialise a new class head for config.model.num_classes "
                      "instead of loading the checkpoint's (fine-tuning on other classes).")
    flags.DEFINE_integer("seed", 0, "Seed for the parts initialised fresh.")


if __name__ == "__main__":
    from detr_jax import cli

    _define_flags()
    cli.run(main)
