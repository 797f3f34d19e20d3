"""Rank rules: ranks for a parameter budget (given ranks and tolerances are handled by the formats
and the SVD fits)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from ..formats.base import FactorizedTensor

__all__ = ["ranks_for_budget"]


def _uniform(shape: Sequence[int], R: int, t: int | tuple[int, ...]) -> int | tuple[int, ...]:
    if isinstance(t, tuple):  # Tucker: one t per mode, round R down to each mode's multiple
        return tuple(max(tk, (R // tk) * tk) for tk in t)
    return R


def ranks_for_budget(
    cls: type[FactorizedTensor],
    shape: Sequence[int],
    t: int | tuple[int, ...],
    max_params: int,
    rank_of: Callable[[int], int | tuple[int, ...]] | None = None,
    clip: bool = True,
) -> tuple[int, ...]:
    """The largest uniform rank whose (capped) ranks fit in ``max_params`` parameters.

    Every bond (or mode) gets the same rank R, a multiple of t, lowered where the data allows less;
    R grows until the count would exceed the budget or no rank can grow further. ``rank_of(R)``
    may map R to a rank specification instead (for example to keep some modes at full rank).
    ``clip=False`` does not lower ranks to what the data allows (for layers trained from scratch).

    Raises
    ------
    ValueError
        If even the smallest ranks (all equal to t) need more than ``max_params`` parameters.
    """
    step = math.lcm(*t) if isinstance(t, tuple) else t
    if rank_of is None:
        rank_of = lambda R: _uniform(shape, R, t)  # noqa: E731

    def fits(k: int) -> tuple[int, ...] | None:
        """The validated ranks for R = k * step if they fit the budget, else None."""
        rank = cls.validate_rank(shape, rank_of(k * step), t, clip=clip)
        return rank if cls.param_count(shape, rank, t) <= max_params else None

    best = fits(1)
    if best is None:
        smallest = cls.validate_rank(shape, rank_of(step), t)
        need = cls.param_count(shape, smallest, t)
        raise ValueError(
            f"max_params={max_params} is below the smallest {cls.__name__} of shape {tuple(shape)} "
            f"with t={t} (ranks {smallest}: {need} parameters); valid budgets are >= {need}"
        )
    # the parameter count never falls as R grows: gallop to a bracket, then bisect it
    limit = max(1, math.prod(shape) // step)  # no rank of any format exceeds the tensor's size
    lo, hi = 1, 2
    while hi <= limit and fits(hi) is not None:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid) is not None:
            lo = mid
        else:
            hi = mid
    return fits(lo)
