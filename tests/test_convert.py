"""Official and torchvision weights -> Flax variables: layouts, round trips, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.detr_coco import get_config
from conftest import tiny_config
from detr_jax import build_model
from detr_jax.convert import (CheckpointMismatchError, from_official_state_dict, from_torchvision_resnet,
                              load_state_dict_file, official_shapes, to_official_state_dict)

BACKBONE = "backbone.0.body."


def flat(variables):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = build_model(config)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    return config, variables, to_official_state_dict(variables, config)


@pytest.mark.parametrize("name, kwargs", [("r50", dict()), ("r50_classes20", dict(num_classes=20)),
                                          ("r101", dict(backbone="resnet101"))])
def test_official_layout_matches_reference_keys(reference, name, kwargs):
    official_layout, ref, _ = reference
    expected = official_layout.state_dict_shapes(**kwargs)
    # the generator's keys, order and shapes are the official model's (recorded by make_official_ref.py)
    assert official_layout.layout_sha256(expected) == str(ref[f"layout_sha256/{name}"])
    config = get_config("r50").model
    config.update(kwargs)
    assert official_shapes(config) == expected


def test_variant_layouts():
    shapes = official_shapes(get_config("r50_prenorm").model)
    assert shapes["transformer.encoder.norm.weight"] == (256,)  # official pre-norm adds an encoder norm
    config = get_config("r50").model
    config.position_embedding = "learned"
    shapes = official_shapes(config)
    assert shapes["backbone.1.row_embed.weight"] == shapes["backbone.1.col_embed.weight"] == (50, 128)
    assert official_shapes(get_config("r50_dc5").model) == official_shapes(get_config("r50").model)


def test_official_round_trip_is_exact(reference):
    _, _, state_dict = reference
    config = get_config("r50").model
    back = to_official_state_dict(from_official_state_dict(state_dict, config), config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_tiny_round_trip(tiny):
    config, variables, state_dict = tiny
    again = from_official_state_dict(state_dict, config)
    a, b = flat(variables), flat(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_qkv_split_and_transposes(tiny):
    config, variables, state_dict = tiny
    attn = variables["params"]["transformer"]["decoder_layers_1"]["multihead_attn"]
    packed = state_dict["transformer.decoder.layers.1.multihead_attn.in_proj_weight"]
    np.testing.assert_array_equal(packed[32:64], np.asarray(attn["k_proj"]["kernel"]).T)
    conv = state_dict[BACKBONE + "layer2.0.conv1.weight"]
    np.testing.assert_array_equal(conv.transpose(2, 3, 1, 0), variables["params"]["backbone"]["layer2_0"]["conv1"]["kernel"])
    assert state_dict["input_proj.weight"].shape == (32, 128, 1, 1)


def test_missing_extra_and_misshaped_keys_are_named(tiny):
    config, _, state_dict = tiny
    broken = dict(state_dict)
    del broken["transformer.encoder.layers.1.linear2.bias"]
    broken["transformer.encoder.layers.9.linear1.weight"] = np.zeros((3, 3))
    broken["bbox_embed.layers.2.weight"] = np.zeros((5, 32))
    with pytest.raises(CheckpointMismatchError) as error:
        from_official_state_dict(broken, config)
    message = str(error.value)
    assert "1 missing keys" in message and "transformer.encoder.layers.1.linear2.bias" in message
    assert "1 unexpected keys" in message and "transformer.encoder.layers.9.linear1.weight" in message
    assert "bbox_embed.layers.2.weight: checkpoint (5, 32), model expects (4, 32)" in message


def test_num_classes_mismatch_says_how_to_fine_tune(tiny):
    config, _, state_dict = tiny
    other = tiny_config(num_classes=3)
    with pytest.raises(CheckpointMismatchError, match="num_classes=5 .*drop_class_head"):
        from_official_state_dict(state_dict, other)
    variables = from_official_state_dict(state_dict, other, drop_class_head=True, rng=jax.random.PRNGKey(7))
    assert variables["params"]["class_embed"]["kernel"].shape == (32, 4)
    kept = from_official_state_dict(state_dict, config)
    a, b = flat(kept), flat(variables)
    assert all(np.array_equal(a[k], b[k]) for k in a if "class_embed" not in k)
    out = build_model(other).apply(variables, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
    assert out["pred_logits"].shape == (1, 10, 4)


def test_official_weights_with_another_num_classes_fine_tune(reference):
    _, _, state_dict = reference
    config = get_config("r50").model
    config.num_classes = 20
    variables = from_official_state_dict(state_dict, config, drop_class_head=True)
    assert variables["params"]["class_embed"]["kernel"].shape == (256, 21)
    bound = 256 ** -0.5  # torch default Linear init, as the official head starts
    assert np.abs(np.asarray(variables["params"]["class_embed"]["kernel"])).max() <= bound


def test_torchvision_backbone(reference):
    _, _, state_dict = reference
    config = get_config("r50").model
    official = from_official_state_dict(state_dict, config)
    torchvision = {k[len(BACKBONE):]: v for k, v in state_dict.items() if k.startswith(BACKBONE)}
    torchvision.update({"fc.weight": np.zeros((1000, 2048)), "fc.bias": np.zeros(1000),
                        "bn1.num_batches_tracked": np.zeros(())})
    fresh = jax.tree.map(jnp.zeros_like, official)
    loaded = from_torchvision_resnet(torchvision, config, fresh)
    a, b = flat(official), flat(loaded)
    for key in a:
        if "backbone" in key:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert not b[key].any(), key  # everything else left as it was
    config.backbone = "resnet101"
    with pytest.raises(CheckpointMismatchError, match="255 missing keys:\n    layer3.6.bn1.bias"):
        from_torchvision_resnet(torchvision, config, fresh)


def test_state_dict_files(tmp_path, tiny):
    config, variables, state_dict = tiny
    np.savez(tmp_path / "tiny.npz", **state_dict)
    loaded = load_state_dict_file(tmp_path / "tiny.npz")
    assert all(np.array_equal(loaded[k], v) for k, v in state_dict.items())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict_file(tmp_path / "missing.pth")
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "notes.pth")
