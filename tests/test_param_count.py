"""Trainable parameter counts against the official model (no compile: jax.eval_shape)."""
import jax
import numpy as np
import pytest

from configs.detr_coco import get_config
from detr_jax.convert import variable_shapes
from detr_jax.models import count_trainable, trainable_mask


@pytest.mark.parametrize("variant, trainable", [("r50", 41_302_368), ("r50_dc5", 41_302_368),
                                                ("r101", 60_242_272), ("r101_dc5", 60_242_272)])
def test_trainable_count_equals_official(variant, trainable):
    config = get_config(variant).model
    shapes = variable_shapes(config)
    assert count_trainable(shapes["params"], config) == trainable


def test_frozen_parts_are_stem_layer1_and_batch_norm(reference):
    official_layout, _, _ = reference
    config = get_config("r50").model
    shapes = variable_shapes(config)
    mask = jax.tree_util.tree_flatten_with_path(trainable_mask(shapes["params"], config))[0]
    frozen = {"/".join(p.key for p in path) for path, keep in mask if not keep}
    assert frozen == {"backbone/conv1/kernel"} | {f"backbone/layer1_{b}/{c}/kernel" for b in range(3)
                                                  for c in ("conv1", "conv2", "conv3")} | {"backbone/layer1_0/downsample_conv/kernel"}
    # FrozenBatchNorm lives outside params: every buffer value plus every param value is the whole
    # official state_dict (41,631,008 values for R50).
    total = sum(int(np.prod(s)) for s in official_layout.state_dict_shapes().values())
    ours = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert ours == total == 41_631_008
    assert all(set(leaf) == {"weight", "bias", "running_mean", "running_var"}
               for leaf in _bn_modules(shapes["buffers"]))


def _bn_modules(tree):
    if "running_mean" in tree:
        yield tree
        return
    for value in tree.values():
        yield from _bn_modules(value)


def test_frozen_stages_option():
    config = get_config("r50").model
    shapes = variable_shapes(config)["params"]
    config.frozen_stages = 4  # the whole backbone frozen (official lr_backbone = 0)
    backbone = sum(x.size for x in jax.tree_util.tree_leaves(shapes["backbone"]))
    all_params = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert count_trainable(shapes, config) == all_params - backbone
