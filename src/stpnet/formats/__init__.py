"""Factorized tensors: one class per family, ``t = 1`` classic and ``t > 1`` semi-tensor.

Each format registers itself when its class is defined (:class:`FactorizedTensor`); importing
its module here is the one registration line a new format needs.
"""

from __future__ import annotations

from .base import FITS, FORMATS, FactorizedTensor, FitMethod, fit_method, format_class, register_fit
from .tucker import TuckerTensor
from .tt import TTTensor
from .tr import TRTensor
from .cp import CPTensor

__all__ = ["FactorizedTensor", "TuckerTensor", "TTTensor", "TRTensor", "CPTensor", "FORMATS", "format_class", "FITS", "FitMethod",
           "fit_method", "register_fit"]
