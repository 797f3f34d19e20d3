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
           "tucker_reconstruction_macs", "chain_reconstruction_macs", "cp_reconstruction_macs",
           "balanced_split"]


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

    The ring is cut in two chains of about equal size (:func:`balanced_split`), each contracted
    left to right, and closed by one product over both cut bonds: the largest intermediate is
    ``r_0 * r_m`` times the smaller half, not ``r_0 * r_{N-1}`` times the whole tensor, as a chain
    carried around the ring would be (43 GB for a 512x512x3x3 WRN-16-8 weight at rank 68).
    """
    classic = [first_core_to_classic(cores[0], t), *cores[1:]]
    shape = [G.shape[1] for G in classic]
    if classic[0].shape[0] == 1:  # a train: nothing to close
        return copy_index_to_last_mode(_chain(classic).reshape(shape), t)
    m = balanced_split(shape)
    left, right = _chain(classic[:m]), _chain(classic[m:])  # (r0, P_left, r_m), (r_m, P_right, r0)
    r0, p_left, r_m = left.shape
    Xp = left.permute(1, 0, 2).reshape(p_left, r0 * r_m) @ right.permute(2, 0, 1).reshape(r0 * r_m, -1)
    return copy_index_to_last_mode(Xp.reshape(shape), t)


def balanced_split(sizes: Sequence[int]) -> int:
    """Where :func:`tr_to_tensor` cuts a ring (and :func:`cp_to_tensor` its factors) over modes
    ``sizes``: the ``m`` (1 <= m < N) whose two halves ``sizes[:m]`` and ``sizes[m:]`` have the
    most balanced numbers of entries."""
    logs = [math.log(int(n)) for n in sizes]  # a list, not a generator: torch.compile traces this
    total = sum(logs)
    best, gap, left = 1, math.inf, 0.0
    for m in range(1, len(sizes)):
        left += logs[m - 1]
        if abs(2 * left - total) < gap:
            best, gap = m, abs(2 * left - total)
    return best


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


def _open_chain_macs(classic_shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of :func:`_chain` on classic cores of these shapes: step ``k`` multiplies
    ``(r_0 * n_1 ... n_{k-1}, r_{k-1})`` by ``(r_{k-1}, n_k * r_k)``."""
    rows = int(classic_shapes[0][0]) * int(classic_shapes[0][1])
    macs = 0
    for r_in, n, r_out in classic_shapes[1:]:
        macs += rows * int(r_in) * int(n) * int(r_out)
        rows *= int(n)
    return macs


def chain_reconstruction_macs(core_shapes: Sequence[Sequence[int]], t: int = 1) -> int:
    """Multiply-adds :func:`tt_to_tensor` or :func:`tr_to_tensor` spends on cores of these shapes.

    The cores are taken as classic (the first re-tensorized to ``(a, I*t, R/t)``). A train is one
    chain left to right; a ring (``a = r_0 > 1``) two chains cut at :func:`balanced_split` and one
    ``(P_left, r_0 r_m) x (r_0 r_m, P_right)`` product closing them.
    """
    a, size, rank = (int(v) for v in core_shapes[0])
    classic = [(a, size * t, rank // t), *[tuple(int(v) for v in s) for s in core_shapes[1:]]]
    if a == 1:
        return _open_chain_macs(classic)
    m = balanced_split([s[1] for s in classic])
    p_left = math.prod(s[1] for s in classic[:m])
    p_right = math.prod(s[1] for s in classic[m:])
    r_m = classic[m][0]
    return _open_chain_macs(classic[:m]) + _open_chain_macs(classic[m:]) + p_left * p_right * a * r_m


def khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product of matrices (I_k, R), row-major: row ``(i_1, ..., i_n)`` of the
    result is ``prod_k A_k[i_k, :]`` (the first factor's index varies slowest); (prod I_k, R)."""
    M = factors[0]
    for A in factors[1:]:
        M = (M.unsqueeze(1) * A.unsqueeze(0)).reshape(-1, A.shape[-1])
    return M


def cp_to_tensor(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of a CP (canonical polyadic) decomposition with factors A_n (I_n, R):
    ``X[i_1, ..., i_N] = sum_r A_1[i_1, r] ... A_N[i_N, r]`` (Hitchcock 1927; Kolda & Bader 2009).

    Computed as one product of the Khatri-Rao products of two balanced groups of factors
    (:func:`balanced_split`): the largest intermediate is R times the larger group's entries, not
    R times the tensor (43 GB for a WRN-16-8 512x512x3x3 weight at its 9x rank, 4,600)."""
    shape = [A.shape[0] for A in factors]
    m = balanced_split(shape)
    return (khatri_rao(factors[:m]) @ khatri_rao(factors[m:]).transpose(0, 1)).reshape(shape)


def _khatri_rao_macs(sizes: Sequence[int], rank: int) -> int:
    macs, rows = 0, int(sizes[0])
    for size in sizes[1:]:
        rows *= int(size)
        macs += rows * rank
    return macs


def cp_reconstruction_macs(shape: Sequence[int], rank: int) -> int:
    """Multiply-adds :func:`cp_to_tensor` spends: the Khatri-Rao steps of both groups, then one
    product."""
    m = balanced_split(shape)
    left, right = shape[:m], shape[m:]
    return (_khatri_rao_macs(left, rank) + _khatri_rao_macs(right, rank)
            + math.prod(int(n) for n in left) * math.prod(int(n) for n in right) * rank)
