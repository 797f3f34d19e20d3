"""FactorizedLinear: a Linear layer whose weight is a factorized tensor of any registered format."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FactorizedTensor
from .base import FactorizedLayer, resolve_weight_compression
from .cost import PathCost
from .linear_like import as_linear, linear_view

__all__ = ["FactorizedLinear"]


class FactorizedLinear(FactorizedLayer):
    """``y = x W^T + b`` with ``W`` held as a factorized tensor.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str', 'cp'}
    rank : int or sequence of int, optional
        Ranks of the factorized weight (upper bounds). Give ``rank`` or ``weight_compression``.
    t : int, optional
        STP factor (default 1 for classic formats, 2 for semi-tensor ones).
    weight_compression : float, optional
        Target compression factor of this layer's weight (dense entries over factor entries); the
        largest uniform rank that meets it is used. (:func:`stpnet.compress` takes the whole
        model's factor as ``compression``.)
    compression : float, optional
        Deprecated name of ``weight_compression``.
    layout : str, optional
        TT/STT: 'sequential' (default; modes [I_1..I_d, O_1..O_e]) or 'paired' (TT-matrix,
        [I_1 O_1, ..., I_d O_d]); TR/STR: 'ring'; Tucker/STTu: 'tucker2'; CP: 'cp'
        (:mod:`stpnet.nn.layouts`).
    in_modes, out_modes : sequence of int, optional
        Factorizations of the feature counts (default: balanced into ``n_modes`` factors).
    n_modes : int, default 3
    forward_path : {'auto', 'rebuild', 'contract', 'measure'}
        'auto' picks, per input shape, the cheaper path by the cost model; 'measure' times both
        paths on the first input of each shape (device, dtype) and keeps the faster, in the
        spirit of ``torch.backends.cudnn.benchmark`` (a call with gradients enabled times the
        forward and the backward pass, as a training step runs them); the others force a path.
    clip_ranks : bool, default False
        Lower ranks to what the tensorization can use. The default keeps the nominal ranks, as the
        literature counts them (Zhao et al. 2021 count a rank-R layer this way); clipping gives fewer parameters for the same
        function class with TT and Tucker.

    Examples
    --------
    >>> import torch, stpnet
    >>> layer = stpnet.nn.FactorizedLinear(256, 128, format="stt", rank=8, t=2)
    >>> layer(torch.randn(4, 256)).shape
    torch.Size([4, 128])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
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
        super().__init__(in_features, out_features, (), format=format, rank=rank, t=t,
                         weight_compression=resolve_weight_compression(weight_compression, compression),
                         layout=layout, in_modes=in_modes,
                         out_modes=out_modes, n_modes=n_modes, bias=bias, forward_path=forward_path,
                         clip_ranks=clip_ranks, device=device, dtype=dtype, weight=weight)
        self.in_features = in_features
        self.out_features = out_features

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.linear(x, weight, self.bias)

    def _contract_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.tensorization.layout.linear(self, x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _path_costs(self, input_shape: tuple[int, ...]) -> dict[str, PathCost]:
        n = 1
        for s in input_shape[:-1]:
            n *= s
        w = self.weight_tensor
        c_in, c_out = self.in_features, self.out_features
        build = w.reconstruction_macs()
        rebuild = PathCost(macs=n * c_in * c_out + build, activations=n * c_out + c_in * c_out,
                           peak=max(n * c_out, c_in * c_out), once=build, once_activations=c_in * c_out)
        per_row, acts_per_row, per_call = self.tensorization.layout.linear_cost(self)
        macs, acts = n * per_row + per_call, n * acts_per_row
        return {"rebuild": rebuild, "contract": PathCost(macs=macs, activations=acts, peak=acts, once=per_call)}

    @classmethod
    def from_dense(
        cls,
        layer: nn.Linear,
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
    ) -> "FactorizedLinear":
        """A FactorizedLinear initialised from a trained ``nn.Linear`` through the decompositions.

        Give one of ``rank``, ``tol`` (relative error of the weight) or ``weight_compression``.
        ``n_iter`` refinement sweeps (HOOI / ALS) follow the SVD fit. The bias is copied.
        ``layer`` may also be linear-like (:func:`stpnet.nn.linear_view`: a Linear storing its
        weight transposed, as HuggingFace's ``Conv1D``); the result computes the same function.
        """
        if not isinstance(layer, nn.Linear):
            if linear_view(layer) is None:
                raise ValueError(f"from_dense expects an nn.Linear or a linear-like layer, got {type(layer).__name__}")
            layer = as_linear(layer)  # the same function, its weight as (out, in)
        return cls._from_trained(layer, layer.weight.detach(), format, rank=rank, tol=tol,
                                 weight_compression=resolve_weight_compression(weight_compression, compression), t=t,
                                 layout=layout, in_modes=in_modes, out_modes=out_modes, n_modes=n_modes, n_iter=n_iter,
                                 forward_path=forward_path)

    @classmethod
    def dense_layer_args(cls, dense: nn.Module) -> tuple:
        if not isinstance(dense, nn.Linear):
            view = linear_view(dense)
            if view is None:
                raise ValueError(f"expected an nn.Linear or a linear-like layer, got {type(dense).__name__}")
            return view.in_features, view.out_features, view.bias is not None
        return dense.in_features, dense.out_features, dense.bias is not None
