"""``from_dense``: the factorized counterpart of a trained dense layer, whatever its type."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .linear import FactorizedLinear

__all__ = ["from_dense", "FACTORIZED_COUNTERPARTS"]

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
