"""Argument checks shared by the public API. Each raises ValueError naming the valid values."""

from __future__ import annotations

import operator
from typing import Sequence

import numpy as np
import torch

__all__ = ["as_int_sequence", "check_positive_int", "check_finite_tensor", "expand_per_item", "divisors"]


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        v = operator.index(value)  # accepts numpy integers, refuses floats
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def as_int_sequence(value: object) -> tuple | None:
    """``value`` as a tuple if it is a list, tuple, 1-D NumPy array or 1-D tensor; else None."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        return tuple(v.item() for v in value)
    return None


def expand_per_item(value: int | Sequence[int], count: int, name: str, what: str) -> tuple[int, ...]:
    """Broadcast an int to ``count`` positive ints, or check a sequence has ``count`` of them."""
    seq = as_int_sequence(value)
    if seq is not None:
        value = seq
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries, but {what} needs {count}")
        return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    return (check_positive_int(value, name),) * count


def check_finite_tensor(X: torch.Tensor, name: str = "tensor") -> None:
    """Raise ValueError if ``X`` is empty, not floating point, or holds NaN or Inf."""
    if X.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)}); every mode needs size >= 1")
    if not X.is_floating_point():
        raise ValueError(
            f"{name} must be floating point (float32 or float64), got {X.dtype}; "
            "convert it with .float() or .double()"
        )
    if not bool(torch.isfinite(X).all()):
        n_nan = int(torch.isnan(X).sum())
        n_inf = int(torch.isinf(X).sum())
        raise ValueError(f"{name} holds {n_nan} NaN and {n_inf} Inf values; all entries must be finite")
