"""Factorized layers: each owns a factorized tensor (``stpnet.formats``) as its weight."""

from .base import FORWARD_PATHS, FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .convert import from_dense, to_dense
from .cost import PathCost
from .linear import FactorizedLinear
from .tensorize import Tensorization, channel_modes, factorize

__all__ = [
    "FactorizedLayer",
    "FactorizedLinear",
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "from_dense",
    "to_dense",
    "FORWARD_PATHS",
    "PathCost",
    "Tensorization",
    "channel_modes",
    "factorize",
]
