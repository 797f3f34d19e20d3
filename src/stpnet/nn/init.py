"""Variance-preserving initialisation of factorized weights."""

from __future__ import annotations

import math

import torch

from ..formats import FactorizedTensor

__all__ = ["kaiming_std", "rescale_to_std"]


def kaiming_std(fan_in: int, gain: float = math.sqrt(2.0)) -> float:
    """The std of ``kaiming_normal_`` in fan_in mode: ``gain / sqrt(fan_in)`` (ReLU gain sqrt 2)."""
    return gain / math.sqrt(fan_in)


@torch.no_grad()
def rescale_to_std(tensor: FactorizedTensor, std: float) -> FactorizedTensor:
    """Scale the factors so the reconstructed tensor's root-mean-square is exactly ``std``, with
    every factor given the same Frobenius norm.

    Random factors give the right scale only in expectation (a product of random factors has a
    wide spread); this makes it exact for every format, rank and t. Each factor enters the tensor
    linearly, so scaling factor k by c_k scales the tensor by prod c_k; equal norms keep the
    gradients of the factors on one scale (a large core over orthonormal Tucker factors, say,
    gives the factors gradients large enough to diverge with the usual SGD learning rates).
    """
    params = list(tensor.parameters())
    rms = float(tensor.to_tensor().pow(2).mean().sqrt())
    norms = [float(p.norm()) for p in params]
    if rms == 0 or min(norms) == 0:
        return tensor
    log_target = (sum(math.log(n) for n in norms) + math.log(std / rms)) / len(params)
    for p, n in zip(params, norms):
        p.mul_(math.exp(log_target) / n)
    return tensor
