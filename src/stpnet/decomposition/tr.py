"""TR-SVD and TR alternating least squares (Zhao et al. 2016, "Tensor ring decomposition"), and the
semi-tensor ring through the identity STR_t(X; R) = TR(X'; R/t), ``X'`` re-tensorized as for STT."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..formats.base import register_fit
from ..formats.tr import TRTensor, split_pair
from ..functional.reconstruct import _chain, tr_to_tensor
from ..functional.retensorize import (
    copy_index_to_first_mode,
    first_core_from_classic,
)
from .memory import chain_svd_bytes
from .svd import truncated_svd

__all__ = ["tr_svd", "str_svd", "tr_als", "fit_tr", "tr_fit_bytes"]


def tr_svd(
    X: torch.Tensor,
    rank: Sequence[int] | None = None,
    *,
    tol: float | None = None,
    svd: str = "exact",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """TR-SVD: classic TR cores (r_{k-1}, I_k, r_k) of ``X``, with r_N = r_0.

    The first unfolding (I_1 x rest) is split by one SVD into r_0 * r_1 triplets; the remaining
    cores follow by TT-SVD with r_0 carried along the columns.

    Parameters
    ----------
    X : torch.Tensor
        Tensor of order >= 2.
    rank : sequence of int, optional
        Caps r_0..r_{N-1}.
    tol : float, optional
        Relative error target: delta_1 = sqrt(2) tol ||X|| / sqrt(N) for the first unfolding and
        tol ||X|| / sqrt(N) for the others, so ``||X - X_TR|| <= tol ||X||``.

    Returns
    -------
    list of torch.Tensor

    References
    ----------
    .. [1] Q. Zhao, G. Zhou, S. Xie, L. Zhang, A. Cichocki, "Tensor Ring Decomposition",
       arXiv:1606.05535, 2016.
    """
    dims = X.shape
    n = len(dims)
    norm = float(torch.linalg.vector_norm(X))
    delta = None if tol is None else tol * norm / math.sqrt(n)
    delta1 = None if tol is None else math.sqrt(2) * delta
    cap0 = None if rank is None else rank[0]
    cap1 = None if rank is None else rank[1]
    C = X.reshape(dims[0], -1)
    first_cap = None if rank is None else cap0 * cap1
    U, S, Vh = truncated_svd(C, first_cap, energy_tol=delta1, method=svd, generator=generator)
    r0, r1 = split_pair(S.shape[0], cap0, cap1)
    keep = r0 * r1
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    cores = [U.reshape(dims[0], r0, r1).permute(1, 0, 2).contiguous()]
    C = (S[:, None] * Vh).reshape(r0, r1, -1).permute(1, 2, 0)  # (r1, rest, r0)
    r_prev = r1
    for k in range(1, n - 1):
        C = C.reshape(r_prev * dims[k], -1)
        cap = None if rank is None else rank[k + 1]
        U, S, Vh = truncated_svd(C, cap, energy_tol=delta, method=svd, generator=generator)
        r = S.shape[0]
        cores.append(U.reshape(r_prev, dims[k], r))
        C = S[:, None] * Vh
        r_prev = r
    cores.append(C.reshape(r_prev, dims[-1], r0))
    return cores


def str_svd(
    X: torch.Tensor,
    rank: Sequence[int] | None,
    t: int,
    *,
    tol: float | None = None,
    svd: str = "exact",
    generator: torch.Generator | None = None,
) -> TRTensor:
    """STR-SVD: TR-SVD with ranks R/t of the re-tensorized tensor, then unpack the first core."""
    Xp = copy_index_to_first_mode(X, t)
    caps = None if rank is None else [R // t for R in rank]
    cores = tr_svd(Xp, caps, tol=tol, svd=svd, generator=generator)
    cores[0] = first_core_from_classic(cores[0], t)
    return TRTensor(cores, t=t)


def _als_sweeps(
    Xp: torch.Tensor,
    cores: list[torch.Tensor],
    n_iter: int,
    target: float,
    stall: float,
    callback: Callable[[int, float], None] | None,
    sweep_offset: int,
) -> tuple[list[torch.Tensor], float, int]:
    """Run TR-ALS sweeps on classic cores; return (cores, relative error, sweeps done)."""
    n = Xp.ndim
    norm = float(torch.linalg.vector_norm(Xp))
    err = math.inf
    history: list[float] = []
    done = 0
    for sweep in range(n_iter):
        for k in range(n):
            order = [(k + 1 + j) % n for j in range(n - 1)]  # the other cores, cyclically after k
            Q = _chain([cores[j] for j in order])  # (r_{k+1}, J, r_k)
            rk, rk1 = cores[k].shape[0], cores[k].shape[2]
            Q2 = Q.permute(2, 0, 1).reshape(rk * rk1, -1)  # [(a, b), J]
            Xk = Xp.permute(k, *order).reshape(Xp.shape[k], -1)  # [i_k, J]
            gram = Q2 @ Q2.mT
            rhs = Xk @ Q2.mT
            G2 = rhs @ torch.linalg.pinv(gram, hermitian=True)
            cores[k] = G2.reshape(-1, rk, rk1).permute(1, 0, 2).contiguous()
        # residual of the last solve equals the current reconstruction error
        err = float(torch.linalg.vector_norm(Xk - G2 @ Q2)) / norm
        done = sweep + 1
        if callback is not None:
            callback(sweep_offset + sweep, err)
        history.append(err)
        if err <= target:
            break
        if len(history) > 10 and history[-11] - err < stall * history[-11]:
            break  # less than `stall` relative progress over 10 sweeps
    return cores, err, done


def tr_als(
    X: torch.Tensor,
    init: TRTensor,
    *,
    n_iter: int = 100,
    tol: float = 0.0,
    n_restarts: int = 3,
    stall: float = 1e-3,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> TRTensor:
    """Alternating least squares for TR / STR, with restarts when it stalls.

    Each step solves for one core with the others fixed (a linear least-squares problem). STR is
    refined as the TR of the re-tensorized tensor (STR_t(X; R) = TR(X'; R/t)), which is the same problem.

    ALS can stall in a "swamp" far from the optimum, so a run whose error stops improving (less
    than ``stall`` relative progress over 10 sweeps) above ``tol`` is restarted from random cores,
    up to ``n_restarts`` times; the best result is kept.

    Parameters
    ----------
    X : torch.Tensor
    init : TRTensor
        The start (usually :func:`str_svd`); its ranks and t are kept.
    n_iter : int
        Sweeps per run.
    tol : float
        Stop once the relative error is at most ``tol``.
    n_restarts : int
        Extra runs from random starts when a run ends above ``tol``.
    generator : torch.Generator, optional
        For the random restarts.
    callback : callable, optional
        ``callback(sweep, relative_error)`` after each sweep (sweeps count on across restarts).

    Returns
    -------
    TRTensor

    References
    ----------
    .. [1] Q. Zhao, G. Zhou, S. Xie, L. Zhang, A. Cichocki, "Tensor Ring Decomposition",
       arXiv:1606.05535, 2016.
    """
    t = init.t
    Xp = copy_index_to_first_mode(X, t)
    start = [G.detach().clone() for G in init.to_classic().cores]
    best_cores, best_err, offset = start, math.inf, 0
    for attempt in range(n_restarts + 1):
        if attempt > 0:
            scale = (float(torch.linalg.vector_norm(Xp)) ** 2 / Xp.numel()) ** 0.5
            probe = [torch.randn(G.shape, dtype=G.dtype, device=G.device, generator=generator) for G in start]
            probe_std = float(tr_to_tensor(probe).std())
            factor = (scale / max(probe_std, 1e-30)) ** (1.0 / len(probe))
            start = [G * factor for G in probe]
        cores, err, done = _als_sweeps(Xp, list(start), n_iter, tol, stall, callback, offset)
        offset += done
        if err < best_err:
            best_cores, best_err = cores, err
        if best_err <= tol:
            break
    best_cores[0] = first_core_from_classic(best_cores[0], t)
    return TRTensor(best_cores, t=t)


def fit_tr(cls: type[TRTensor], X: torch.Tensor, rank: tuple[int, ...] | None, t: int, *, tol: float | None,
           svd: str, generator: torch.Generator, n_iter: int = 0, n_restarts: int = 0,
           callback: Callable[[int, float], None] | None = None) -> TRTensor:
    """TR / STR for :func:`stpnet.decompose`: TR-SVD (Zhao et al. 2016) of the re-tensorized tensor
    (STR-SVD for t > 1), then ``n_iter`` ALS sweeps, restarted from random cores up to
    ``n_restarts`` times when a run stalls above ``tol`` (only with ``tol``: without a target a
    stall cannot be told from convergence)."""
    result = str_svd(X, rank, t, tol=tol, svd=svd, generator=generator)
    if n_iter:
        result = tr_als(X, result, n_iter=n_iter, tol=tol or 0.0, n_restarts=n_restarts if tol else 0,
                        generator=generator, callback=callback)
    return result


def tr_fit_bytes(cls: type[TRTensor], shape: Sequence[int], t: int, rank: tuple[int, ...] | None, n_iter: int,
                 itemsize: int, svd: str) -> int:
    """Peak bytes of :func:`fit_tr`: the chain SVD, and with ALS sweeps the sub-chain and the
    normal equations."""
    numel = math.prod(shape)
    dims = cls.classic_shape(shape, t)
    peak = chain_svd_bytes(dims, itemsize, None if rank is None else rank[0] * rank[1] // (t * t),
                           svd == "randomized")
    if n_iter > 0:
        r2 = max(rank) ** 2 // (t * t) if rank is not None else min(dims[0], numel // dims[0])
        peak = max(peak, 2 * numel * itemsize + itemsize * (2 * numel + 2 * r2 * (numel // min(dims))))
    return peak


register_fit(TRTensor.family, fit_tr, tr_fit_bytes)
