"""Up-front memory estimates, so a decomposition refuses instead of exhausting the machine."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

__all__ = ["InsufficientMemoryError", "available_memory", "svd_bytes", "chain_svd_bytes", "check_memory"]


class InsufficientMemoryError(MemoryError):
    """Raised before a computation whose estimated peak memory exceeds what is available."""


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now, or None where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def svd_bytes(m: int, n: int, itemsize: int, rank: int | None = None, randomized: bool = False) -> int:
    """Peak bytes of one thin SVD of an m x n matrix, its input copy included.

    Exact: the copy LAPACK works on (m n), U (m k), Vh (k n) and O(k^2) workspace, k = min(m, n).
    Randomized: the sketch and its projections, (m + n) (rank + 10) and (rank + 10)^2.
    """
    k = min(m, n)
    if randomized and rank is not None:
        s = min(rank + 10, k)
        return itemsize * (m * n + 2 * (m + n) * s + 4 * s * s)
    return itemsize * (2 * m * n + k * (m + n) + 5 * k * k)


def format_bytes(nbytes: float) -> str:
    """Human-readable size with a unit that suits it (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def chain_svd_bytes(classic_shape: Sequence[int], itemsize: int, cap: int | None, randomized: bool) -> int:
    """Peak bytes of a TT/TR chain SVD of a tensor whose re-tensorized (classic) shape is
    ``classic_shape``: the tensor, a working copy and its first unfolding's SVD (``cap``: that
    unfolding's rank, or None)."""
    numel = math.prod(classic_shape)
    return 2 * numel * itemsize + svd_bytes(classic_shape[0], numel // classic_shape[0], itemsize, cap, randomized)


def check_memory(nbytes: int, device: torch.device, max_memory: int | None, what: str,
                 advice: str = "lower the rank, use svd='randomized', or decompose a smaller tensorization") -> None:
    """Raise InsufficientMemoryError if ``nbytes`` exceeds ``max_memory`` or what ``device`` has free."""
    limit = max_memory if max_memory is not None else available_memory(device)
    if limit is not None and nbytes > limit:
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(nbytes)} but only {format_bytes(limit)} is "
            f"available on {device}; {advice}"
        )
