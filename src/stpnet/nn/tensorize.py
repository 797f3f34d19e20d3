"""Tensorization of a layer's weight: the channel modes and the layout (:mod:`stpnet.nn.layouts`)
that map a dense weight (C_out, C_in, *kernel) to the factorized tensor and back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layouts import LAYOUTS, Layout, default_layout, layout_named
from .modes import channel_modes, factorize

__all__ = ["factorize", "channel_modes", "Tensorization", "LAYOUTS", "default_layout"]


@dataclass(frozen=True)
class Tensorization:
    """How a weight (C_out, C_in, *kernel) maps to a factorized tensor.

    Attributes
    ----------
    layout : Layout
        The layout object (a registered name such as 'sequential' is accepted and looked up; an
        unknown one raises ValueError listing the valid names). ``str(layout)`` is its name.
    in_modes, out_modes : tuple of int
        Factorizations of C_in and C_out (paired: equal lengths).
    kernel_size : tuple of int
        () for a linear layer.
    """

    layout: Layout
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    kernel_size: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", layout_named(self.layout))

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
        return self.layout.tensor_shape(self)

    def weight_to_tensor(self, W: torch.Tensor) -> torch.Tensor:
        """Dense weight (C_out, C_in, *kernel) -> factorized-tensor layout."""
        return self.layout.weight_to_tensor(self, W)

    def tensor_to_weight(self, X: torch.Tensor) -> torch.Tensor:
        """Factorized-tensor layout -> dense weight (C_out, C_in, *kernel)."""
        return self.layout.tensor_to_weight(self, X)
