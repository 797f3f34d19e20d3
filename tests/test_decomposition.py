"""Decompositions: exact recovery, error guarantees, rank rules, refinement and ALS reliability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st

import stpnet
from conftest import randn
from stpnet.decomposition import str_svd, tr_als

D = torch.float64
CLASSES = {"tucker": stpnet.TuckerTensor, "sttu": stpnet.TuckerTensor, "tt": stpnet.TTTensor,
           "stt": stpnet.TTTensor, "tr": stpnet.TRTensor, "str": stpnet.TRTensor}


def make(fmt, shape, rank, t, seed):
    gen = torch.Generator().manual_seed(seed)
    return CLASSES[fmt].random(shape, rank, t, dtype=D, generator=gen)


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["sttu", "stt", "str"])
def test_exact_recovery(fmt, t):
    """Random tensors built in each format are recovered below 1e-10 relative error (float64)."""
    name = {"sttu": "tucker", "stt": "tt", "str": "tr"}[fmt] if t == 1 else fmt
    shape, rank = (8, 12, 8, 16), 4 * t if fmt != "sttu" else 4
    if fmt == "sttu":
        rank, shape = 2 * t, (8, 8, 8, 8)
    Y = make(fmt, shape, rank, t, seed=t)
    X = Y.to_tensor().detach()
    n_iter = 100 if fmt == "str" else 0  # TR-SVD is not exact at minimal ranks; ALS is
    Z = stpnet.decompose(X, name, rank=Y.rank, t=t, n_iter=n_iter, tol=1e-13 if n_iter else None)
    assert Z.rank == Y.rank and Z.shape == shape and Z.format == name
    assert stpnet.relative_error(X, Z) < 1e-10


@pytest.mark.parametrize("fmt,t", [("tucker", 1), ("sttu", 2), ("tt", 1), ("stt", 2), ("stt", 4),
                                   ("tr", 1), ("str", 2)])
@pytest.mark.parametrize("tol", [0.05, 0.3, 0.6])
def test_tolerance_guarantee(fmt, t, tol):
    """tol alone picks ranks whose SVD fit is within tol (the TT-SVD / HOSVD / TR-SVD bounds)."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=D) for n in (8, 8, 12, 8)], indexing="ij")
    X = 1.0 / (1.0 + sum(grids)) + 0.01 * randn(8, 8, 12, 8, seed=7)  # smooth plus noise
    Z = stpnet.decompose(X, fmt, tol=tol, t=t)
    err = stpnet.relative_error(X, Z)
    assert err <= tol
    assert all(r % t == 0 for r in Z.rank)
    if tol >= 0.3:
        assert Z.num_params < X.numel()  # it actually truncated


def test_tolerance_zero_is_exact_and_tighter_tol_is_larger():
    X = randn(6, 7, 8, seed=3)
    assert stpnet.relative_error(X, stpnet.decompose(X, "tt", tol=0.0)) < 1e-12
    sizes = [stpnet.decompose(X, "tt", tol=tol).num_params for tol in (0.5, 0.3, 0.1)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@pytest.mark.parametrize("fmt,t", [("tucker", 1), ("sttu", 2), ("tt", 1), ("stt", 2), ("tr", 1), ("str", 2)])
def test_parameter_budget(fmt, t):
    X = randn(16, 16, 16, 16, seed=2)
    for budget in (300, 2000, 8000):
        Z = stpnet.decompose(X, fmt, max_params=budget, t=t)
        assert Z.num_params <= budget
        # maximal: the next uniform rank would not fit (unless every rank is already capped)
        cls = CLASSES[fmt]
        step = t
        bigger = tuple(r + step for r in Z.rank)
        grown = cls.validate_rank(X.shape, max(bigger), t)
        if grown != Z.rank:
            assert cls.param_count(X.shape, grown, t) > budget


def test_budget_error_improves_with_budget():
    X = make("tt", (12, 12, 12, 12), 12, 1, 5).to_tensor().detach() + 0.01 * randn(12, 12, 12, 12)
    errs = [stpnet.relative_error(X, stpnet.decompose(X, "stt", max_params=b)) for b in (500, 2000, 8000)]
    assert errs[0] > errs[1] > errs[2]


def test_ranks_are_upper_bounds():
    X = randn(4, 5, 6)
    Z = stpnet.decompose(X, "tt", rank=100)
    assert Z.rank == (4, 6) and stpnet.relative_error(X, Z) < 1e-12
    Z = stpnet.decompose(X, "stt", rank=100, t=2)
    assert Z.rank == (16, 6) and stpnet.relative_error(X, Z) < 1e-12  # TT of the 8x5x3 re-tensorization
    Z = stpnet.decompose(X, "tucker", rank=[100, 3, 100])
    assert Z.rank == (4, 3, 6)


# ------------------------------------------------------------------ refinement


def test_hooi_does_not_increase_error_and_reports_progress():
    X = randn(10, 12, 14, seed=4)
    seen = []
    base = stpnet.relative_error(X, stpnet.decompose(X, "sttu", rank=4, t=2))
    Z = stpnet.decompose(X, "sttu", rank=4, t=2, n_iter=8, callback=lambda i, e: seen.append(e))
    assert seen and all(b <= a + 1e-12 for a, b in zip(seen, seen[1:]))
    assert stpnet.relative_error(X, Z) == pytest.approx(seen[-1], rel=1e-9)
    assert stpnet.relative_error(X, Z) <= base + 1e-12


@pytest.mark.parametrize("t", [1, 2])
def test_als_recovers_exact_tr_reliably(t):
    """Over many exactly-TR instances, TR-SVD alone is far off and ALS (with restarts) always
    reaches 1e-8. About a fifth of these instances stall without restarts."""
    shape = (6, 7, 8, 6) if t == 1 else (6, 7, 8, 12)
    svd_errors, als_errors = [], []
    for seed in range(24):
        Y = make("str", shape, 3 * t, t, seed=100 + seed)
        X = Y.to_tensor().detach()
        svd_errors.append(stpnet.relative_error(X, str_svd(X, Y.rank, t)))
        Z = tr_als(X, str_svd(X, Y.rank, t), n_iter=100, tol=1e-10,
                   generator=torch.Generator().manual_seed(seed))
        als_errors.append(stpnet.relative_error(X, Z))
    assert np.median(svd_errors) > 0.1
    assert max(als_errors) < 1e-8


def test_als_without_restarts_can_stall():
    """The reason for restarts: some instances stall from the TR-SVD start."""
    stalls = 0
    for seed in range(24):
        Y = make("tr", (6, 7, 8, 6), 3, 1, seed=100 + seed)
        X = Y.to_tensor().detach()
        Z = tr_als(X, str_svd(X, Y.rank, 1), n_iter=100, tol=1e-10, n_restarts=0)
        stalls += stpnet.relative_error(X, Z) > 1e-8
    assert stalls >= 1


# ------------------------------------------------------------- inputs and options


def test_randomized_svd_recovers_low_rank_and_approaches_exact():
    Y = make("tt", (16, 16, 16, 16), 6, 1, 3)
    X = Y.to_tensor().detach()
    Z = stpnet.decompose(X, "tt", rank=6, svd="randomized")
    assert stpnet.relative_error(X, Z) < 1e-10
    N = randn(32, 32, 32, seed=9)
    exact = stpnet.relative_error(N, stpnet.decompose(N, "tt", rank=8))
    approx = stpnet.relative_error(N, stpnet.decompose(N, "tt", rank=8, svd="randomized"))
    assert exact <= approx < exact * 1.05


@pytest.mark.parametrize("fmt", ["sttu", "stt", "str"])
def test_float32_and_numpy_inputs(fmt):
    Y = make(fmt, (8, 8, 8), 4, 2, 0)
    X = Y.to_tensor().detach()
    Z32 = stpnet.decompose(X.float(), fmt, rank=Y.rank, t=2, n_iter=20 if fmt == "str" else 0, tol=1e-6 if fmt == "str" else None)
    assert Z32.dtype == torch.float32
    assert stpnet.relative_error(X.float(), Z32) < 1e-4
    Znp = stpnet.decompose(X.numpy(), fmt, rank=Y.rank, t=2)
    Zt = stpnet.decompose(X, fmt, rank=Y.rank, t=2)
    assert torch.allclose(Znp.to_tensor(), Zt.to_tensor())


def test_semi_tensor_default_t_is_two_and_classic_is_one():
    X = randn(4, 4, 4)
    assert stpnet.decompose(X, "stt", rank=2).t == 2
    assert stpnet.decompose(X, "tt", rank=2).t == 1
    assert stpnet.decompose(X, "sttu", rank=2).t == (2, 2, 2)


@given(fmt=st.sampled_from(list(stpnet.FORMATS)),
       shape=st.lists(st.sampled_from([2, 4, 6, 8]), min_size=2, max_size=4),
       budget=st.integers(10, 3000), clip=st.booleans())
def test_ranks_for_budget_is_the_largest_uniform_rank_that_fits(fmt, shape, budget, clip):
    """The search (gallop, then bisect) against a scan of every uniform rank R = t, 2t, ..."""
    from stpnet.decomposition import ranks_for_budget
    from stpnet.formats import format_class

    cls, semi = format_class(fmt)
    try:
        t = cls.t_for(semi, None, shape)
    except ValueError:
        reject()  # t = 2 does not divide this shape
    step = max(t) if isinstance(t, tuple) else t

    def uniform(R):
        return tuple(max(tk, R // tk * tk) for tk in t) if isinstance(t, tuple) else R

    best = None
    for R in range(step, math.prod(shape) + 1, step):
        rank = cls.validate_rank(shape, uniform(R), t, clip=clip)
        if cls.param_count(shape, rank, t) <= budget:
            best = rank
    if best is None:
        with pytest.raises(ValueError, match="valid budgets are"):
            ranks_for_budget(cls, shape, t, budget, clip=clip)
    else:
        assert ranks_for_budget(cls, shape, t, budget, clip=clip) == best
