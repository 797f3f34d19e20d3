"""Truncated SVD (exact or randomized) with rank caps and energy truncation."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SVDResult", "truncated_svd", "SVD_METHODS"]

SVD_METHODS = ("exact", "randomized")


class SVDResult(NamedTuple):
    """Leading singular triplets: ``M ≈ U @ diag(S) @ Vh``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of each column of U positive (a deterministic sign)."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def _energy_rank(S: torch.Tensor, energy_tol: float) -> int:
    """Smallest r with sum_{i >= r} S_i^2 <= energy_tol^2 (at least 1)."""
    tail = torch.flip(torch.cumsum(torch.flip(S.double() ** 2, [0]), 0), [0])  # tail[i] = sum_{j>=i}
    ok = (tail <= energy_tol**2).nonzero()
    r = int(ok[0]) if len(ok) else len(S)
    return max(r, 1)


def truncated_svd(
    M: torch.Tensor,
    rank: int | None = None,
    *,
    energy_tol: float | None = None,
    method: str = "exact",
    n_oversamples: int = 10,
    n_power_iter: int = 2,
    generator: torch.Generator | None = None,
) -> SVDResult:
    """Leading singular triplets of a matrix.

    Parameters
    ----------
    M : torch.Tensor, shape (m, n)
    rank : int, optional
        Keep at most this many triplets (capped at min(m, n)).
    energy_tol : float, optional
        Keep the fewest triplets whose discarded singular values satisfy
        ``sum S_i^2 <= energy_tol^2`` (absolute, in the units of ``M``).
    method : {'exact', 'randomized'}
        'randomized' (Halko, Martinsson and Tropp 2011) needs ``rank``; it projects on
        ``rank + n_oversamples`` random directions with ``n_power_iter`` power iterations.
    generator : torch.Generator, optional
        For the randomized sketch.

    Returns
    -------
    SVDResult
        ``U`` (m, r), ``S`` (r,), ``Vh`` (r, n), with a deterministic sign per triplet.
    """
    m, n = M.shape
    k = min(m, n)
    cap = k if rank is None else min(rank, k)
    if method == "randomized" and cap + n_oversamples < k:
        if rank is None:
            raise ValueError("svd='randomized' needs a rank (or max_params); tol alone needs the full spectrum")
        sketch = cap + n_oversamples
        omega = torch.randn(n, sketch, dtype=M.dtype, device=M.device, generator=generator)
        Q = torch.linalg.qr(M @ omega).Q
        for _ in range(n_power_iter):
            Q = torch.linalg.qr(M.mT @ Q).Q
            Q = torch.linalg.qr(M @ Q).Q
        Ub, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
        U = Q @ Ub
    elif method in SVD_METHODS:
        if n > m:  # LAPACK is several times faster on the tall orientation; same factors
            V, S, Uh = torch.linalg.svd(M.mT, full_matrices=False)
            U, Vh = Uh.mT, V.mT
        else:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    else:
        raise ValueError(f"unknown svd method {method!r}; valid: {', '.join(SVD_METHODS)}")
    r = cap
    if energy_tol is not None:
        r = min(r, _energy_rank(S, energy_tol))
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    U, Vh = _fix_signs(U, Vh)
    return SVDResult(U, S, Vh)
