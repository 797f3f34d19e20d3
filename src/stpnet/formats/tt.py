"""Tensor train (TT), and semi-tensor train (STT) when t > 1.

STT (Zhao et al. 2021): ``X[i_1, ..., i_{N-1}, j*t+u] = sum_b G_1[i_1, b_1*t+u] G_2[b_1, i_2, b_2] ...
G_N[b_{N-1}, j]`` with G_1 (I_1, R_1), G_k (R_{k-1}/t, I_k, R_k/t), G_N (R_{N-1}/t, I_N/t): the copy index u
is created by the first link, carried through every core and emitted in the last mode. The format
specification (``docs/formats-spec.md``, section 5) defines it index by index."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._validate import as_int_sequence, check_positive_int
from ..functional.reconstruct import tt_to_tensor
from ..functional.retensorize import first_core_from_classic
from ._random import orthonormal
from ._checks import as_core_list, check_rank_multiple, check_shape, check_t_divides
from .chain import CoreTensor

__all__ = ["TTTensor"]


def _bond_ranks(rank: int | Sequence[int], order: int, what: str) -> tuple[int, ...]:
    """Ranks R_1..R_{N-1} from an int, N-1 values, or N+1 values with unit boundaries."""
    seq = as_int_sequence(rank)
    if seq is not None:
        rank = seq
        if len(rank) == order + 1:
            if rank[0] != 1 or rank[-1] != 1:
                raise ValueError(
                    f"{what}: a rank list of length N+1={order + 1} must start and end with 1, got {rank}"
                )
            rank = rank[1:-1]
        if len(rank) != order - 1:
            raise ValueError(
                f"{what}: rank has {len(rank)} entries; a tensor of order {order} needs {order - 1} "
                f"(R_1..R_{order - 1}) or {order + 1} (with boundary ones)"
            )
        return tuple(check_positive_int(r, f"rank[{i}]") for i, r in enumerate(rank))
    return (check_positive_int(rank, "rank"),) * (order - 1)


def _clip_chain(dims: Sequence[int], caps: Sequence[int]) -> tuple[int, ...]:
    """Largest TT ranks <= caps that a tensor of shape ``dims`` can have."""
    r = list(caps)
    prev = 1
    for k in range(len(r)):
        r[k] = min(r[k], prev * dims[k])
        prev = r[k]
    nxt = 1
    for k in reversed(range(len(r))):
        r[k] = min(r[k], nxt * dims[k + 1])
        nxt = r[k]
    return tuple(r)


class TTTensor(CoreTensor):
    """A tensor in TT format (``t = 1``) or STT format (``t > 1``).

    ``X[i_1, ..., i_{N-1}, j*t+u] = sum_b G_1[i_1, b_1*t+u] G_2[b_1, i_2, b_2] ... G_N[b_{N-1}, j]``

    Parameters
    ----------
    cores : sequence of torch.Tensor
        ``G_1`` of shape (1, I_1, R_1) or (I_1, R_1); ``G_k`` of shape (R_{k-1}/t, I_k, R_k/t);
        ``G_N`` of shape (R_{N-1}/t, I_N/t, 1) or (R_{N-1}/t, I_N/t). They become Parameters
        (3-way, with the singleton boundary dimensions).
    t : int, default 1
        The STP factor. ``t`` must divide every rank and the last mode size.

    Examples
    --------
    >>> import stpnet
    >>> X = stpnet.TTTensor.random((8, 6, 10), rank=4, t=2)
    >>> X.shape, X.rank, X.num_params
    ((8, 6, 10), (4, 4), 66)
    """

    family = "tt"
    semi_name = "stt"
    layouts = ("sequential", "paired")

    def __init__(self, cores: Sequence[torch.Tensor], t: int = 1):
        super().__init__()
        t = check_positive_int(t, "t")
        cores = as_core_list(cores, "TTTensor")
        if len(cores) < 2:
            raise ValueError(f"TTTensor needs at least 2 cores (a tensor of order >= 2), got {len(cores)}")
        if cores[0].ndim == 2:
            cores[0] = cores[0].unsqueeze(0)
        if cores[-1].ndim == 2:
            cores[-1] = cores[-1].unsqueeze(-1)
        self._set_cores(cores, t)

    def _check_boundaries(self, cores: Sequence[torch.Tensor]) -> None:
        if cores[0].shape[0] != 1 or cores[-1].shape[2] != 1:
            raise ValueError(
                "TTTensor: the first core must have shape (1, I_1, R_1) and the last (R/t, I_N/t, 1); "
                f"got {tuple(cores[0].shape)} and {tuple(cores[-1].shape)}"
            )

    @property
    def rank(self) -> tuple[int, ...]:
        """(R_1, ..., R_{N-1})."""
        return tuple(self._t * int(G.shape[0]) for G in list(self.cores)[1:])

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the dense tensor from the STP-linked chain of cores (differentiable)."""
        return tt_to_tensor(list(self.cores), self._t)

    # ----------------------------------------------------------- rank algebra
    @classmethod
    def validate_rank(
        cls, shape: Sequence[int], rank: int | Sequence[int], t: int = 1, clip: bool = True
    ) -> tuple[int, ...]:
        """Check ``rank`` for ``shape`` and ``t``; lower it to the largest valid ranks.

        With ``clip=False`` the ranks are only checked, not lowered (larger ranks are valid
        parameterizations, and for TR they can add expressiveness beyond what TR-SVD produces).

        Returns
        -------
        tuple of int
            (R_1, ..., R_{N-1}), multiples of ``t``, no larger than the data allows.

        Raises
        ------
        ValueError
            For a wrong order, a rank below 1, a wrong number of ranks, or a ``t`` that does not
            divide a rank or the last mode size.
        """
        shape = check_shape(shape, 2, "TT/STT")
        t = check_positive_int(t, "t")
        check_t_divides(t, shape[-1], f"the last mode (mode {len(shape) - 1})")
        ranks = _bond_ranks(rank, len(shape), "TT/STT")
        check_rank_multiple(ranks, t)
        if not clip:
            return ranks
        r = _clip_chain(cls.classic_shape(shape, t), [R // t for R in ranks])
        return tuple(t * v for v in r)

    @staticmethod
    def param_count(shape: Sequence[int], rank: Sequence[int], t: int = 1) -> int:
        """I_1 R_1 + sum_{k=2}^{N-1} I_k R_{k-1} R_k / t^2 + I_N R_{N-1} / t^2 (TT: without the t^2)."""
        shape, R = tuple(shape), tuple(rank)
        n = shape[0] * R[0]
        for k in range(1, len(shape) - 1):
            n += shape[k] * R[k - 1] * R[k] // (t * t)
        return n + shape[-1] * R[-1] // (t * t)

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
    ) -> "TTTensor":
        """A random TT/STT whose dense entries have root-mean-square ``std``.

        The cores of the classic form are left-orthonormal (QR of Gaussian matrices) and the last
        core is Gaussian, so ``||X||_F`` equals the last core's norm and the entry scale
        concentrates tightly around ``std`` (useful as a variance-preserving initialisation).
        With ``clip=False`` ranks above what the shape can use are kept (as in the layer
        literature's nominal ranks); the scale is then approximate.
        """
        shape = check_shape(shape, 2, "TT/STT")
        ranks = cls.validate_rank(shape, rank, t, clip=clip)
        dims = cls.classic_shape(shape, t)
        r = (1, *[R // t for R in ranks], 1)
        cores = []
        for k in range(len(dims) - 1):
            Q = orthonormal(r[k] * dims[k], r[k + 1], dtype=dtype, device=device, generator=generator)
            cores.append(Q.reshape(r[k], dims[k], r[k + 1]))
        s = std * math.sqrt(math.prod(shape) / (r[-2] * dims[-1]))
        cores.append(torch.randn(r[-2], dims[-1], 1, dtype=dtype, device=device, generator=generator) * s)
        cores[0] = first_core_from_classic(cores[0], t)
        return cls(cores, t=t)
