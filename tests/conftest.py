"""Shared test helpers: Kronecker-definition references and seeded random tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None)
settings.load_profile("default")


def kron_stp(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Left STP by its definition (A ⊗ I_{l/n}) (B ⊗ I_{l/p}), built with explicit Kronecker products."""
    n, p = A.shape[-1], B.shape[-2]
    l = math.lcm(n, p)
    eye = lambda k: torch.eye(k, dtype=A.dtype)  # noqa: E731
    return torch.kron(A, eye(l // n)) @ torch.kron(B, eye(l // p))


def kron_rstp(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Right STP by its definition (I_{l/n} ⊗ A) (I_{l/p} ⊗ B)."""
    n, p = A.shape[-1], B.shape[-2]
    l = math.lcm(n, p)
    eye = lambda k: torch.eye(k, dtype=A.dtype)  # noqa: E731
    return torch.kron(eye(l // n), A) @ torch.kron(eye(l // p), B)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny shapes: OpenMP wake-up latency (tens of ms per
    parallel region on small CI machines) would otherwise dominate."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tl_numpy():
    """TensorLy on its numpy backend (skipped without tensorly); the previous (global) backend is
    restored afterwards."""
    tl = pytest.importorskip("tensorly")
    previous = tl.get_backend()
    tl.set_backend("numpy")
    try:
        yield tl
    finally:
        tl.set_backend(previous)
