"""The ``decompose`` entry point: input checks, rank rules, memory check, fit and refinement."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .._arrays import ArrayLike, as_tensor
from .._validate import check_finite_tensor, check_positive_int
from ..formats import FORMATS, FactorizedTensor, fit_method, format_class
from .memory import check_memory
from .ranks import ranks_for_budget
from .svd import SVD_METHODS

__all__ = ["decompose", "relative_error"]


def decompose(
    X: ArrayLike,
    format: str,
    rank: int | Sequence[int] | None = None,
    t: int | Sequence[int] | None = None,
    tol: float | None = None,
    max_params: int | None = None,
    *,
    n_iter: int = 0,
    n_restarts: int = 3,
    svd: str = "exact",
    seed: int = 0,
    max_memory: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> FactorizedTensor:
    """Decompose a tensor into one of the registered formats (:data:`stpnet.FORMATS`).

    Parameters
    ----------
    X : torch.Tensor or numpy.ndarray
        float32 or float64, on any device; finite and non-empty.
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str', 'cp'}
        The fit is the one registered for the format's family
        (:func:`stpnet.formats.register_fit`): ST-HOSVD for Tucker/STTu, (S)TT-SVD, (S)TR-SVD,
        and ALS from an SVD start for CP.
    rank : int or sequence of int, optional
        Upper bounds, as in TensorLy: a rank larger than the data allows is lowered to the largest
        valid one, and the result reports its actual ranks. Lengths: Tucker N, TT N-1 (or N+1 with
        boundary ones), TR N (or N+1 with R_N = R_0). Multiples of ``t``.
    t : int or sequence of int, optional
        STP factor; default 1 for the classic formats and 2 for the semi-tensor ones. Tucker/STTu
        accept one per mode. The classic names require ``t = 1``.
    tol : float, optional
        Relative error target ``||X - X_hat|| <= tol ||X||`` for the SVD fit (delta-truncation
        for TT/TR, per-mode energy for Tucker), with ``rank`` as caps if both are given. ALS
        refinement stops once it reaches ``tol``.
    max_params : int, optional
        Parameter budget: the largest uniform rank that fits. Not combined with rank or tol.
    n_iter : int, default 0
        Refinement sweeps after the SVD fit: HOOI for Tucker/STTu, ALS for TR/STR. TT-SVD is
        quasi-optimal and has none. CP's fit is ALS itself: ``n_iter`` sweeps (when 0, up
        to 100 by the problem's size).
    n_restarts : int, default 3
        ALS restarts from random cores when a run stalls above ``tol`` (only with ``tol``).
    svd : {'exact', 'randomized'}
        'randomized' sketches large unfoldings (needs rank or max_params).
    seed : int, default 0
        Seeds the randomized SVD and ALS restarts.
    max_memory : int, optional
        Refuse (InsufficientMemoryError) if the estimated peak exceeds this many bytes; by
        default the memory free on the tensor's device.
    callback : callable, optional
        ``callback(sweep, relative_error)`` after each refinement sweep.

    Returns
    -------
    FactorizedTensor
        The format's class (:class:`TuckerTensor`, :class:`TTTensor`, :class:`TRTensor`,
        :class:`CPTensor`) on X's device and dtype.

    Raises
    ------
    ValueError
        Unknown format, wrong order, rank below 1, t not dividing a rank or mode size, NaN/Inf
        or empty input, or a missing or conflicting rank rule.
    InsufficientMemoryError
        If the estimated peak memory exceeds ``max_memory`` or the free memory.

    Examples
    --------
    >>> import torch, stpnet
    >>> X = stpnet.TTTensor.random((8, 8, 8), rank=4, t=2, dtype=torch.float64).to_tensor()
    >>> Y = stpnet.decompose(X, "stt", rank=4, t=2)
    >>> bool(stpnet.relative_error(X, Y) < 1e-10)
    True
    """
    cls, semi = format_class(format)
    X, _ = as_tensor(X, "X")
    X = X.detach()
    if X.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"X must be float32 or float64, got {X.dtype}; convert with .float() or .double()")
    check_finite_tensor(X, "X")
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd method {svd!r}; valid: {', '.join(SVD_METHODS)}")
    if n_iter < 0 or n_restarts < 0:
        raise ValueError(f"n_iter and n_restarts must be >= 0, got {n_iter} and {n_restarts}")
    if n_iter and cls.refinement is None:
        def names(c):
            return "/".join(n for n in (c.family, c.semi_name) if n)

        refined = " and ".join(f"{names(c)} ({c.refinement})" for c in dict.fromkeys(c for c, _ in FORMATS.values())
                               if c.refinement)
        raise ValueError(f"n_iter: {names(cls).upper()} has no refinement (its SVD fit is quasi-optimal); "
                         f"refinement exists for {refined}")
    if tol is not None and not (0 <= tol < 1):
        raise ValueError(f"tol is a relative error and must be in [0, 1), got {tol}")
    if rank is None and tol is None and max_params is None:
        raise ValueError("give a rank rule: rank=..., tol=..., or max_params=...")
    if max_params is not None and (rank is not None or tol is not None):
        raise ValueError("max_params chooses the ranks by itself; do not combine it with rank or tol")

    shape = tuple(X.shape)
    t = cls.t_for(semi, t, shape)
    if max_params is not None:
        max_params = check_positive_int(max_params, "max_params")
        caps = ranks_for_budget(cls, shape, t, max_params)
    elif rank is not None:
        caps = cls.validate_rank(shape, rank, t)
    else:
        cls.validate_rank(shape, t, t)  # order and t checks
        caps = None

    method = fit_method(cls)
    check_memory(method.fit_bytes(cls, shape, t, caps, n_iter, X.element_size(), svd), X.device,
                 max_memory, f"decomposing a {shape} tensor as {format}")
    generator = torch.Generator(device=X.device).manual_seed(seed)
    # Fit X / 2^e with 2^e near max|X| (exact in floating point), then scale one factor back: sums
    # of squares neither overflow (float32 at 1e18) nor underflow (1e-300), and a zero tensor
    # gets the exact zero decomposition without any refinement dividing by its norm.
    peak = float(X.abs().max())
    if peak == 0.0:
        n_iter = 0
        scale = 1.0
    else:
        scale = 2.0 ** math.floor(math.log2(peak))
        X = X / scale if scale != 1.0 else X

    result = method.fit(cls, X, caps, t, tol=tol, svd=svd, generator=generator, n_iter=n_iter, n_restarts=n_restarts,
                        callback=callback)
    if scale != 1.0:
        result.scale_(scale)
    return result


def relative_error(X: ArrayLike, approximation: FactorizedTensor | ArrayLike) -> float:
    """``||X - X_hat||_F / ||X||_F`` for a dense tensor and a factorized (or dense) approximation.

    Computed in float64 after scaling by the largest entry, so it neither overflows nor
    underflows.

    Parameters
    ----------
    X : array-like
        The dense reference tensor (torch tensor or NumPy array).
    approximation : FactorizedTensor or array-like
        Its approximation, factorized (rebuilt with ``to_tensor()``) or dense, of the same shape.

    Returns
    -------
    float
        The relative Frobenius error: 0.0 when both are zero, ``inf`` for a non-zero approximation
        of a zero tensor.
    """
    X = as_tensor(X, "X")[0].detach().double()
    Y = approximation.to_tensor() if isinstance(approximation, FactorizedTensor) else as_tensor(approximation)[0]
    Y = Y.detach().double()
    peak = float(torch.maximum(X.abs().max(), Y.abs().max())) if X.numel() else 0.0
    if peak == 0.0:  # both zero: exact
        return 0.0
    X, Y = X / peak, Y / peak  # no overflow or underflow in the sums of squares
    norm = float(torch.linalg.vector_norm(X))
    diff = float(torch.linalg.vector_norm(X - Y))
    if norm == 0.0:
        return math.inf  # a non-zero approximation of zero
    return diff / norm
