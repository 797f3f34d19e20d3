"""ST-HOSVD and HOOI for Tucker / STTu.

HOSVD and HOOI are De Lathauwer et al. (2000); the semi-tensor variant takes, for mode n, the
leading R_n/t_n left singular vectors of the mode-n unfolding with its rows ``p*t + u`` regrouped as
rows ``p`` and columns ``(u, rest)``, so that ``U_n ⊗ I_t`` is the factor (Zhao et al. 2021)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..formats.base import register_fit
from ..formats.tucker import TuckerTensor
from ..stp import _mode_product
from .memory import svd_bytes
from .svd import truncated_svd

__all__ = ["st_hosvd", "hooi", "fit_tucker", "tucker_fit_bytes"]


def _mode_matrix(X: torch.Tensor, mode: int, t: int) -> torch.Tensor:
    """Mode-n unfolding with rows split as p*t + u, reshaped to (I_n/t, t * rest)."""
    return X.movedim(mode, 0).reshape(X.shape[mode] // t, -1)


def _project(X: torch.Tensor, factors: Sequence[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    """X ⋉_m U_m^T on every mode m except ``skip``."""
    for m, U in enumerate(factors):
        if m != skip:
            X = _mode_product(X, U.mT, m)
    return X


def st_hosvd(
    X: torch.Tensor,
    rank: Sequence[int] | None,
    t: Sequence[int],
    *,
    tol: float | None = None,
    svd: str = "exact",
    generator: torch.Generator | None = None,
) -> TuckerTensor:
    """Semi-tensor HOSVD: per mode, the leading R_n/t_n left singular vectors of the mode matrix.

    Parameters
    ----------
    X : torch.Tensor
        The tensor (checked by the caller).
    rank : sequence of int or None
        Rank caps R_n (multiples of t_n), or None for no cap.
    t : sequence of int
        The STP factor of each mode.
    tol : float, optional
        Relative error target: each mode discards at most ``tol^2 ||X||^2 / N`` of energy, so
        ``||X - X_hat|| <= tol ||X||`` (the HOSVD bound holds for Kronecker-structured factors too).

    Returns
    -------
    TuckerTensor

    References
    ----------
    .. [1] L. De Lathauwer, B. De Moor, J. Vandewalle, "A multilinear singular value
       decomposition", SIAM J. Matrix Anal. Appl., 21(4), 2000.
    """
    n = X.ndim
    energy = None if tol is None else tol * float(torch.linalg.vector_norm(X)) / math.sqrt(n)
    factors = []
    for mode in range(n):
        cap = None if rank is None else rank[mode] // t[mode]
        U = truncated_svd(_mode_matrix(X, mode, t[mode]), cap, energy_tol=energy, method=svd,
                          generator=generator).U
        factors.append(U)
    core = _project(X, factors)
    return TuckerTensor(core, factors, t=tuple(t))


def hooi(
    X: torch.Tensor,
    init: TuckerTensor,
    *,
    n_iter: int = 10,
    tol: float = 0.0,
    svd: str = "exact",
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> TuckerTensor:
    """Higher-order orthogonal iteration, with Kronecker-structured factors for STTu.

    Each sweep updates every factor to the leading left singular vectors of the tensor projected
    on all other modes, then recomputes the core; the error never increases.

    Parameters
    ----------
    X : torch.Tensor
    init : TuckerTensor
        The start (usually :func:`st_hosvd`); its ranks and t are kept.
    n_iter : int
        At most this many sweeps.
    tol : float
        Stop when the relative error changes by less than this between sweeps.
    callback : callable, optional
        Called as ``callback(sweep, relative_error)`` after each sweep.

    Returns
    -------
    TuckerTensor

    References
    ----------
    .. [1] L. De Lathauwer, B. De Moor, J. Vandewalle, "On the best rank-1 and rank-(R1,...,RN)
       approximation of higher-order tensors", SIAM J. Matrix Anal. Appl., 21(4), 2000.
    """
    t = init.t
    factors = [U.detach() for U in init.factors]
    caps = [U.shape[1] for U in factors]
    norm2 = float(torch.linalg.vector_norm(X)) ** 2
    previous = math.inf
    core = init.core.detach()
    for sweep in range(n_iter):
        for mode in range(X.ndim):
            Y = _project(X, factors, skip=mode)
            factors[mode] = truncated_svd(_mode_matrix(Y, mode, t[mode]), caps[mode], method=svd,
                                          generator=generator).U
        core = _project(X, factors)
        err = math.sqrt(max(norm2 - float(torch.linalg.vector_norm(core)) ** 2, 0.0) / norm2)
        if callback is not None:
            callback(sweep, err)
        if abs(previous - err) < tol:
            break
        previous = err
    return TuckerTensor(core, factors, t=t)


def fit_tucker(cls: type[TuckerTensor], X: torch.Tensor, rank: tuple[int, ...] | None, t: tuple[int, ...], *,
               tol: float | None, svd: str, generator: torch.Generator, n_iter: int = 0, n_restarts: int = 0,
               callback: Callable[[int, float], None] | None = None) -> TuckerTensor:
    """Tucker / STTu for :func:`stpnet.decompose`: ST-HOSVD (Vannieuwenhoven et al. 2012;
    semi-tensor mode products for t > 1), then ``n_iter`` HOOI sweeps (De Lathauwer et al. 2000)."""
    result = st_hosvd(X, rank, t, tol=tol, svd=svd, generator=generator)
    if n_iter:
        result = hooi(X, result, n_iter=n_iter, tol=1e-12, svd=svd, generator=generator, callback=callback)
    return result


def tucker_fit_bytes(cls: type[TuckerTensor], shape: Sequence[int], t: tuple[int, ...],
                     rank: tuple[int, ...] | None, n_iter: int, itemsize: int, svd: str) -> int:
    """Peak bytes of :func:`fit_tucker`: the tensor, a working copy, and the largest mode
    unfolding's SVD."""
    numel = math.prod(shape)
    peak = max(svd_bytes(size // tk, numel // size * tk, itemsize, None if rank is None else rank[k] // tk,
                         svd == "randomized")
               for k, (size, tk) in enumerate(zip(shape, t)))
    return 2 * numel * itemsize + peak


register_fit(TuckerTensor.family, fit_tucker, tucker_fit_bytes)
