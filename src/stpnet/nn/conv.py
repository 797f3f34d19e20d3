"""FactorizedConv1d/2d/3d: convolutions whose kernel is a factorized tensor of any registered format."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FactorizedTensor
from .base import FactorizedLayer, resolve_weight_compression
from .cost import PathCost, conv_output_size, narrow_penalty, prod

__all__ = ["FactorizedConv1d", "FactorizedConv2d", "FactorizedConv3d", "explicit_padding", "prepare_conv_input"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(value, dim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"{name} must be an int or a tuple of {dim} ints, got {value}")
    return value


def explicit_padding(padding, kernel_size: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dimension for an int tuple, 'valid' or 'same'."""
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in padding]


def prepare_conv_input(x: torch.Tensor, in_channels: int, padding, kernel_size: Sequence[int],
                       dilation: Sequence[int], padding_mode: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Check a convolution's input, apply a non-zero padding mode or an asymmetric 'same' padding
    explicitly, and return ``(x, padding)`` for the convolution op (symmetric, per dimension)."""
    dim = len(kernel_size)
    if not torch.jit.is_tracing() and (x.ndim != dim + 2 or x.shape[1] != in_channels):  # traced: shapes are fixed
        raise ValueError(f"expected input (N, {in_channels}, {', '.join(['*'] * dim)}), got {tuple(x.shape)}")
    if padding_mode == "zeros" and not isinstance(padding, str):
        return x, padding  # the common case, without building the per-side list (batch-1 overhead)
    pads = explicit_padding(padding, kernel_size, dilation)
    if padding_mode != "zeros":
        flat = [p for pair in reversed(pads) for p in pair]
        return F.pad(x, flat, mode=padding_mode), (0,) * dim
    if all(a == b for a, b in pads):
        return x, tuple(a for a, _ in pads)
    flat = [p for pair in reversed(pads) for p in pair]  # asymmetric 'same': pad explicitly
    return F.pad(x, flat), (0,) * dim


class _FactorizedConvNd(FactorizedLayer):
    dim: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        format: str = "tt",
        rank: int | Sequence[int] | None = None,
        t: int | None = None,
        weight_compression: float | None = None,
        compression: float | None = None,
        layout: str | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_modes: int = 3,
        forward_path: str = "auto",
        clip_ranks: bool = False,
        device=None,
        dtype=None,
        weight: FactorizedTensor | None = None,
    ):
        if groups != 1:
            raise ValueError(f"groups={groups} is not supported: factorized convolutions need groups=1 "
                             "(keep grouped and depthwise convolutions dense)")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        kernel_size = _tuple(kernel_size, self.dim, "kernel_size")
        stride = _tuple(stride, self.dim, "stride")
        dilation = _tuple(dilation, self.dim, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' needs stride 1 (as in torch.nn.Conv2d)")
        else:
            padding = _tuple(padding, self.dim, "padding")
        super().__init__(in_channels, out_channels, kernel_size, format=format, rank=rank, t=t,
                         weight_compression=resolve_weight_compression(weight_compression, compression),
                         layout=layout, in_modes=in_modes, out_modes=out_modes,
                         n_modes=n_modes, bias=bias, forward_path=forward_path, clip_ranks=clip_ranks, device=device, dtype=dtype,
                         weight=weight)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding, self.padding_mode, self.groups = padding, padding_mode, 1

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, format={self.format!r}, layout={self.tensorization.layout!r}, "
                f"rank={self.rank}, t={self.t}, bias={self.bias is not None}")

    # ------------------------------------------------------------------ padding
    def _explicit_padding(self) -> list[tuple[int, int]]:
        return explicit_padding(self.padding, self.kernel_size, self.dilation)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | str]:
        """Check the input; apply non-zero padding modes; return (x, padding for the conv op)."""
        return prepare_conv_input(x, self.in_channels, self.padding, self.kernel_size, self.dilation,
                                  self.padding_mode)

    # ------------------------------------------------------------------ forward paths
    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, padding = self._prepare(x)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        return conv(x, weight, self.bias, self.stride, padding, self.dilation)

    def _rebuild_plan(self, weight: torch.Tensor):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._rebuild_plan(weight)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        return lambda x: conv(x, weight, self.bias, self.stride, self.padding, self.dilation)  # input checked once

    def _contract_forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._prepare(x)
        y = self.tensorization.layout.conv(self, x, padding)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).reshape(1, -1, *([1] * self.dim))
        return y

    # ------------------------------------------------------------------ costs
    def _sizes(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        n, spatial = input_shape[0], input_shape[2:]
        pads = self._explicit_padding()
        out = [conv_output_size(s + a + b - 0, k, st, 0, d) for s, (a, b), k, st, d in
               zip(spatial, pads, self.kernel_size, self.stride, self.dilation)]
        return n, prod(spatial), prod(out)

    def _path_costs(self, input_shape: tuple[int, ...]) -> dict[str, PathCost]:
        n, p_in, p_out = self._sizes(input_shape)
        w = self.weight_tensor
        c_in, c_out, K = self.in_channels, self.out_channels, prod(self.kernel_size)
        weight_numel = c_in * c_out * K
        pen = narrow_penalty
        stages, acts, per_call = self.tensorization.layout.conv_cost(self, p_in, p_out)
        acts = n * acts
        macs = n * sum(s.macs for s in stages) + per_call
        work = n * sum(s.work() for s in stages) + per_call
        dense = n * weight_numel * p_out
        build = w.reconstruction_macs()
        rebuild = PathCost(macs=dense + build, activations=n * c_out * p_out + weight_numel,
                           peak=max(n * c_out * p_out, weight_numel), work=dense * pen(min(c_in, c_out)) + build,
                           once=build, once_activations=weight_numel)
        return {"rebuild": rebuild,
                "contract": PathCost(macs=macs, activations=acts, peak=acts, work=work, once=per_call, ops=len(stages))}

    # ------------------------------------------------------------------ from dense
    @classmethod
    def from_dense(
        cls,
        layer: nn.Module,
        format: str = "tt",
        *,
        rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        weight_compression: float | None = None,
        compression: float | None = None,
        t: int | None = None,
        layout: str | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_modes: int = 3,
        n_iter: int = 0,
        forward_path: str = "auto",
    ):
        """A factorized convolution initialised from a trained dense one through the decompositions.

        Give one of ``rank``, ``tol`` (relative error of the kernel) or ``weight_compression``. Bias (or
        its absence), stride, padding (including 'same'), dilation and padding_mode carry over;
        ``groups > 1`` raises ValueError.
        """
        dense_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[cls.dim - 1]
        if not isinstance(layer, dense_cls):
            raise ValueError(f"{cls.__name__}.from_dense expects an nn.{dense_cls.__name__}, got "
                             f"{type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"groups={layer.groups} is not supported: factorized convolutions need groups=1")
        return cls._from_trained(layer, layer.weight.detach(), format, rank=rank, tol=tol,
                                 weight_compression=resolve_weight_compression(weight_compression, compression), t=t,
                                 layout=layout, in_modes=in_modes, out_modes=out_modes, n_modes=n_modes, n_iter=n_iter,
                                 forward_path=forward_path)

    @classmethod
    def dense_layer_args(cls, dense: nn.Module) -> tuple:
        return (dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding,
                dense.dilation, 1, dense.bias is not None, dense.padding_mode)


class FactorizedConv1d(_FactorizedConvNd):
    """``nn.Conv1d`` with a factorized kernel; arguments as :class:`FactorizedConv2d`."""

    dim = 1


class FactorizedConv2d(_FactorizedConvNd):
    """``nn.Conv2d`` with a factorized kernel.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode
        As in :class:`torch.nn.Conv2d` (``groups`` must be 1).
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str', 'cp'}
    rank : int or sequence of int, optional
        Ranks of the kernel tensor; give ``rank`` or ``weight_compression``.
    t : int, optional
        STP factor (default 1 for classic formats, 2 for semi-tensor ones).
    weight_compression : float, optional
        Target compression factor of the kernel (dense entries over factor entries).
    compression : float, optional
        Deprecated name of ``weight_compression``.
    layout : str, optional
        TT/STT: 'sequential' (default; [I_1..I_d, k*k, O_1..O_e], the k x k convolution runs in
        the rank space) or 'paired' ([k*k, I_1 O_1, ..., I_d O_d]); TR/STR: 'ring';
        Tucker/STTu: 'tucker2'.
    in_modes, out_modes : sequence of int, optional
        Factorizations of the channel counts (default: balanced into ``n_modes`` factors).
    forward_path : {'auto', 'rebuild', 'contract', 'measure'}
        'auto' picks, per input shape, the cheaper path by the cost model; 'measure' times both
        paths on the first input of each shape (device, dtype) and keeps the faster, in the
        spirit of ``torch.backends.cudnn.benchmark`` (a call with gradients enabled times the
        forward and the backward pass, as a training step runs them); the others force a path.
    clip_ranks : bool, default False
        Lower ranks to what the tensorization can use (see :class:`FactorizedLinear`).

    Examples
    --------
    >>> import torch, stpnet
    >>> conv = stpnet.nn.FactorizedConv2d(64, 64, 3, padding=1, format="stt", rank=14, t=2)
    >>> conv(torch.randn(2, 64, 8, 8)).shape
    torch.Size([2, 64, 8, 8])
    """

    dim = 2


class FactorizedConv3d(_FactorizedConvNd):
    """``nn.Conv3d`` with a factorized kernel; arguments as :class:`FactorizedConv2d`."""

    dim = 3
