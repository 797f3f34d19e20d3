"""The demo job: decompose one tensor in all six formats and report size, error and time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .decomposition import decompose, relative_error

__all__ = ["DemoRow", "smooth_field_tensor", "decomposition_demo"]


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo table."""

    format: str
    rank: tuple[int, ...]
    t: int
    params: int
    compression: float
    rel_error: float
    seconds: float


def smooth_field_tensor(size: int = 16, order: int = 4, noise: float = 0.01, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Samples of ``1 / sqrt(x_1^2 + ... + x_N^2)`` on a uniform grid in (0, 1]^N, plus noise.

    A standard test tensor of the tensor-train literature (a Newton-like potential): it has rapidly
    decaying singular values in every unfolding, like trained weights, but it is not exactly low
    rank, and the relative Gaussian ``noise`` sets an error floor as measurement noise would.
    """
    axis = torch.arange(1, size + 1, dtype=dtype) / size
    grids = torch.meshgrid(*([axis] * order), indexing="ij")
    X = 1.0 / torch.sqrt(sum(g**2 for g in grids))
    gen = torch.Generator().manual_seed(seed)
    N = torch.randn(X.shape, dtype=dtype, generator=gen)
    return X + noise * N * (X.norm() / N.norm())


def decomposition_demo(X: torch.Tensor | None = None, rank: int = 6, t: int = 2) -> list[DemoRow]:
    """Decompose ``X`` (default :func:`smooth_field_tensor`) in all six formats at one rank.

    TR and STR get 30 ALS sweeps after TR-SVD, Tucker and STTu 5 HOOI sweeps.
    """
    if X is None:
        X = smooth_field_tensor()
    rows = []
    for fmt, tf in (("tucker", 1), ("sttu", t), ("tt", 1), ("stt", t), ("tr", 1), ("str", t)):
        n_iter = {"tucker": 5, "sttu": 5, "tr": 30, "str": 30}.get(fmt, 0)
        start = time.perf_counter()
        Y = decompose(X, fmt, rank=rank, t=tf, n_iter=n_iter)
        seconds = time.perf_counter() - start
        rows.append(DemoRow(fmt, Y.rank, tf, Y.num_params, Y.compression_ratio,
                            relative_error(X, Y), seconds))
    return rows
