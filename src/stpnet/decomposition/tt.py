"""TT-SVD (Oseledets 2011, "Tensor-train decomposition") and STT-SVD: TT-SVD with ranks R/t of the
re-tensorized tensor ``X'[(i_1, u), ..., j] = X[..., j*t + u]``, its first core unpacked
(Zhao et al. 2021)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..formats.base import register_fit
from ..formats.tt import TTTensor
from ..functional.retensorize import copy_index_to_first_mode, first_core_from_classic
from .memory import chain_svd_bytes
from .svd import truncated_svd

__all__ = ["tt_svd", "stt_svd", "fit_tt", "tt_fit_bytes"]


def tt_svd(
    X: torch.Tensor,
    rank: Sequence[int] | None = None,
    *,
    tol: float | None = None,
    svd: str = "exact",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """TT-SVD: classic TT cores (r_{k-1}, I_k, r_k) of ``X``.

    Parameters
    ----------
    X : torch.Tensor
        Tensor of order >= 2.
    rank : sequence of int, optional
        Caps r_1..r_{N-1}; each bond also stays within what the unfolding allows.
    tol : float, optional
        Relative error target with delta-truncation, ``delta = tol ||X|| / sqrt(N-1)`` per bond,
        which guarantees ``||X - X_TT|| <= tol ||X||`` (Oseledets 2011, Theorem 2.2).

    Returns
    -------
    list of torch.Tensor

    References
    ----------
    .. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput., 33(5), 2011.
    """
    dims = X.shape
    n = len(dims)
    delta = None if tol is None else tol * float(torch.linalg.vector_norm(X)) / math.sqrt(n - 1)
    cores = []
    C = X
    r_prev = 1
    for k in range(n - 1):
        C = C.reshape(r_prev * dims[k], -1)
        cap = None if rank is None else rank[k]
        U, S, Vh = truncated_svd(C, cap, energy_tol=delta, method=svd, generator=generator)
        r = S.shape[0]
        cores.append(U.reshape(r_prev, dims[k], r))
        C = S[:, None] * Vh
        r_prev = r
    cores.append(C.reshape(r_prev, dims[-1], 1))
    return cores


def stt_svd(
    X: torch.Tensor,
    rank: Sequence[int] | None,
    t: int,
    *,
    tol: float | None = None,
    svd: str = "exact",
    generator: torch.Generator | None = None,
) -> TTTensor:
    """STT-SVD: TT-SVD with ranks R/t of the re-tensorized tensor, then unpack the first core.

    STT_t(X; R) equals TT(X'; R/t) with ``X'[(i_1, u), ..., j] = X[i_1, ..., j*t+u]``, so the
    error bound of TT-SVD carries over. With ``t = 1`` this is TT-SVD.

    Parameters
    ----------
    X : torch.Tensor
    rank : sequence of int or None
        Caps R_1..R_{N-1}, multiples of ``t``.
    t : int
    tol : float, optional
        Relative error target (delta-truncation).

    Returns
    -------
    TTTensor
    """
    Xp = copy_index_to_first_mode(X, t)
    caps = None if rank is None else [R // t for R in rank]
    cores = tt_svd(Xp, caps, tol=tol, svd=svd, generator=generator)
    cores[0] = first_core_from_classic(cores[0], t)
    return TTTensor(cores, t=t)


def fit_tt(cls: type[TTTensor], X: torch.Tensor, rank: tuple[int, ...] | None, t: int, *, tol: float | None,
           svd: str, generator: torch.Generator, n_iter: int = 0, n_restarts: int = 0,
           callback: Callable[[int, float], None] | None = None) -> TTTensor:
    """TT / STT for :func:`stpnet.decompose`: TT-SVD (Oseledets 2011) of the re-tensorized tensor;
    STT-SVD for t > 1 (Zhao et al. 2021). TT-SVD is quasi-optimal: no refinement."""
    return stt_svd(X, rank, t, tol=tol, svd=svd, generator=generator)


def tt_fit_bytes(cls: type[TTTensor], shape: Sequence[int], t: int, rank: tuple[int, ...] | None, n_iter: int,
                 itemsize: int, svd: str) -> int:
    """Peak bytes of :func:`fit_tt`: the chain SVD of the re-tensorized tensor."""
    return chain_svd_bytes(cls.classic_shape(shape, t), itemsize, None if rank is None else rank[0] // t,
                           svd == "randomized")


register_fit(TTTensor.family, fit_tt, tt_fit_bytes)
