"""The identity that turns STT/STR into TT/TR : an STT (STR) with ranks R is exactly the TT (TR)
with ranks R/t of the re-tensorized ``X'[(i_1, u), i_2, ..., j] = X[i_1, ..., i_{N-1}, j*t + u]``,
the first core unpacked as ``G_1[i_1, b*t + u] = H_1[(i_1, u), b]``.

STT_t(X; R) is the TT with ranks R/t of the re-tensorized

    X'[(i_1, u), i_2, ..., i_{N-1}, j] = X[i_1, ..., i_{N-1}, j*t + u],

and the first core unpacks as ``G_1[a, i_1, b*t + u] = H_1[a, (i_1, u), b]``; the same holds for
STR and TR. These functions move between the two sides; all are reshapes and one permutation.
"""

from __future__ import annotations

import torch

__all__ = [
    "copy_index_to_first_mode",
    "copy_index_to_last_mode",
    "first_core_to_classic",
    "first_core_from_classic",
]


def copy_index_to_first_mode(X: torch.Tensor, t: int) -> torch.Tensor:
    """``X`` (I_1, ..., I_N) -> ``X'`` (I_1*t, I_2, ..., I_N/t); ``t`` must divide ``I_N``."""
    if t == 1:
        return X
    shape = X.shape
    Y = X.reshape(*shape[:-1], shape[-1] // t, t).movedim(-1, 1)
    return Y.reshape(shape[0] * t, *shape[1:-1], shape[-1] // t)


def copy_index_to_last_mode(Xp: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`copy_index_to_first_mode`: (I_1*t, ..., J) -> (I_1, ..., J*t)."""
    if t == 1:
        return Xp
    shape = Xp.shape
    Y = Xp.reshape(shape[0] // t, t, *shape[1:]).movedim(1, -1)
    return Y.reshape(shape[0] // t, *shape[1:-1], shape[-1] * t)


def first_core_to_classic(G: torch.Tensor, t: int) -> torch.Tensor:
    """First semi-tensor core (a, I, R) -> classic core (a, I*t, R/t): H[a, (i,u), b] = G[a, i, b*t+u]."""
    if t == 1:
        return G
    a, size, R = G.shape
    return G.reshape(a, size, R // t, t).transpose(-1, -2).reshape(a, size * t, R // t)


def first_core_from_classic(H: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`first_core_to_classic`: (a, I*t, r) -> (a, I, r*t)."""
    if t == 1:
        return H
    a, size_t, r = H.shape
    return H.reshape(a, size_t // t, t, r).transpose(-1, -2).reshape(a, size_t // t, r * t)
