"""What TT/STT and TR/STR share: 3-way cores linked in a chain (TT) or ring (TR), the STP
factor ``t`` carried by the first core's trailing rank, and the exact conversion to the classic
format of the re-tensorized tensor ``X'[(i_1, u), ..., j] = X[i_1, ..., j*t + u]`` (the format
specification, ``docs/formats-spec.md``, sections 5 and 6)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._validate import check_positive_int
from ..functional.reconstruct import chain_reconstruction_macs
from ..functional.retensorize import first_core_from_classic, first_core_to_classic
from ._checks import check_t_divides
from .base import FactorizedTensor

__all__ = ["CoreTensor"]


class CoreTensor(FactorizedTensor):
    """Base of :class:`TTTensor` and :class:`TRTensor`; subclasses check their boundary cores."""

    def _set_cores(self, cores: Sequence[torch.Tensor], t: int) -> None:
        """Check the cores (3-way, the subclass's boundaries, the links), then hold them as Parameters."""
        name = type(self).__name__
        for k, G in enumerate(cores):
            if G.ndim != 3:
                raise ValueError(f"{name}: core {k} must be 3-way (r_in, I, r_out), got shape {tuple(G.shape)}")
        self._check_boundaries(cores)
        if cores[0].shape[2] != t * cores[1].shape[0]:
            raise ValueError(
                f"{name}: first core has R_1={cores[0].shape[2]}, so core 1 needs R_1/t="
                f"{cores[0].shape[2] / t:g} rows (t={t}), got {cores[1].shape[0]}"
            )
        for k in range(1, len(cores) - 1):
            if cores[k].shape[2] != cores[k + 1].shape[0]:
                raise ValueError(
                    f"{name}: core {k} ends in rank {cores[k].shape[2]} but core {k + 1} starts "
                    f"with {cores[k + 1].shape[0]}"
                )
        self.cores = nn.ParameterList([nn.Parameter(G) for G in cores])
        self._t = t

    def _check_boundaries(self, cores: Sequence[torch.Tensor]) -> None:
        """Raise ValueError if the first and last cores do not close the chain or ring."""
        raise NotImplementedError

    @property
    def factors(self) -> list[torch.Tensor]:
        """The cores, in chain order."""
        return list(self.cores)

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """Multiply the tensor by ``factor`` in place (through the last core)."""
        self.cores[-1].mul_(factor)

    def reconstruction_macs(self) -> int:
        """Multiply-adds :meth:`to_tensor` spends (the cost of rebuilding the dense tensor once)."""
        return chain_reconstruction_macs([G.shape for G in self.cores], self._t)

    @property
    def t(self) -> int:
        """The STP factor linking consecutive cores."""
        return self._t

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor."""
        dims = [int(G.shape[1]) for G in self.cores]
        dims[-1] *= self._t
        return tuple(dims)

    @staticmethod
    def classic_shape(shape: Sequence[int], t: int) -> tuple[int, ...]:
        """Shape of the re-tensorized tensor: (I_1*t, I_2, ..., I_N/t)."""
        shape = tuple(shape)
        return (shape[0] * t, *shape[1:-1], shape[-1] // t)

    def to_classic(self):
        """The exact classic format (t = 1) with ranks R/t of the re-tensorized tensor.

        Its shape is (I_1*t, I_2, ..., I_{N-1}, I_N/t) and its entries are
        ``X'[(i_1, u), ..., j] = X[i_1, ..., j*t + u]``.
        """
        cores = [G.detach().clone() for G in self.cores]
        cores[0] = first_core_to_classic(cores[0], self._t)
        return type(self)(cores, t=1)

    @classmethod
    def from_classic(cls, classic: "CoreTensor", t: int):
        """The semi-tensor format with factor ``t`` whose classic form is ``classic``.

        The inverse of :meth:`to_classic`: ``classic`` must have t = 1 and a first mode size that
        is a multiple of ``t``; the result has shape (I_1/t, ..., I_N*t) and ranks t times larger.
        """
        t = check_positive_int(t, "t")
        if classic.t != 1:
            raise ValueError(f"from_classic expects a classic format (t = 1), got t={classic.t}")
        check_t_divides(t, classic.shape[0], "the first mode of the classic tensor")
        cores = [G.detach().clone() for G in classic.cores]
        cores[0] = first_core_from_classic(cores[0], t)
        return cls(cores, t=t)
