"""The optimizer: parameter groups, frozen parameters, clipping over trainable ones, schedules,
gradient accumulation. On the tiny model's parameter tree, no model compile needed."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from detr_jax.config import optim_config
from detr_jax.convert import variable_shapes
from detr_jax.optim import lr_schedule, make_optimizer, param_groups


@pytest.fixture(scope="module")
def params():
    shapes = variable_shapes(tiny_config())["params"]
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


def leaves_with_paths(tree):
    return {"/".join(p.key for p in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_groups(params):
    groups = leaves_with_paths(param_groups(params, tiny_config()))
    assert groups["backbone/conv1/kernel"] == "frozen" and groups["backbone/layer1_0/conv1/kernel"] == "frozen"
    assert groups["backbone/layer2_0/conv1/kernel"] == "backbone"
    assert groups["transformer/decoder_norm/scale"] == "rest" and groups["query_embed"] == "rest"
    assert set(leaves_with_paths(param_groups(params, tiny_config(frozen_stages=-1))).values()) == {"backbone", "rest"}


def test_one_update_by_hand(params):
    """Adam's first step moves every trained parameter by lr (sign of the gradient) plus decoupled
    weight decay; frozen ones do not move; the backbone uses lr_backbone."""
    optim = optim_config(lr=1e-3, lr_backbone=1e-4, weight_decay=0.5, clip_norm=0.0, schedule="constant")
    tx, _ = make_optimizer(optim, params, tiny_config(), 10.0, 100)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = leaves_with_paths(optax.apply_updates(params, updates))
    # adam step of a constant gradient: m_hat / (sqrt(v_hat) + eps) = 1; plus wd * p = 0.5
    np.testing.assert_allclose(new["query_embed"], 1 - 1e-3 * 1.5, rtol=1e-6)
    np.testing.assert_allclose(new["backbone/layer2_0/conv1/kernel"], 1 - 1e-4 * 1.5, rtol=1e-6)
    np.testing.assert_array_equal(new["backbone/conv1/kernel"], 1.0)


def test_clipping_ignores_frozen_gradients(params):
    optim = optim_config(lr=1.0, lr_backbone=1.0, weight_decay=0.0, clip_norm=0.1, schedule="constant", b1=0.0,
                         b2=0.0, eps=0.0)
    tx, _ = make_optimizer(optim, params, tiny_config(), 10.0, 100)
    frozen = leaves_with_paths(param_groups(params, tiny_config()))
    # huge gradients on frozen parameters only: the trainable ones, tiny, must not be scaled down
    grads = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.full_like(p, 1e6 if frozen["/".join(k.key for k in path)] == "frozen" else 1e-6), params)
    state = tx.init(params)
    clipped = tx.update(grads, state, params)[0]
    # with b1 = b2 = eps = 0 the update is the sign: 1 for trained, 0 for frozen parameters
    moved = leaves_with_paths(clipped)
    assert float(moved["query_embed"].max()) == pytest.approx(-1.0) and not moved["backbone/conv1/kernel"].any()


def test_schedules():
    step = lr_schedule(optim_config(schedule="step", lr_drop_epochs=(400,)), 1e-4, 10.0, 5000)
    assert float(step(3999)) == pytest.approx(1e-4) and float(step(4000)) == pytest.approx(1e-5)
    cosine = lr_schedule(optim_config(schedule="warmup_cosine", warmup_epochs=5.0), 3e-4, 10.0, 1000)
    assert float(cosine(0)) == 0.0 and float(cosine(25)) == pytest.approx(1.5e-4)
    assert float(cosine(50)) == pytest.approx(3e-4) and float(cosine(1000)) == pytest.approx(0.0, abs=1e-12)
    assert float(cosine(525)) == pytest.approx(1.5e-4, rel=1e-3)  # half-way through the decay
    with pytest.raises(ValueError, match="config.optim.schedule"):
        lr_schedule(optim_config(schedule="linear"), 1e-4, 10.0, 100)


def test_gradient_accumulation(params):
    """12 micro-batches per update: parameters move on the 12th with the mean gradient."""
    optim = optim_config(lr=1e-3, weight_decay=0.0, clip_norm=0.0, schedule="constant", grad_accum_steps=12)
    tx, _ = make_optimizer(optim, params, tiny_config(), 10.0, 100)
    state = tx.init(params)
    current = params
    step = jax.jit(lambda grads, state, current: tx.update(grads, state, current))  # one compile, not 12 eager runs
    for k in range(12):
        grads = jax.tree.map(lambda p: jnp.full_like(p, float(k)), params)
        updates, state = step(grads, state, current)
        current = optax.apply_updates(current, updates)
        moved = float(jnp.abs(leaves_with_paths(current)["query_embed"] - 1).max())
        assert (moved > 0) == (k == 11), k
    np.testing.assert_allclose(leaves_with_paths(current)["query_embed"], 1 - 1e-3, rtol=1e-5)
