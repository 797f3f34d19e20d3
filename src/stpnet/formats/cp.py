"""CP (canonical polyadic, CANDECOMP/PARAFAC): a sum of R rank-one tensors.

``X[i_1, ..., i_N] = sum_r A_1[i_1, r] A_2[i_2, r] ... A_N[i_N, r]`` with factor matrices A_n of
shape (I_n, R) (Hitchcock 1927; Kolda & Bader 2009). The classic format only: CP has no
semi-tensor variant here (``t = 1``). Scaling weights are absorbed into the factors. See the
format specification (``docs/formats-spec.md``, section 7).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .._validate import as_int_sequence, check_positive_int
from ..functional.reconstruct import cp_reconstruction_macs, cp_to_tensor
from ._checks import as_core_list, check_shape
from .base import FactorizedTensor

__all__ = ["CPTensor"]


class CPTensor(FactorizedTensor):
    """A tensor in CP format: ``X = sum_r a_1r ∘ a_2r ∘ ... ∘ a_Nr``.

    Parameters
    ----------
    factors : sequence of torch.Tensor
        One matrix per mode, (I_n, R), all with the same R.

    Examples
    --------
    >>> import stpnet
    >>> X = stpnet.CPTensor.random((8, 6, 10), rank=5)
    >>> X.shape, X.rank, X.num_params
    ((8, 6, 10), (5,), 120)
    """

    family = "cp"
    semi_name = None
    layouts = ("cp",)
    refinement = "ALS"  # from an SVD start; n_iter = 0 runs decomposition.cp.default_sweeps

    def __init__(self, factors: Sequence[torch.Tensor], t: int = 1):
        super().__init__()
        self.resolve_t((), t)
        factors = as_core_list(factors, "CPTensor")
        if len(factors) < 2:
            raise ValueError(f"CPTensor needs at least 2 factors (a tensor of order >= 2), got {len(factors)}")
        for k, A in enumerate(factors):
            if A.ndim != 2:
                raise ValueError(f"CPTensor: factor {k} must be a matrix (I_{k}, R), got shape {tuple(A.shape)}")
            if A.shape[1] != factors[0].shape[1]:
                raise ValueError(f"CPTensor: factor {k} has {A.shape[1]} columns, factor 0 has {factors[0].shape[1]}; "
                                 "all factors need the same rank R")
        self.factor_list = nn.ParameterList([nn.Parameter(A) for A in factors])

    @property
    def factors(self) -> list[torch.Tensor]:
        """The factor matrices A_1..A_N, each (I_n, R)."""
        return list(self.factor_list)

    @property
    def t(self) -> int:
        """The STP factor: always 1 (CP has no semi-tensor variant)."""
        return 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor."""
        return tuple(int(A.shape[0]) for A in self.factor_list)

    @property
    def rank(self) -> tuple[int]:
        """(R,)."""
        return (int(self.factor_list[0].shape[1]),)

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the dense tensor, the weighted sum of the rank-one terms (differentiable)."""
        return cp_to_tensor(list(self.factor_list))

    def reconstruction_macs(self) -> int:
        """Multiply-adds :meth:`to_tensor` spends (the cost of rebuilding the dense tensor once)."""
        return cp_reconstruction_macs(self.shape, self.rank[0])

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """Multiply the tensor by ``factor`` in place (through the last factor matrix)."""
        self.factor_list[-1].mul_(factor)

    @classmethod
    def validate_rank(cls, shape: Sequence[int], rank: int | Sequence[int], t: int = 1,
                      clip: bool = True) -> tuple[int]:
        """Check ``rank`` (one positive int, or a sequence of one) and, with ``clip``, lower it to
        ``prod(shape) / max(shape)``, a rank at which every tensor of ``shape`` is exact.

        Returns
        -------
        tuple of int
            (R,).
        """
        shape = check_shape(shape, 2, "CP")
        cls.resolve_t(shape, t)
        seq = as_int_sequence(rank)
        if seq is not None:
            if len(seq) != 1:
                raise ValueError(f"a CP tensor has one rank R, got {len(seq)} ranks {tuple(seq)}")
            rank = seq[0]
        R = check_positive_int(rank, "rank")
        if clip:
            R = min(R, math.prod(shape) // max(shape))
        return (R,)

    @staticmethod
    def param_count(shape: Sequence[int], rank: Sequence[int], t: int = 1) -> int:
        """R * sum_n I_n."""
        return int(rank[0]) * sum(int(s) for s in shape)

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        rank: int | Sequence[int],
        t: int = 1,
        *,
        std: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        clip: bool = True,
    ) -> "CPTensor":
        """A random CP tensor whose dense entries have root-mean-square ``std`` in expectation:
        Gaussian factors with variance ``(std^2 / R)^(1/N)``."""
        shape = check_shape(shape, 2, "CP")
        (R,) = cls.validate_rank(shape, rank, t, clip=clip)
        s = (std * std / R) ** (0.5 / len(shape))
        factors = [torch.randn(size, R, dtype=dtype, device=device, generator=generator) * s for size in shape]
        return cls(factors)
