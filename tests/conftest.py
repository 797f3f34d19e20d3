"""Shared test helpers: the (format, layout, t) combinations from the registries, Kronecker-definition
references, seeded random tensors, and the hypothesis profiles.

Hypothesis profiles (chosen with ``HYPOTHESIS_PROFILE``, else ``default``): ``default`` draws new
examples each run; ``ci`` draws the same examples every run (``derandomize``), so a CI failure
reproduces and a pass is not luck of the draw. Tests that set their own ``max_examples`` keep it
under both.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import settings

from stpnet import FORMATS
from stpnet.nn import LAYOUTS

settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def format_layout_combos() -> list[tuple[str, str, int]]:
    """Every (format name, layout name, t) a factorized layer can be built with, read from the
    registries: each registered format name with each layout its class supports, t = 2 for a
    semi-tensor name and t = 1 for a classic one. A new format or layout is tested everywhere this
    list is used without touching the tests."""
    return [(name, LAYOUTS[layout].name, 2 if semi else 1)
            for name, (cls, semi) in FORMATS.items() for layout in cls.layouts]


def combo_id(combo: tuple[str, str, int]) -> str:
    """The test id of a combination: ``format-layout`` (t follows from the format name)."""
    return f"{combo[0]}-{combo[1]}"


#: Every (format, layout, t) combination (see :func:`format_layout_combos`) and their test ids.
COMBOS = format_layout_combos()
COMBO_IDS = [combo_id(c) for c in COMBOS]


@pytest.fixture(params=COMBOS, ids=COMBO_IDS)
def combo(request) -> tuple[str, str, int]:
    """One (format, layout, t) combination; a test that takes ``combo`` runs for every one."""
    return request.param


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
