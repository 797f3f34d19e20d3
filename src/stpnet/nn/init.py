"""Variance-preserving initialisation of factorized weights."""

from __future__ import annotations

import math

import torch

from ..formats import FactorizedTensor, TuckerTensor

__all__ = ["kaiming_std", "rescale_to_std"]


def kaiming_std(fan_in: int, gain: float = math.sqrt(2.0)) -> float:
    """The std of ``kaiming_normal_`` in fan_in mode: ``gain / sqrt(fan_in)`` (ReLU gain sqrt 2)."""
    return gain / math.sqrt(fan_in)


@torch.no_grad()
def rescale_to_std(tensor: FactorizedTensor, std: float) -> FactorizedTensor:
    """Scale one factor so that the reconstructed tensor's root-mean-square is exactly ``std``.

    Random factors give the right scale only in expectation (a product of random factors has a
    wide spread); this makes it exact for every format, rank and t.
    """
    rms = float(tensor.to_tensor().pow(2).mean().sqrt())
    if rms > 0:
        # the map from any one factor to the tensor is linear; Tucker scales its core so the
        # factor matrices stay orthonormal
        target = tensor.core if isinstance(tensor, TuckerTensor) else tensor.factors[0]
        target.mul_(std / rms)
    return tensor
