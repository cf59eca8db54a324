"""Backbone pretraining: dense labels on a hand-made case, the loss, and a step that learns."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from detr_jax import pretrain
from detr_jax.config import init_config
from detr_jax.models import build_model


def test_dense_labels_hand_made():
    """Canvas 64 x 64, stride 32: cell centres (x, y) in pixels at 16 and 48. Image 0 is 64 x 64;
    image 1 is 32 high (its second row of cells lies in padding: centre y 48 > 32)."""
    px = lambda x0, y0, x1, y1, h=64, w=64: [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[0, 0] = px(0, 0, 40, 64)    # class 2: the left column
    boxes[0, 1] = px(8, 8, 24, 24)    # class 1: smaller, inside it, holds the centre (16, 16)
    boxes[0, 2] = px(40, 40, 60, 60)  # class 4: the centre (48, 48)
    boxes[0, 3] = px(0, 0, 64, 64)    # not valid: ignored
    boxes[1, 0] = px(40, 0, 64, 32, h=32)  # class 3: the centre (48, 16) of the 32-high image
    labels = np.array([[2, 1, 4, 0], [3, 0, 0, 0]], np.int32)
    valid = np.array([[True, True, True, False], [True, False, False, False]])
    size = np.array([[64, 64], [32, 64]], np.int32)
    cells = pretrain.dense_labels(jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(valid), jnp.asarray(size),
                                  (2, 2), 32.0, num_classes=5)
    np.testing.assert_array_equal(cells, [[[1, 5], [2, 4]], [[5, 3], [5, 5]]])


def test_dense_loss_weights_and_accuracy():
    labels = jnp.array([[[0, 2], [2, 1]]])  # num_classes 2: label 2 is background
    padding = jnp.array([[[False, False], [False, True]]])
    logits = jnp.log(jnp.array([[[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]], [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]]))
    loss, accuracy = pretrain.dense_loss(logits, labels, padding, num_classes=2)
    w = pretrain.BACKGROUND_WEIGHT  # cells: object (p 0.5), background (p 0.5), background (p 0.25), padding
    expected = (-np.log(0.5) + w * -np.log(0.5) + w * -np.log(0.25)) / (1 + 2 * w)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert accuracy == 1.0  # the one unpadded object cell is right; the padded one does not count


def test_pretrain_step_learns_a_batch():
    model = build_model(tiny_config(backbone_norm="group_norm"))
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
    batch = {"image": image, "padding_mask": jnp.zeros((2, 64, 64), bool),
             "boxes": jnp.array([[[0.25, 0.5, 0.5, 1.0]], [[0.75, 0.25, 0.5, 0.5]]]), "labels": jnp.array([[1], [3]]),
             "box_valid": jnp.ones((2, 1), bool), "size": jnp.array([[64, 64], [64, 64]])}
    backbone = jax.jit(model.backbone.init)(jax.random.PRNGKey(0), image)["params"]
    head = nn.Dense(6)
    width = backbone["layer4_0"]["conv2"]["kernel"].shape[-1]
    state = {"backbone": backbone, "head": head.init(jax.random.PRNGKey(1), jnp.zeros((1, width)))["params"]}
    tx = optax.adam(1e-2)
    opt_state = tx.init(state)
    step = pretrain.make_pretrain_step(model.backbone, head, tx, {}, num_classes=5)
    losses = []
    for _ in range(25):
        state, opt_state, metrics = step(state, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.2 * losses[0]
    assert float(metrics["accuracy"]) == 1.0


def test_pretraining_refuses_a_given_checkpoint():
    class Config:
        init = init_config(pretrain_steps=5, checkpoint="detr-r50.pth")
    with pytest.raises(ValueError, match="cannot be combined with config.init.checkpoint"):
        pretrain.pretrain_backbone(Config, None, None, None, "/nonexistent")
