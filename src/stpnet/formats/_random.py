"""Random factor matrices for initialisation."""

from __future__ import annotations

import torch

__all__ = ["orthonormal"]


def orthonormal(rows: int, cols: int, *, dtype=None, device=None, generator=None) -> torch.Tensor:
    """A random matrix with orthonormal columns (rows >= cols) or orthonormal rows (rows < cols)."""
    if rows >= cols:
        G = torch.randn(rows, cols, dtype=dtype, device=device, generator=generator)
        return torch.linalg.qr(G).Q.contiguous()
    G = torch.randn(cols, rows, dtype=dtype, device=device, generator=generator)
    return torch.linalg.qr(G).Q.mT.contiguous()
