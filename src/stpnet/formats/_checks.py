"""Shape, t and rank checks shared by the format classes."""

from __future__ import annotations

from typing import Sequence

import torch

from .._validate import check_positive_int, divisors

__all__ = ["check_shape", "check_t_divides", "check_rank_multiple", "as_core_list"]


def check_shape(shape: Sequence[int], min_order: int, what: str) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of positive ints with at least ``min_order`` modes."""
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}") from None
    if len(shape) < min_order:
        raise ValueError(
            f"{what} needs a tensor of order >= {min_order}, got order {len(shape)} (shape {shape})"
        )
    return tuple(check_positive_int(s, f"shape[{i}]") for i, s in enumerate(shape))


def check_t_divides(t: int, size: int, where: str) -> None:
    """Raise if ``t`` does not divide a mode size."""
    if size % t:
        valid = divisors(size)
        raise ValueError(f"t={t} does not divide {where} (size {size}); valid t for it: {valid}")


def check_rank_multiple(ranks: Sequence[int], t: int | Sequence[int], name: str = "rank") -> None:
    """Raise if any rank is not a multiple of ``t`` (one t for all, or one per rank: per mode)."""
    ts = (t,) * len(ranks) if isinstance(t, int) else tuple(t)
    for i, (r, tk) in enumerate(zip(ranks, ts)):
        if r % tk:
            lo, hi = (r // tk) * tk, (r // tk + 1) * tk
            choices = f"{lo} or {hi}" if lo else f"{hi}"
            raise ValueError(
                f"t={tk} does not divide {'' if isinstance(t, int) else f'the rank of mode {i}, '}{name}[{i}]={r}; "
                "semi-tensor ranks must be multiples of t "
                f"(nearest valid: {choices})"
            )


def as_core_list(cores: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Check a list of factor tensors share dtype and device, and are floating point."""
    cores = list(cores)
    if not cores:
        raise ValueError(f"{what} needs at least one factor")
    for i, c in enumerate(cores):
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"{what}: factor {i} must be a torch.Tensor, got {type(c).__name__}")
        if not c.is_floating_point():
            raise ValueError(f"{what}: factor {i} must be floating point, got {c.dtype}")
        if c.dtype != cores[0].dtype or c.device != cores[0].device:
            raise ValueError(
                f"{what}: factor {i} is {c.dtype} on {c.device}, factor 0 is "
                f"{cores[0].dtype} on {cores[0].device}; all factors must match"
            )
    return cores
