"""CP-ALS: alternating least squares for the canonical polyadic decomposition."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..formats.base import register_fit
from ..formats.cp import CPTensor
from ..functional.reconstruct import khatri_rao
from .api import relative_error

__all__ = ["cp_als", "mttkrp", "default_sweeps", "fit_cp", "cp_fit_bytes"]


def mttkrp(X: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """The matricized tensor times Khatri-Rao product ``X_(n) (⊙_{m != n} A_m)``: (I_n, R).

    Contracts the modes on the cheaper side of ``mode`` first, so the largest intermediate holds
    ``R * I_n`` times the smaller of the two sides' sizes, never ``R`` times the tensor.
    """
    shape = X.shape
    R = factors[0].shape[1]
    left, right = math.prod(shape[:mode]), math.prod(shape[mode + 1:])
    size = shape[mode]
    if mode == 0:
        return X.reshape(size, right) @ khatri_rao(factors[1:])
    if mode == len(shape) - 1:
        return X.reshape(left, size).transpose(0, 1) @ khatri_rao(factors[:-1])
    K_left, K_right = khatri_rao(factors[:mode]), khatri_rao(factors[mode + 1:])
    if left <= right:  # contract the larger (right) side first: the intermediate is (left, I_n, R)
        Y = (X.reshape(left * size, right) @ K_right).reshape(left, size, R)
        return torch.einsum("lir,lr->ir", Y, K_left)
    Y = (K_left.transpose(0, 1) @ X.reshape(left, size * right)).reshape(R, size, right)
    return torch.einsum("rix,xr->ir", Y, K_right)


def _svd_start(X: torch.Tensor, rank: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding (from its Gram matrix), padded with Gaussian
    columns where the mode is smaller than the rank."""
    factors = []
    for mode, size in enumerate(X.shape):
        unfolding = X.movedim(mode, 0).reshape(size, -1)
        _, vectors = torch.linalg.eigh(unfolding @ unfolding.transpose(0, 1))
        U = vectors.flip(-1)[:, :rank]
        if rank > size:
            extra = torch.randn(size, rank - size, dtype=X.dtype, device=X.device, generator=generator)
            U = torch.cat([U, extra / math.sqrt(size)], dim=1)
        factors.append(U)
    return factors


def cp_als(
    X: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 100,
    tol: float = 0.0,
    stall: float = 1e-9,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> CPTensor:
    """CP decomposition of ``X`` at rank ``rank`` by alternating least squares.

    Each step solves for one factor with the others fixed:
    ``A_n = X_(n) (⊙_{m != n} A_m) (⊛_{m != n} A_m^T A_m)^+``. The start is the leading left
    singular vectors of each unfolding (as TensorLy's ``init='svd'``); after every sweep the
    columns are rebalanced to equal norms across the factors (the same tensor, better conditioned).

    Parameters
    ----------
    X : torch.Tensor
        Tensor of order >= 2, float32 or float64.
    rank : int
        R, the number of rank-one terms.
    n_iter : int, default 100
        Maximum sweeps.
    tol : float, default 0.0
        Stop once the relative error ``||X - X_hat|| / ||X||`` is at most ``tol``.
    stall : float, default 1e-9
        Stop once a sweep improves the relative error by less than this.
    generator : torch.Generator, optional
        For the random columns of the start when R exceeds a mode size.
    callback : callable, optional
        ``callback(sweep, relative_error)`` after each sweep.

    Returns
    -------
    CPTensor

    References
    ----------
    .. [1] T. G. Kolda, B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
       455-500, 2009 (section 3.4, CP-ALS).
    .. [2] J. D. Carroll, J.-J. Chang, "Analysis of individual differences in multidimensional
       scaling via an N-way generalization of 'Eckart-Young' decomposition", Psychometrika 35,
       1970; R. A. Harshman, "Foundations of the PARAFAC procedure", UCLA Working Papers in
       Phonetics 16, 1970.
    """
    X = X.detach()
    n = X.ndim
    if rank >= math.prod(X.shape) // max(X.shape):
        return CPTensor(_exact(X, rank))
    factors = _svd_start(X, rank, generator)
    norm_sq = float(X.pow(2).sum())
    err = math.inf
    if norm_sq == 0.0:
        return CPTensor([torch.zeros_like(A) for A in factors])
    for sweep in range(n_iter):
        grams = [A.transpose(0, 1) @ A for A in factors]
        for mode in range(n):
            V = torch.ones_like(grams[0])
            for m in range(n):
                if m != mode:
                    V = V * grams[m]
            M = mttkrp(X, factors, mode)
            factors[mode] = _solve_gram(M, V)
            grams[mode] = factors[mode].transpose(0, 1) @ factors[mode]
        # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2, from the last mode's MTTKRP
        inner = float((M * factors[-1]).sum())
        V_all = V * grams[-1]
        fit_sq = float(V_all.sum())
        previous, err = err, math.sqrt(max(norm_sq - 2 * inner + fit_sq, 0.0) / norm_sq)
        _balance(factors)
        if callback is not None:
            callback(sweep, err)
        if err <= tol or previous - err < stall:
            break
    return CPTensor(factors)


def _solve_gram(M: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``M V^+`` for the symmetric positive semi-definite ``V`` (R x R): a Cholesky solve, and the
    pseudo-inverse only where ``V`` is singular (a Cholesky solve costs a fraction of it)."""
    L, info = torch.linalg.cholesky_ex(V)
    if int(info) == 0:
        return torch.cholesky_solve(M.transpose(0, 1), L).transpose(0, 1)
    return M @ torch.linalg.pinv(V, hermitian=True)


def default_sweeps(shape, rank: int, budget: float = 2e10) -> int:
    """ALS sweeps when none are asked for: 100, fewer for large problems, so that the default fit
    costs at most about ``budget`` multiply-adds (a sweep is about ``N (numel R + R^3)``), and at
    least 1 (a wide network's layers at 9x take CP ranks in the thousands, where one sweep is
    already about 10^11 multiply-adds)."""
    per_sweep = len(shape) * (math.prod(shape) * rank + rank ** 3)
    return int(min(100, max(1, budget // max(per_sweep, 1))))


def _exact(X: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """An exact CP at any rank >= prod(shape) / max(shape): one rank-one term per fibre along the
    largest mode (that fibre times indicator vectors of the other modes' indices); extra columns zero."""
    big = max(range(X.ndim), key=lambda m: X.shape[m])
    others = [m for m in range(X.ndim) if m != big]
    P = math.prod(X.shape[m] for m in others)
    fibres = X.movedim(big, -1).reshape(P, X.shape[big])  # row p: the fibre at the others' index p
    index = torch.arange(P, device=X.device)
    factors = [None] * X.ndim
    factors[big] = torch.zeros(X.shape[big], rank, dtype=X.dtype, device=X.device)
    factors[big][:, :P] = fibres.transpose(0, 1)
    stride = P
    for m in others:  # row-major digits of p over the other modes
        stride //= X.shape[m]
        A = torch.zeros(X.shape[m], rank, dtype=X.dtype, device=X.device)
        A[(index // stride) % X.shape[m], index] = 1
        factors[m] = A
    return factors


def _balance(factors: list[torch.Tensor]) -> None:
    """Give every factor's column r the same norm, (prod_n ||a_nr||)^(1/N), in place."""
    tiny = torch.finfo(factors[0].dtype).tiny
    norms = torch.stack([A.norm(dim=0) for A in factors]).clamp_min(tiny)  # (N, R)
    target = norms.log().mean(0).exp()  # geometric mean
    for k, A in enumerate(factors):
        factors[k] = A * (target / norms[k])


def fit_cp(cls: type[CPTensor], X: torch.Tensor, rank: tuple[int, ...] | None, t: int, *, tol: float | None,
           svd: str, generator: torch.Generator, n_iter: int = 0, n_restarts: int = 0,
           callback: Callable[[int, float], None] | None = None) -> CPTensor:
    """CP for :func:`stpnet.decompose`: CP-ALS from an SVD start (Carroll & Chang 1970; Harshman
    1970; Kolda & Bader 2009), ``n_iter`` sweeps (when 0: :func:`default_sweeps`), stopping early
    at ``tol`` or when the error stops moving. Without a rank, the smallest rank on a geometric
    ladder (1, 2, 3, 5, 8, ...) whose fit reaches ``tol``; the exact rank
    ``prod(shape) / max(shape)`` ends the ladder."""
    if rank is not None:
        return cp_als(X, rank[0], n_iter=n_iter or default_sweeps(X.shape, rank[0]), tol=tol or 0.0,
                      generator=generator, callback=callback)
    full = math.prod(X.shape) // max(X.shape)
    R = 1
    while True:
        result = cp_als(X, R, n_iter=n_iter or default_sweeps(X.shape, R), tol=tol, generator=generator,
                        callback=callback)
        if R >= full or relative_error(X, result) <= tol:
            return result
        R = min(full, max(R + 1, math.ceil(R * 1.5)))


def cp_fit_bytes(cls: type[CPTensor], shape: Sequence[int], t: int, rank: tuple[int, ...] | None, n_iter: int,
                 itemsize: int, svd: str) -> int:
    """Peak bytes of :func:`fit_cp`: the tensor, a working copy, and the largest partial
    Khatri-Rao product of the MTTKRP."""
    numel = math.prod(shape)
    R = 1 if rank is None else rank[0]
    return 3 * numel * itemsize + itemsize * R * int(math.isqrt(numel * max(shape)) + 1) * 2


register_fit(CPTensor.family, fit_cp, cp_fit_bytes)
