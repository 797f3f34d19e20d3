"""Tucker, and semi-tensor Tucker (STTu) when any t_n > 1.

STTu (Zhao et al. 2021): ``X = G ⋉_1 U_1 ... ⋉_N U_N`` with the full core G (R_1 x ... x R_N) and
U_n (I_n/t_n x R_n/t_n); the semi-tensor mode product applies ``U_n ⊗ I_{t_n}`` without building it:
``Y[..., j*t+u, ...] = sum_p U[j, p] X[..., p*t+u, ...]``. The format specification
(``docs/formats-spec.md``, sections 3 and 4) defines it index by index."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .._validate import expand_per_item
from ..functional.reconstruct import tucker_reconstruction_macs, tucker_to_tensor
from ._random import orthonormal
from ._checks import as_core_list, check_rank_multiple, check_shape, check_t_divides
from .base import FactorizedTensor

__all__ = ["TuckerTensor"]


class TuckerTensor(FactorizedTensor):
    """A tensor in Tucker format (all ``t_n = 1``) or STTu format.

    ``X = G ⋉_1 U_1 ⋉_2 U_2 ... ⋉_N U_N`` with ``G`` of shape (R_1, ..., R_N) and
    ``U_n`` of shape (I_n/t_n, R_n/t_n): each factor acts as ``U_n ⊗ I_{t_n}``.

    Parameters
    ----------
    core : torch.Tensor
        The full core (R_1, ..., R_N).
    factors : sequence of torch.Tensor
        One matrix per mode, (I_n/t_n, R_n/t_n).
    t : int or sequence of int, default 1
        The STP factor of each mode (one int applies to all).
    """

    family = "tucker"
    semi_name = "sttu"
    layouts = ("tucker2",)
    refinement = "HOOI"

    def __init__(self, core: torch.Tensor, factors: Sequence[torch.Tensor], t: int | Sequence[int] = 1):
        super().__init__()
        core, *factors = as_core_list([core, *factors], "TuckerTensor")
        n = core.ndim
        if len(factors) != n:
            raise ValueError(f"TuckerTensor: a core of order {n} needs {n} factors, got {len(factors)}")
        ts = expand_per_item(t, n, "t", f"a Tucker tensor of order {n}")
        for k, U in enumerate(factors):
            if U.ndim != 2:
                raise ValueError(f"TuckerTensor: factor {k} must be a matrix, got shape {tuple(U.shape)}")
            if U.shape[1] * ts[k] != core.shape[k]:
                raise ValueError(
                    f"TuckerTensor: factor {k} has {U.shape[1]} columns; with t={ts[k]} the core's "
                    f"mode {k} must have {U.shape[1] * ts[k]} entries, it has {core.shape[k]}"
                )
        self.core = nn.Parameter(core)
        self.factor_list = nn.ParameterList([nn.Parameter(U) for U in factors])
        self._t = ts

    @property
    def factors(self) -> list[torch.Tensor]:
        """The factor matrices U_1..U_N (the core is :attr:`core`)."""
        return list(self.factor_list)

    @property
    def t(self) -> tuple[int, ...]:
        """The STP factor of each mode."""
        return self._t

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor: each factor's rows times its mode's t."""
        return tuple(int(U.shape[0]) * t for U, t in zip(self.factor_list, self._t))

    @property
    def rank(self) -> tuple[int, ...]:
        """The ranks: the core's shape."""
        return tuple(int(s) for s in self.core.shape)

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the dense tensor: the core times each factor by semi-tensor mode products (differentiable)."""
        return tucker_to_tensor(self.core, list(self.factor_list))

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """Multiply the tensor by ``factor`` in place (through the core)."""
        self.core.mul_(factor)

    @classmethod
    def resolve_t(cls, shape: Sequence[int], t) -> tuple[int, ...]:
        """One t per mode (an int applies to all), each dividing its mode size."""
        return cls.validate_t(shape, t)

    def reconstruction_macs(self) -> int:
        """Multiply-adds :meth:`to_tensor` spends (the cost of rebuilding the dense tensor once)."""
        return tucker_reconstruction_macs(self.core.shape, [U.shape for U in self.factor_list])

    def to_classic(self) -> "TuckerTensor":
        """The same tensor as a classic Tucker, with explicit factors ``U_n ⊗ I_{t_n}``.

        This builds the Kronecker-structured factors (t_n^2 times larger); it is a conversion for
        interoperability, never used on a compute path.
        """
        eyes = [torch.eye(t, dtype=self.dtype, device=self.device) for t in self._t]
        factors = [torch.kron(U.detach(), e) for U, e in zip(self.factor_list, eyes)]
        return TuckerTensor(self.core.detach().clone(), factors, t=1)

    @staticmethod
    def validate_t(shape: Sequence[int], t: int | Sequence[int]) -> tuple[int, ...]:
        """One t per mode, each dividing its mode size."""
        shape = check_shape(shape, 1, "Tucker/STTu")
        ts = expand_per_item(t, len(shape), "t", f"a Tucker tensor of order {len(shape)}")
        for k, (size, tk) in enumerate(zip(shape, ts)):
            check_t_divides(tk, size, f"mode {k}")
        return ts

    @classmethod
    def validate_rank(
        cls, shape: Sequence[int], rank: int | Sequence[int], t: int | Sequence[int] = 1, clip: bool = True
    ) -> tuple[int, ...]:
        """Check ``rank`` and lower each R_n to at most min(I_n, t_n^2 prod_{m != n} I_m).

        Returns
        -------
        tuple of int
            (R_1, ..., R_N), each a multiple of its t_n.
        """
        shape = check_shape(shape, 1, "Tucker/STTu")
        ts = cls.validate_t(shape, t)
        ranks = expand_per_item(rank, len(shape), "rank", f"a Tucker tensor of order {len(shape)}")
        check_rank_multiple(ranks, ts)
        if not clip:
            return ranks
        total = math.prod(shape)
        return tuple(
            min(R, size, tk * tk * (total // size)) for R, size, tk in zip(ranks, shape, ts)
        )

    @staticmethod
    def param_count(shape: Sequence[int], rank: Sequence[int], t: int | Sequence[int] = 1) -> int:
        """prod_n R_n + sum_n I_n R_n / t_n^2 (Tucker: t_n = 1)."""
        ts = (t,) * len(shape) if isinstance(t, int) else tuple(t)
        return math.prod(rank) + sum(I * R // (tk * tk) for I, R, tk in zip(shape, rank, ts))

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        rank: int | Sequence[int],
        t: int | Sequence[int] = 1,
        *,
        std: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        clip: bool = True,
    ) -> "TuckerTensor":
        """A random Tucker/STTu whose dense entries have root-mean-square ``std``.

        The factors have orthonormal columns (so ``||X||_F = ||G||_F``) and the core is Gaussian,
        which makes the entry scale concentrate tightly around ``std``.
        """
        shape = check_shape(shape, 1, "Tucker/STTu")
        ts = cls.validate_t(shape, t)
        ranks = cls.validate_rank(shape, rank, ts, clip=clip)
        s = std * math.sqrt(math.prod(shape) / math.prod(ranks))
        core = torch.randn(ranks, dtype=dtype, device=device, generator=generator) * s
        factors = [
            orthonormal(size // tk, R // tk, dtype=dtype, device=device, generator=generator)
            for size, R, tk in zip(shape, ranks, ts)
        ]
        return cls(core, factors, t=ts)
