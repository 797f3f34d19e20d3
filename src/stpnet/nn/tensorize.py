"""Tensorization of layer weights: channel counts factored into modes, and the layouts of
that map a dense weight to the factorized tensor and back: ``sequential`` [I_1..I_d, (K,) O_1..O_e],
``ring`` the same modes closed into a ring, ``paired`` [(K,) I_1 O_1, ..., I_d O_d] (the TT-matrix
of Novikov et al. 2015 and Garipov et al. 2016), ``tucker2`` (C_out, C_in, K)."""

from __future__ import annotations

import math
from dataclasses import dataclass


import torch

__all__ = ["factorize", "channel_modes", "Tensorization", "LAYOUTS", "default_layout"]

#: Layout names per format family.
LAYOUTS = {"tt": ("sequential", "paired"), "tr": ("ring",), "tucker": ("tucker2",)}


def default_layout(family: str) -> str:
    """The default layout of a family: 'sequential' (TT), 'ring' (TR), 'tucker2' (Tucker)."""
    return LAYOUTS[family][0]


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize(n: int, n_modes: int = 3) -> tuple[int, ...]:
    """Split ``n`` into at most ``n_modes`` factors, as balanced as possible, largest first.

    Primes are assigned largest first to the currently smallest factor. A prime (or 1) stays a
    single mode, so 3 -> (3,), 16 -> (4, 2, 2), 64 -> (4, 4, 4), 256 -> (8, 8, 4).
    """
    if n < 1:
        raise ValueError(f"cannot factorize {n}: channel counts must be >= 1")
    primes = sorted(_prime_factors(n), reverse=True)
    bins = [1] * min(n_modes, max(len(primes), 1))
    for p in primes:
        i = min(range(len(bins)), key=lambda j: bins[j])
        bins[i] *= p
    return tuple(sorted(bins, reverse=True))


def channel_modes(n: int, n_modes: int = 3, t: int = 1, last_divisible: bool = False) -> tuple[int, ...]:
    """:func:`factorize`, with a mode divisible by ``t`` moved last when ``last_divisible``.

    Raises
    ------
    ValueError
        If ``last_divisible`` and no factorization has a mode divisible by ``t`` (``t`` must then
        divide ``n`` itself).
    """
    modes = list(factorize(n, n_modes))
    if last_divisible and t > 1:
        if n % t:
            raise ValueError(
                f"t={t} must divide the output channel count {n} (the copy index of a semi-tensor "
                f"format is emitted in the last output mode); valid t: "
                f"{[d for d in range(1, n + 1) if n % d == 0]}"
            )
        ok = [i for i, m in enumerate(modes) if m % t == 0]
        if ok:
            i = min(ok, key=lambda j: (modes[j], -j))  # the smallest such mode goes last
            modes.append(modes.pop(i))
        else:  # balance n/t over the other modes and make t itself the last mode
            modes = [m for m in factorize(n // t, max(n_modes - 1, 1)) if m > 1] + [t]
    return tuple(modes)


@dataclass(frozen=True)
class Tensorization:
    """How a weight (C_out, C_in, *kernel) maps to a factorized tensor.

    Attributes
    ----------
    layout : {'sequential', 'paired', 'ring', 'tucker2'}
    in_modes, out_modes : tuple of int
        Factorizations of C_in and C_out (paired: equal lengths).
    kernel_size : tuple of int
        () for a linear layer.
    """

    layout: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    kernel_size: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        valid = sorted({name for names in LAYOUTS.values() for name in names})
        if self.layout not in valid:
            raise ValueError(f"unknown layout {self.layout!r}; valid layouts: {', '.join(valid)}")

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def has_kernel(self) -> bool:
        return len(self.kernel_size) > 0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """Shape of the factorized tensor."""
        k = (self.kernel_numel,) if self.has_kernel else ()
        if self.layout in ("sequential", "ring"):
            return (*self.in_modes, *k, *self.out_modes)
        if self.layout == "paired":
            return (*k, *(i * o for i, o in zip(self.in_modes, self.out_modes)))
        return (self.out_features, self.in_features, *k)  # tucker2

    def weight_to_tensor(self, W: torch.Tensor) -> torch.Tensor:
        """Dense weight (C_out, C_in, *kernel) -> factorized-tensor layout."""
        Wk = W.reshape(self.out_features, self.in_features, -1)
        d, e = len(self.in_modes), len(self.out_modes)
        if self.layout in ("sequential", "ring"):
            X = Wk.permute(1, 2, 0) if self.has_kernel else Wk[..., 0].T
            return X.reshape(self.tensor_shape)
        if self.layout == "paired":
            X = Wk.reshape(*self.out_modes, *self.in_modes, -1)
            # (O_1..O_d, I_1..I_d, K) -> (K, I_1, O_1, ..., I_d, O_d)
            order = [2 * d] if self.has_kernel else []
            for k in range(d):
                order += [e + k, k]
            X = X.permute(*order) if self.has_kernel else X[..., 0].permute(*order)
            return X.reshape(self.tensor_shape)
        return Wk.reshape(self.tensor_shape)

    def tensor_to_weight(self, X: torch.Tensor) -> torch.Tensor:
        """Factorized-tensor layout -> dense weight (C_out, C_in, *kernel)."""
        d = len(self.in_modes)
        K = self.kernel_numel
        if self.layout in ("sequential", "ring"):
            X = X.reshape(self.in_features, K, self.out_features)
            return X.permute(2, 0, 1).reshape(self.weight_shape)
        if self.layout == "paired":
            pairs = [m for io in zip(self.in_modes, self.out_modes) for m in io]
            X = X.reshape(K, *pairs)
            # (K, I_1, O_1, ..., I_d, O_d) -> (O_1..O_d, I_1..I_d, K)
            order = [2 + 2 * k for k in range(d)] + [1 + 2 * k for k in range(d)] + [0]
            return X.permute(*order).reshape(self.weight_shape)
        return X.reshape(self.weight_shape)
