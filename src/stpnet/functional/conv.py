"""Convolution for the narrow k x k stages of the contraction paths, with a faster backward on CPU.

The k x k stage of a factorized convolution runs in the rank space: a few channels (2 to 8 in a
ResNet-20 at 9x) on full-size maps. On CPU, oneDNN's gradient with respect to the input of such a
convolution, in the plain (NCHW) float32 layout, is several times slower than the forward
convolution of the same size, and more so in the depth form of the grouped stage (a 3-D
convolution with kernel depth 1; ``bench/spatial_stage.py --micro-train``). For stride 1 that gradient
*is* a forward convolution: of the output gradient with the kernel transposed (in and out
channels swapped within each group) and flipped, with padding ``dilation * (k - 1) - padding``.
:func:`conv_nd` computes it that way when the slow case applies (CPU, float32/float64 without
autocast, stride 1, numeric padding that the flipped form can express, gradients wanted); else
it is ``F.conv{1,2,3}d``. The weight gradient is torch's own. Both forms compute the same
function and gradient; only the time differs. In channels_last or bfloat16 torch's backward was
already about as fast, so it is left alone there; under tracing, export and
``torch.compile`` the plain op is used.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["conv_nd", "flipped_transposed_kernel"]

_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def flipped_transposed_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel whose forward convolution is the input gradient of ``weight`` (stride 1).

    ``weight`` is (C_out, C_in / groups, *k); the result is (C_in, C_out / groups, *k): within
    each group the in and out channels swapped, every spatial axis reversed.
    """
    c_out, c_in_g = weight.shape[:2]
    k = weight.shape[2:]
    swapped = weight.reshape(groups, c_out // groups, c_in_g, *k).transpose(1, 2)
    return swapped.reshape(groups * c_in_g, c_out // groups, *k).flip(tuple(range(2, 2 + len(k))))


class _ConvInputGradByForward(torch.autograd.Function):
    """A stride-1 convolution whose input gradient runs as a forward convolution."""

    @staticmethod
    def forward(x, weight, padding, dilation, groups):
        return _CONVS[weight.ndim - 3](x, weight, None, 1, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.groups = padding, dilation, groups

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        dims = weight.ndim - 2
        if ctx.needs_input_grad[0]:
            pad = [d * (k - 1) - p for d, k, p in zip(ctx.dilation, weight.shape[2:], ctx.padding)]
            grad_x = _CONVS[dims - 1](grad, flipped_transposed_kernel(weight, ctx.groups), None, 1, pad,
                                      ctx.dilation, ctx.groups)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1] * dims, list(ctx.padding), list(ctx.dilation), False, [0] * dims,
                ctx.groups, [False, True, False])[1]
        return grad_x, grad_w, None, None, None


def _as_tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def recording() -> bool:
    """True while tracing, scripting or compiling (torch.jit, torch.compile, torch.export): the
    graph must see the plain computation, and a choice on the batch size would become a guard on a
    possibly dynamic batch. (``torch.compiler.is_compiling`` is looked up on every call: dynamo
    recognises it by that access, not through a reference kept from import time.)"""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _input_grad_by_forward(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> bool:
    """Whether the slow case applies (see the module docstring)."""
    if recording():
        return False
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return False
    if isinstance(padding, str) or any(s != 1 for s in stride) or _cpu_autocast():
        return False
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return False
    return all(d * (k - 1) >= p for d, k, p in zip(dilation, weight.shape[2:], padding))


def conv_nd(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int] | int = 1,
            padding: Sequence[int] | int | str = 0, dilation: Sequence[int] | int = 1,
            groups: int = 1) -> torch.Tensor:
    """``F.conv{1,2,3}d(x, weight, None, stride, padding, dilation, groups)``, the dimension taken
    from ``weight``; on CPU in float32/float64 with stride 1 and gradients wanted, the input
    gradient runs as a forward convolution (module docstring: same values, several times faster there).

    Parameters
    ----------
    x : torch.Tensor
        (N, C_in, *spatial), 1 to 3 spatial dimensions.
    weight : torch.Tensor
        (C_out, C_in / groups, *k).
    stride, padding, dilation, groups
        As in ``torch.nn.functional.conv2d``.

    Returns
    -------
    torch.Tensor
        (N, C_out, *spatial_out).
    """
    dims = weight.ndim - 2
    if not 1 <= dims <= 3:
        raise ValueError(f"weight must have 3 to 5 dimensions (C_out, C_in/groups, *kernel), got shape "
                         f"{tuple(weight.shape)}")
    stride_t, dilation_t = _as_tuple(stride, dims), _as_tuple(dilation, dims)
    padding_t = padding if isinstance(padding, str) else _as_tuple(padding, dims)
    if _input_grad_by_forward(x, weight, stride_t, padding_t, dilation_t):
        return _ConvInputGradByForward.apply(x, weight, padding_t, dilation_t, groups)
    return _CONVS[dims - 1](x, weight, None, stride, padding, dilation, groups)
