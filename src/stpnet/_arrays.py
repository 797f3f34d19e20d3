"""Conversion between NumPy arrays and torch tensors at the public API boundary.

Library functions accept either; they compute in torch and hand back the kind they were given.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["as_tensor", "ArrayLike", "returns_like"]

ArrayLike = Any  # torch.Tensor or numpy.ndarray (kept loose for type checkers of both)


def as_tensor(x: ArrayLike, name: str = "input") -> tuple[torch.Tensor, bool]:
    """Return ``(tensor, was_numpy)`` for a torch tensor or NumPy array.

    Raises
    ------
    TypeError
        If ``x`` is neither a torch tensor nor a NumPy array.
    """
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    raise TypeError(
        f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
    )


def to_numpy_if(x: torch.Tensor, was_numpy: bool) -> ArrayLike:
    """Return ``x`` as a NumPy array when the caller gave NumPy input."""
    if was_numpy:
        return x.detach().cpu().numpy()
    return x


def returns_like(fn: Callable[..., torch.Tensor], *arrays: ArrayLike, **kwargs: Any) -> ArrayLike:
    """Call ``fn`` on torch versions of ``arrays`` and return NumPy if any input was NumPy.

    Inputs that are NumPy are converted to the dtype of a torch input when mixed.
    """
    tensors = []
    any_numpy = False
    for i, a in enumerate(arrays):
        t, was_np = as_tensor(a, name=f"argument {i}")
        tensors.append(t)
        any_numpy |= was_np
    return to_numpy_if(fn(*tensors, **kwargs), any_numpy)
