"""The interface every factorized tensor shares."""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import nn

__all__ = ["FactorizedTensor"]


class FactorizedTensor(nn.Module, metaclass=ABCMeta):
    """A tensor held as factors (nn.Parameters) of one decomposition family.

    Subclasses hold one family each (Tucker, TT, TR); ``t = 1`` is the classic format and
    ``t > 1`` its semi-tensor variant, in the same class. The abstract methods are enforced: a
    subclass that misses one cannot be instantiated.

    Attributes
    ----------
    family : str
        The classic format name ('tucker', 'tt' or 'tr').
    semi_name : str
        The semi-tensor format name ('sttu', 'stt' or 'str').
    """

    family: ClassVar[str]
    semi_name: ClassVar[str]

    @classmethod
    @abstractmethod
    def validate_rank(cls, shape: Sequence[int], rank, t=1, clip: bool = True) -> tuple[int, ...]:
        """Check ``rank`` for a tensor of ``shape`` (ValueError saying what is valid) and return the
        full rank tuple; with ``clip``, lowered to what the shape can use."""

    @staticmethod
    @abstractmethod
    def param_count(shape: Sequence[int], rank: Sequence[int], t=1) -> int:
        """Parameters of the format for ``shape`` at ``rank`` (validated ranks)."""

    @classmethod
    @abstractmethod
    def random(cls, shape: Sequence[int], rank, t=1, *, std: float = 1.0, dtype=None, device=None,
               generator=None, clip: bool = True) -> "FactorizedTensor":
        """A random tensor of the format whose dense entries have root-mean-square ``std``."""

    @abstractmethod
    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the dense tensor (differentiable with respect to the factors)."""

    @abstractmethod
    def reconstruction_macs(self) -> int:
        """Multiply-adds :meth:`to_tensor` spends (the cost of rebuilding the dense tensor once)."""

    @property
    @abstractmethod
    def factors(self) -> list[torch.Tensor]:
        """The factor tensors (their sizes are given in each format's class docstring)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor."""

    @property
    @abstractmethod
    def rank(self) -> tuple[int, ...]:
        """The ranks, as a tuple of ints (multiples of ``t`` for the semi-tensor formats)."""

    @property
    @abstractmethod
    def t(self):
        """The STP factor (an int, or one int per mode for Tucker)."""

    @property
    def is_semi_tensor(self) -> bool:
        """True when any STP factor is above 1."""
        t = self.t
        return any(v > 1 for v in t) if isinstance(t, tuple) else t > 1

    @property
    def format(self) -> str:
        """Format name: ``family`` when ``t == 1``, otherwise ``semi_name``."""
        return self.semi_name if self.is_semi_tensor else self.family

    @property
    def num_params(self) -> int:
        """Number of scalar parameters held by the factors."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_numel(self) -> int:
        """Number of entries of the dense tensor."""
        return math.prod(self.shape)

    @property
    def compression_ratio(self) -> float:
        """Dense entries divided by parameters (above 1 means smaller than dense)."""
        return self.dense_numel / self.num_params

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    def forward(self) -> torch.Tensor:
        return self.to_tensor()

    def extra_repr(self) -> str:
        return f"format={self.format!r}, shape={self.shape}, rank={self.rank}, t={self.t}"
