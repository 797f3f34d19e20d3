"""Tensor ring (TR), and semi-tensor ring (STR) when t > 1.

STR (Zhao et al. 2021): ``X[i_1, ..., j*t+u] = sum G_1[a, i_1, b_1*t+u] G_2[b_1, i_2, b_2] ... G_N[b_{N-1}, j, a]``
with G_1 (R_0/t, I_1, R_1), G_k (R_{k-1}/t, I_k, R_k/t), G_N (R_{N-1}/t, I_N/t, R_0/t). The format
specification (``docs/formats-spec.md``, section 6) defines it index by index."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._validate import as_int_sequence, check_positive_int
from ..functional.reconstruct import tr_to_tensor
from ._checks import as_core_list, check_rank_multiple, check_shape, check_t_divides
from .chain import CoreTensor

__all__ = ["TRTensor"]


def _ring_ranks(rank: int | Sequence[int], order: int) -> tuple[int, ...]:
    """Ranks R_0..R_{N-1} from an int, N values, or N+1 values with R_N = R_0."""
    seq = as_int_sequence(rank)
    if seq is not None:
        rank = seq
        if len(rank) == order + 1:
            if rank[0] != rank[-1]:
                raise ValueError(
                    f"TR/STR: a rank list of length N+1={order + 1} must end with R_0={rank[0]}, got {rank[-1]}"
                )
            rank = rank[:-1]
        if len(rank) != order:
            raise ValueError(
                f"TR/STR: rank has {len(rank)} entries; a tensor of order {order} needs {order} "
                f"(R_0..R_{order - 1}) or {order + 1} (with R_N = R_0)"
            )
        return tuple(check_positive_int(r, f"rank[{i}]") for i, r in enumerate(rank))
    return (check_positive_int(rank, "rank"),) * order


def split_pair(total: int, cap0: int | None, cap1: int | None) -> tuple[int, int]:
    """The largest product r_0 * r_1 <= total within the caps, split as evenly as possible."""
    for size in range(total, 0, -1):
        pairs = [
            (a, size // a)
            for a in range(1, size + 1)
            if size % a == 0 and (cap0 is None or a <= cap0) and (cap1 is None or size // a <= cap1)
        ]
        if pairs:
            return min(pairs, key=lambda p: (abs(p[0] - p[1]), p[0]))
    return 1, 1


def clip_ring(dims: Sequence[int], caps: Sequence[int]) -> tuple[int, ...]:
    """Largest TR ranks <= caps that TR-SVD can produce for a tensor of shape ``dims``.

    The first unfolding (I_1 x rest) bounds r_0 * r_1 (split as evenly as the caps allow when
    it must be lowered). Later bonds follow TR-SVD: r_k <= min(r_{k-1} I_k, r_0 prod_{j>k} I_j).
    """
    r = list(caps)
    n = len(dims)
    first_cap = min(dims[0], math.prod(dims[1:]))
    if r[0] * r[1] > first_cap:
        r[0], r[1] = split_pair(first_cap, r[0], r[1])
    for k in range(2, n):
        r[k] = min(r[k], r[k - 1] * dims[k - 1], r[0] * math.prod(dims[k:]))
    return tuple(r)


class TRTensor(CoreTensor):
    """A tensor in TR format (``t = 1``) or STR format (``t > 1``).

    ``X[i_1, ..., j*t+u] = sum G_1[a, i_1, b_1*t+u] G_2[b_1, i_2, b_2] ... G_N[b_{N-1}, j, a]``

    Parameters
    ----------
    cores : sequence of torch.Tensor
        ``G_1`` (R_0/t, I_1, R_1); ``G_k`` (R_{k-1}/t, I_k, R_k/t); ``G_N`` (R_{N-1}/t, I_N/t, R_0/t).
    t : int, default 1
        The STP factor; it must divide every rank and the last mode size.
    """

    family = "tr"
    semi_name = "str"
    layouts = ("ring",)
    refinement = "ALS"

    def __init__(self, cores: Sequence[torch.Tensor], t: int = 1):
        super().__init__()
        t = check_positive_int(t, "t")
        cores = as_core_list(cores, "TRTensor")
        if len(cores) < 2:
            raise ValueError(f"TRTensor needs at least 2 cores (a tensor of order >= 2), got {len(cores)}")
        self._set_cores(cores, t)

    def _check_boundaries(self, cores: Sequence[torch.Tensor]) -> None:
        if cores[-1].shape[2] != cores[0].shape[0]:
            raise ValueError(
                f"TRTensor: the last core must close the ring with R_0/t={cores[0].shape[0]}, "
                f"got {cores[-1].shape[2]}"
            )

    @property
    def rank(self) -> tuple[int, ...]:
        """(R_0, R_1, ..., R_{N-1}); R_N = R_0 closes the ring."""
        return tuple(self._t * int(G.shape[0]) for G in self.cores)

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the dense tensor: the trace of the ring of STP-linked cores (differentiable)."""
        return tr_to_tensor(list(self.cores), self._t)


    @classmethod
    def validate_rank(
        cls, shape: Sequence[int], rank: int | Sequence[int], t: int = 1, clip: bool = True
    ) -> tuple[int, ...]:
        """Check ``rank`` for ``shape`` and ``t``; lower it to the largest ranks TR-SVD can give.

        With ``clip=False`` the ranks are only checked, not lowered (larger ranks are valid
        parameterizations, and for TR they can add expressiveness beyond what TR-SVD produces).

        Returns
        -------
        tuple of int
            (R_0, ..., R_{N-1}), multiples of ``t``.
        """
        shape = check_shape(shape, 2, "TR/STR")
        t = check_positive_int(t, "t")
        check_t_divides(t, shape[-1], f"the last mode (mode {len(shape) - 1})")
        ranks = _ring_ranks(rank, len(shape))
        check_rank_multiple(ranks, t)
        if not clip:
            return ranks
        r = clip_ring(cls.classic_shape(shape, t), [R // t for R in ranks])
        return tuple(t * v for v in r)

    @staticmethod
    def param_count(shape: Sequence[int], rank: Sequence[int], t: int = 1) -> int:
        """R_0 I_1 R_1 / t + sum_mid I_k R_{k-1} R_k / t^2 + I_N R_{N-1} R_0 / t^3 (TR: t = 1)."""
        shape, R = tuple(shape), tuple(rank)
        n = R[0] * shape[0] * R[1] // t
        for k in range(1, len(shape) - 1):
            n += shape[k] * R[k] * R[k + 1] // (t * t)
        return n + shape[-1] * R[-1] * R[0] // (t**3)

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
    ) -> "TRTensor":
        """Gaussian cores scaled so that the dense entries have standard deviation ``std``.

        ``clip=False`` keeps ranks above what TR-SVD could produce (see :meth:`validate_rank`).
        """
        shape = check_shape(shape, 2, "TR/STR")
        ranks = cls.validate_rank(shape, rank, t, clip=clip)
        r = [R // t for R in ranks]
        n = len(shape)
        s = (std**2 / math.prod(r)) ** (1.0 / (2 * n))
        sizes = [(r[0], shape[0], ranks[1])]
        sizes += [(r[k], shape[k], r[k + 1]) for k in range(1, n - 1)]
        sizes += [(r[-1], shape[-1] // t, r[0])]
        cores = [torch.randn(sz, dtype=dtype, device=device, generator=generator) * s for sz in sizes]
        return cls(cores, t=t)
