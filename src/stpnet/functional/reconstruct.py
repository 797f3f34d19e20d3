"""Dense reconstruction of each format from its factors: pure functions with autograd.

Index conventions: row-major, and a dimension of size P*t splits as ``p*t + u``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..stp import _mode_product
from .retensorize import copy_index_to_last_mode, first_core_to_classic

__all__ = ["tucker_to_tensor", "tt_to_tensor", "tr_to_tensor", "cp_to_tensor", "khatri_rao",
           "tucker_reconstruction_macs", "chain_reconstruction_macs", "cp_reconstruction_macs"]


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``X = G ⋉_1 U_1 ⋉_2 U_2 ... ⋉_N U_N``; each mode's t is ``core.shape[n] / U_n.shape[1]``."""
    X = core
    for mode, U in enumerate(factors):
        X = _mode_product(X, U, mode)
    return X


def _chain(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract classic cores (r_{k-1}, n_k, r_k) left to right into (r_0, prod n, r_N)."""
    r0 = cores[0].shape[0]
    M = cores[0].reshape(-1, cores[0].shape[-1])  # (r0*n1, r1)
    for G in cores[1:]:
        M = M @ G.reshape(G.shape[0], -1)  # (r0*n..., n_k*r_k)
        M = M.reshape(-1, G.shape[-1])
    return M.reshape(r0, -1, cores[-1].shape[-1])


def tt_to_tensor(cores: Sequence[torch.Tensor], t: int = 1) -> torch.Tensor:
    """Dense tensor of a TT (t = 1) or STT (t > 1) given 3-way cores with singleton boundaries.

    ``X[i_1, ..., j*t+u] = sum G_1[0, i_1, b_1*t+u] G_2[b_1, i_2, b_2] ... G_N[b_{N-1}, j, 0]``.
    """
    classic = [first_core_to_classic(cores[0], t), *cores[1:]]
    shape = [G.shape[1] for G in classic]
    Xp = _chain(classic).reshape(shape)
    return copy_index_to_last_mode(Xp, t)


def tr_to_tensor(cores: Sequence[torch.Tensor], t: int = 1) -> torch.Tensor:
    """Dense tensor of a TR (t = 1) or STR (t > 1).

    ``X[i_1, ..., j*t+u] = sum G_1[a, i_1, b_1*t+u] G_2[b_1, i_2, b_2] ... G_N[b_{N-1}, j, a]``.
    """
    classic = [first_core_to_classic(cores[0], t), *cores[1:]]
    shape = [G.shape[1] for G in classic]
    M = _chain(classic)  # (r0, prod n, r0)
    Xp = torch.einsum("aia->i", M).reshape(shape)
    return copy_index_to_last_mode(Xp, t)


def tucker_reconstruction_macs(core_shape: Sequence[int], factor_shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds :func:`tucker_to_tensor` spends: mode ``n`` costs ``J_n`` times the current size.

    ``Y[j*t+u, rest] = sum_p U[j, p] X[p*t+u, rest]`` is ``J * t * rest * P = J * numel(X)``
    multiply-adds, and leaves ``J * t * rest`` entries.
    """
    numel = math.prod(int(size) for size in core_shape)
    macs = 0
    for J, P in factor_shapes:
        macs += int(J) * numel
        numel = numel // int(P) * int(J)
    return macs


def chain_reconstruction_macs(core_shapes: Sequence[Sequence[int]], t: int = 1) -> int:
    """Multiply-adds :func:`tt_to_tensor` or :func:`tr_to_tensor` spends on cores of these shapes.

    The chain is contracted left to right on the classic cores (the first core re-tensorized to
    ``(a, I*t, R/t)``): step ``k`` multiplies ``(a * n_1 ... n_{k-1}, r_{k-1})`` by
    ``(r_{k-1}, n_k * r_k)``. A ring (``a = r_0 > 1``) pays ``r_0`` times a train's cost.
    """
    a, size, _ = (int(v) for v in core_shapes[0])
    rows = a * size * t
    macs = 0
    for r_in, n, r_out in core_shapes[1:]:
        macs += rows * int(r_in) * int(n) * int(r_out)
        rows *= int(n)
    return macs


def khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product of matrices (I_k, R), row-major: row ``(i_1, ..., i_n)`` of the
    result is ``prod_k A_k[i_k, :]`` (the first factor's index varies slowest); (prod I_k, R)."""
    M = factors[0]
    for A in factors[1:]:
        M = (M.unsqueeze(1) * A.unsqueeze(0)).reshape(-1, A.shape[-1])
    return M


def cp_to_tensor(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of a CP (canonical polyadic) decomposition with factors A_n (I_n, R):
    ``X[i_1, ..., i_N] = sum_r A_1[i_1, r] ... A_N[i_N, r]`` (Hitchcock 1927; Kolda & Bader 2009)."""
    shape = [A.shape[0] for A in factors]
    return (khatri_rao(factors[:-1]) @ factors[-1].transpose(0, 1)).reshape(shape)


def cp_reconstruction_macs(shape: Sequence[int], rank: int) -> int:
    """Multiply-adds :func:`cp_to_tensor` spends: the Khatri-Rao steps, then one product."""
    macs, rows = 0, int(shape[0])
    for size in shape[1:-1]:
        rows *= int(size)
        macs += rows * rank
    return macs + rows * int(shape[-1]) * rank
