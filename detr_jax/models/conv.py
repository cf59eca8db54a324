"""2-D convolutions whose backward pass runs as matrix products on CPU.

XLA's CPU backend writes a convolution's weight gradient as another convolution, with the input
channels as the batch and the whole feature map as the window, which its CPU kernels run at a
small fraction of the forward's rate (the ResNet backward took 5x the forward). Here the weight
gradient is the matrix product it is: for each kernel tap (i, j),

    dW[i, j] = X_ij^T @ dY,   X_ij [B*Ho*Wo, Cin] the input window seen by tap (i, j), dY [B*Ho*Wo, Cout]

taken as one GEMM over the taps' windows side by side (im2col). A 1x1 convolution is a matrix
product in the forward and in the input gradient too. The other input gradients stay XLA's
(the transposed convolution, which runs at the forward's rate). The results are the same sums in
another order: equal to ``lax.conv_general_dilated``'s gradients within float32 rounding. Kernels
larger than 3x3 (the 7x7 stem) keep XLA's gradients: their im2col copies the input 49 times, which
costs more than it saves (measured: the stem made a GroupNorm resnet_tiny's backward 20% slower).

  conv2d(x, kernel, stride, padding, dilation, impl)    x [B, H, W, Cin], kernel [kh, kw, Cin, Cout]
  CONV_IMPLS, resolve_conv_impl("auto", block)          "gemm" for bottleneck ResNets on CPU, else "xla"
  Conv(features, kernel_size, ..., impl)                a bias-free nn.Conv with the same "kernel" param
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "gemm")
MAX_GEMM_KERNEL = 3  # larger kernels run XLA's convolution and gradients under "gemm" too
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def resolve_conv_impl(impl: str, block: str, platform: str | None = None) -> str:
    """``impl`` itself, or for "auto" "gemm" for bottleneck ResNets (``block``, R50/R101) on CPU and
    "xla" otherwise: cuDNN and the TPU's convolutions have fast backward passes of their own, and
    the CPU demo's basic-block resnet_tiny (16..128 channels) trained 2x slower with "gemm" (its
    steps/s in 2 of 3 runs alternating with "xla"; why is not yet known). ``platform``: default jax's
    backend."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"config.model.conv_impl = {impl!r}; expected one of {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    return "gemm" if block == "bottleneck" and (platform or jax.default_backend()) == "cpu" else "xla"


def xla_conv(x, kernel, stride: int, padding: int, dilation: int):
    """XLA's convolution: x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout] with
    symmetric zero padding ``padding`` and equal stride and dilation on both axes."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                    rhs_dilation=(dilation, dilation), dimension_numbers=DIMENSIONS)


def tap_windows(x, kernel_hw: tuple[int, int], out_hw: tuple[int, int], stride: int, padding: int,
                dilation: int):
    """im2col: x [B, H, W, C] -> [B, Ho, Wo, kh*kw*C], the input each kernel tap (i, j) meets at
    every output position, taps in row-major order, channels innermost."""
    (kh, kw), (ho, wo) = kernel_hw, out_hw
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    windows = [lax.slice(x, (0, i * dilation, j * dilation, 0),
                         (x.shape[0], i * dilation + (ho - 1) * stride + 1, j * dilation + (wo - 1) * stride + 1,
                          x.shape[3]), (1, stride, stride, 1))
               for i in range(kh) for j in range(kw)]
    return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


def weight_gradient(x, grad_out, kernel_shape, stride: int, padding: int, dilation: int):
    """dLoss/dkernel [kh, kw, Cin, Cout] as one GEMM: im2col(x)^T [kh*kw*Cin, N] @ grad_out [N, Cout],
    N = B*Ho*Wo; accumulated in float32, returned in the kernel's dtype."""
    kh, kw, cin, cout = kernel_shape
    windows = tap_windows(x, (kh, kw), grad_out.shape[1:3], stride, padding, dilation)
    dw = lax.dot_general(windows.reshape(-1, kh * kw * cin), grad_out.reshape(-1, cout), (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return dw.reshape(kernel_shape)


def pointwise(x, kernel, stride: int):
    """A 1x1 convolution as a matrix product: x [B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), Cout]."""
    return jnp.einsum("bhwc,cd->bhwd", x[:, ::stride, ::stride], kernel[0, 0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def gemm_conv(x, kernel, stride: int, padding: int, dilation: int):
    """``xla_conv`` with the weight gradient as a GEMM (1x1 convolutions: matrix products throughout)."""
    if kernel.shape[:2] == (1, 1) and padding == 0:
        return pointwise(x, kernel, stride)
    return xla_conv(x, kernel, stride, padding, dilation)


def _gemm_conv_fwd(x, kernel, stride, padding, dilation):
    return gemm_conv(x, kernel, stride, padding, dilation), (x, kernel)


def _gemm_conv_bwd(stride, padding, dilation, residuals, grad_out):
    x, kernel = residuals
    forward = ((lambda x_: pointwise(x_, kernel, stride)) if kernel.shape[:2] == (1, 1) and padding == 0
               else (lambda x_: xla_conv(x_, kernel, stride, padding, dilation)))
    grad_x = jax.vjp(forward, x)[1](grad_out)[0]
    grad_kernel = weight_gradient(x, grad_out, kernel.shape, stride, padding, dilation).astype(kernel.dtype)
    return grad_x, grad_kernel


gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def conv2d(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, impl: str = "xla"):
    """x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout], Ho = (H + 2 padding -
    dilation (kh - 1) - 1) // stride + 1; ``impl`` "xla" (XLA's convolution and its gradients) or
    "gemm" (the same values, the weight gradient as a GEMM, for kernels up to MAX_GEMM_KERNEL)."""
    if impl == "gemm" and max(kernel.shape[:2]) <= MAX_GEMM_KERNEL:
        return gemm_conv(x, kernel, stride, padding, dilation)
    return xla_conv(x, kernel, stride, padding, dilation)


class Conv(nn.Module):
    """Bias-free square convolution with symmetric padding; its parameter "kernel" [k, k, Cin,
    Features] is nn.Conv's, so checkpoints and weight conversion do not depend on ``impl``."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
        return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, self.dilation, self.impl)
