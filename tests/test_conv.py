"""The "gemm" convolutions (weight gradients as matrix products; 1x1 convolutions as matmuls)
compute XLA's convolution and its gradients within float32 rounding, alone and in the whole R50
DETR loss; "auto" picks them on CPU only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from detr_jax import build_model
from detr_jax.config import loss_config, model_config
from detr_jax.losses import compute_loss
from detr_jax.models.conv import conv2d, resolve_conv_impl
from detr_jax.models.detr import trainable_mask


def value_and_grads(impl, x, kernel, stride, padding, dilation, cotangent):
    """(conv output, d<output, cotangent>/dx, /dkernel) with ``impl``."""
    fn = lambda x_, k_: jnp.vdot(conv2d(x_, k_, stride, padding, dilation, impl), cotangent)
    return conv2d(x, kernel, stride, padding, dilation, impl), *jax.jit(jax.grad(fn, (0, 1)))(x, kernel)


# (kernel, stride, padding, dilation): every convolution a ResNet has, DC5's dilated 3x3 included (the
# 7x7 stem runs XLA's under "gemm"),
# on odd sizes so that strided windows do not tile the input exactly.
CASES = [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (7, 2, 3, 1)]


@pytest.mark.parametrize("kernel_size,stride,padding,dilation", CASES)
def test_gemm_conv_matches_xla_conv_and_its_gradients(kernel_size, stride, padding, dilation):
    rng = np.random.RandomState(kernel_size * 10 + stride + dilation)
    x = jnp.asarray(rng.standard_normal((2, 11, 9, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 6, 5)), jnp.float32)
    out_shape = conv2d(x, kernel, stride, padding, dilation, "xla").shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    expected = value_and_grads("xla", x, kernel, stride, padding, dilation, cotangent)
    got = value_and_grads("gemm", x, kernel, stride, padding, dilation, cotangent)
    for name, a, b in zip(("output", "grad x", "grad kernel"), got, expected):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.abs(b).max()), err_msg=name)


def test_gemm_conv_keeps_bfloat16_outputs_and_float32_kernel_gradients():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
    grad = jax.grad(lambda k: conv2d(x, k.astype(jnp.bfloat16), 1, 1, 1, "gemm").astype(jnp.float32).sum())(kernel)
    assert conv2d(x, kernel.astype(jnp.bfloat16), 1, 1, 1, "gemm").dtype == jnp.bfloat16
    assert grad.dtype == jnp.float32
    reference = jax.grad(lambda k: conv2d(x.astype(jnp.float32), k, 1, 1, 1, "xla").sum())(kernel)
    np.testing.assert_allclose(grad, reference, rtol=0.02, atol=0.02 * float(jnp.abs(reference).max()))


def test_auto_is_gemm_for_bottleneck_resnets_on_cpu_only_and_unknown_impls_fail():
    assert resolve_conv_impl("auto", "bottleneck", "cpu") == "gemm"
    assert resolve_conv_impl("auto", "basic", "cpu") == "xla"
    assert resolve_conv_impl("auto", "bottleneck", "gpu") == resolve_conv_impl("auto", "bottleneck", "tpu") == "xla"
    assert resolve_conv_impl("xla", "bottleneck", "cpu") == "xla"
    assert resolve_conv_impl("gemm", "basic", "gpu") == "gemm"
    assert resolve_conv_impl("auto", "bottleneck") == ("gemm" if jax.default_backend() == "cpu" else "xla")
    assert model_config().conv_impl == "auto"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("im2col", "bottleneck")


def test_r50_detr_gradients_gemm_against_xla():
    """The whole R50 DETR loss (host matcher, aux terms, dropout 0) on 2 images of 64x96: every
    trainable gradient with "gemm" equals the "xla" path's within float32 rounding, amplified by
    about 50 layers (1e-4 of each parameter's largest gradient, 1e-7 of the largest of all for those that are
    zero in exact arithmetic, such as the keys' bias; 1e-5 of the whole gradient's norm), and the frozen stem and layer1 get none."""
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.standard_normal((2, 64, 96, 3)), jnp.float32)
    mask = np.zeros((2, 64, 96), bool)
    mask[1, 40:] = True
    targets = {"labels": rng.randint(0, 91, (2, 3)).astype(np.int32),
               "boxes": rng.uniform(0.2, 0.6, (2, 3, 4)).astype(np.float32),
               "box_valid": np.array([[True, True, False], [True, True, True]])}
    config = model_config(dropout=0.0, num_encoder_layers=1, num_decoder_layers=2)
    variables = jax.device_get(jax.jit(build_model(config).init)(jax.random.PRNGKey(0), images, mask))
    trainable = trainable_mask(variables["params"], config)

    def grads(impl):
        model = build_model(model_config(**{**config.to_dict(), "conv_impl": impl}))

        def loss(params):
            params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, trainable)
            out = model.apply({**variables, "params": params}, images, mask, train=True)
            return compute_loss(out, targets, loss_config(), "softmax")[0]

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (loss_xla, grads_xla), (loss_gemm, grads_gemm) = grads("xla"), grads("gemm")
    np.testing.assert_allclose(loss_gemm, loss_xla, rtol=1e-5)
    flat_xla = jax.tree_util.tree_leaves_with_path(grads_xla)
    flat_gemm = jax.tree_util.tree_leaves(grads_gemm)
    checked, floor = 0, 1e-7 * max(float(np.abs(g).max()) for _, g in flat_xla)  # gradients that are 0 in exact math
    for (path, g_xla), g_gemm in zip(flat_xla, flat_gemm):
        scale = float(np.abs(g_xla).max())
        assert np.abs(np.asarray(g_gemm) - np.asarray(g_xla)).max() <= 1e-4 * scale + floor, jax.tree_util.keystr(path)
        checked += scale > 0
    a, b = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(t)]) for t in (grads_gemm, grads_xla))
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    backbone_convs = [g for (path, g) in flat_xla if "backbone" in jax.tree_util.keystr(path)]
    assert checked > 100 and len(backbone_convs) == 53  # R50: 53 convolutions, all compared
    frozen = jax.tree.leaves(jax.tree.map(lambda g, keep: None if keep else g, grads_gemm, trainable))
    assert frozen and all(not np.any(g) for g in frozen)


def test_tiny_model_builds_with_either_impl_and_same_parameters():
    """The impl is not part of the model: the same parameter tree, so checkpoints move between them."""
    shapes = {impl: jax.tree.map(lambda p: p.shape, jax.eval_shape(
        build_model(tiny_config(conv_impl=impl)).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
        jnp.zeros((1, 64, 64), bool))) for impl in ("xla", "gemm")}
    assert shapes["xla"] == shapes["gemm"]
