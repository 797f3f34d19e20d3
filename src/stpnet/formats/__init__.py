"""Factorized tensors: one class per family, ``t = 1`` classic and ``t > 1`` semi-tensor."""

from __future__ import annotations

from types import MappingProxyType

from .base import FactorizedTensor
from .tr import TRTensor
from .tt import TTTensor
from .tucker import TuckerTensor

#: Format name -> (class, whether the name denotes the semi-tensor variant).
FORMATS = MappingProxyType(
    {
        "tucker": (TuckerTensor, False),
        "sttu": (TuckerTensor, True),
        "tt": (TTTensor, False),
        "stt": (TTTensor, True),
        "tr": (TRTensor, False),
        "str": (TRTensor, True),
    }
)


def format_class(name: str) -> tuple[type[FactorizedTensor], bool]:
    """Look up a format name; raise ValueError listing the valid names."""
    key = name.lower() if isinstance(name, str) else name
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[key]


__all__ = ["FactorizedTensor", "TuckerTensor", "TTTensor", "TRTensor", "FORMATS", "format_class"]
