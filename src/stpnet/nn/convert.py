"""Conversion between dense and factorized layers: ``from_dense`` and its inverse ``to_dense``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .linear import FactorizedLinear

__all__ = ["from_dense", "to_dense", "FACTORIZED_COUNTERPARTS"]

#: Dense layer type -> factorized layer type.
FACTORIZED_COUNTERPARTS = {
    nn.Linear: FactorizedLinear,
    nn.Conv1d: FactorizedConv1d,
    nn.Conv2d: FactorizedConv2d,
    nn.Conv3d: FactorizedConv3d,
}


def from_dense(layer: nn.Module, format: str = "tt", **kwargs: Any) -> FactorizedLayer:
    """Factorize a trained ``nn.Linear`` or ``nn.Conv1d/2d/3d`` through the decompositions.

    Parameters
    ----------
    layer : nn.Linear or nn.Conv1d/2d/3d
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str'}
    **kwargs
        ``rank``, ``tol`` or ``compression`` (exactly one), and optionally ``t``, ``layout``,
        ``in_modes``, ``out_modes``, ``n_modes``, ``n_iter``, ``forward_path``; see
        :meth:`FactorizedConv2d.from_dense`.

    Returns
    -------
    FactorizedLayer
    """
    target = FACTORIZED_COUNTERPARTS.get(type(layer))
    if target is None:
        valid = ", ".join(f"nn.{cls.__name__}" for cls in FACTORIZED_COUNTERPARTS)
        raise ValueError(f"cannot factorize a {type(layer).__name__}; supported layers: {valid}")
    return target.from_dense(layer, format, **kwargs)


def to_dense(layer: FactorizedLayer) -> nn.Module:
    """The plain ``nn.Linear`` or ``nn.Conv1d/2d/3d`` that computes what ``layer`` computes.

    The weight is rebuilt from the factors once. Use it to deploy a trained factorized model where
    the download or storage size is what had to shrink but inference should run at dense speed:
    at batch 1 a factorized layer pays a fixed overhead per call (see BENCHMARKS.md, CIFAR-10
    latency) that the dense layer does not. The result holds the dense parameter count.

    Parameters
    ----------
    layer : FactorizedLinear or FactorizedConv1d/2d/3d

    Returns
    -------
    nn.Linear or nn.Conv1d/2d/3d
        On the layer's device and dtype, in the layer's training mode, with ``requires_grad``
        set on its parameters.
    """
    dense_type = {factorized: dense for dense, factorized in FACTORIZED_COUNTERPARTS.items()}.get(type(layer))
    if dense_type is None:
        valid = ", ".join(cls.__name__ for cls in FACTORIZED_COUNTERPARTS.values())
        raise ValueError(f"cannot convert a {type(layer).__name__} to a dense layer; supported layers: {valid}")
    weight = layer.weight_tensor
    factory = {"device": weight.device, "dtype": weight.dtype}
    if dense_type is nn.Linear:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **factory)
    else:
        dense = dense_type(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                           padding_mode=layer.padding_mode, **factory)
    with torch.no_grad():
        dense.weight.copy_(layer.weight().reshape(dense.weight.shape))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense.train(layer.training)
