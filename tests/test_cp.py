"""CP, the format added through the registry: its reconstruction against the definition, its ALS
against TensorLy's ``parafac``, its rank rules, and the registry's own checks. The CP layers run in
every suite that takes the (format, layout, t) combinations from the registries (conftest.COMBOS)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stpnet
from stpnet.decomposition import mttkrp
from stpnet.formats import FORMATS, CPTensor, format_class
from stpnet.functional.reconstruct import cp_to_tensor, khatri_rao


def _cp_data(shape, rank, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=g, dtype=torch.float64) for s in shape]
    X = cp_to_tensor(factors)
    X = X / X.norm()
    if noise:
        X = X + noise * torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(X.numel())
    return X


def test_reconstruction_is_the_sum_of_rank_one_terms():
    g = torch.Generator().manual_seed(0)
    A, B, C = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 5, 6))
    reference = torch.einsum("ir,jr,kr->ijk", A, B, C)
    assert torch.allclose(cp_to_tensor([A, B, C]), reference, atol=1e-13)
    KR = khatri_rao([A, B])
    for i in range(4):
        for j in range(5):
            assert torch.allclose(KR[i * 5 + j], A[i] * B[j])
    X = CPTensor([A, B, C])
    assert X.shape == (4, 5, 6) and X.rank == (3,) and X.t == 1 and X.format == "cp"
    assert X.num_params == CPTensor.param_count((4, 5, 6), (3,)) == 3 * 15


@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=5), rank=st.integers(1, 4),
       mode=st.integers(0, 4), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_mttkrp_matches_the_unfolding_times_khatri_rao(shape, rank, mode, seed):
    mode = mode % len(shape)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    factors = [torch.randn(s, rank, generator=g, dtype=torch.float64) for s in shape]
    # the textbook form: mode-n unfolding (other modes in order, row-major) times their Khatri-Rao
    unfolding = X.movedim(mode, 0).reshape(shape[mode], -1)
    reference = unfolding @ khatri_rao([A for m, A in enumerate(factors) if m != mode])
    assert torch.allclose(mttkrp(X, factors, mode), reference, atol=1e-10)


def test_gradients_reach_every_factor():
    X = CPTensor.random((4, 3, 5), rank=3, dtype=torch.float64)
    X.to_tensor().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in X.parameters())
    torch.autograd.gradcheck(lambda *f: cp_to_tensor(f), [f.detach().requires_grad_() for f in X.factors])


def test_random_has_the_requested_entry_scale():
    X = CPTensor.random((16, 16, 16), rank=8, std=0.5, generator=torch.Generator().manual_seed(0))
    assert 0.3 < float(X.to_tensor().detach().pow(2).mean().sqrt()) < 0.8


@pytest.mark.parametrize("shape,rank", [((6, 7, 8), 3), ((4, 5, 6, 3), 4)])
def test_an_exact_low_rank_tensor_is_recovered(shape, rank):
    X = _cp_data(shape, rank, seed=1)
    Y = stpnet.decompose(X, "cp", rank=rank, n_iter=500)
    assert stpnet.relative_error(X, Y) < 1e-6
    assert isinstance(Y, CPTensor) and Y.rank == (rank,)


def test_full_rank_is_exact():
    X = torch.randn(4, 3, 5, dtype=torch.float64)
    Y = stpnet.decompose(X, "cp", rank=100)  # lowered to prod / max = 12
    assert Y.rank == (12,) and stpnet.relative_error(X, Y) < 1e-14


def test_tol_alone_picks_the_smallest_rank_on_the_ladder():
    X = _cp_data((6, 7, 8), 3, seed=2, noise=0.01)
    Y = stpnet.decompose(X, "cp", tol=0.05)
    assert stpnet.relative_error(X, Y) <= 0.05 and Y.rank[0] <= 3


def test_budget_rule():
    X = torch.randn(8, 8, 8, dtype=torch.float64)
    Y = stpnet.decompose(X, "cp", max_params=100)
    assert Y.num_params <= 100 and Y.rank == (4,)


@pytest.mark.parametrize("shape,rank,noise,seed", [((6, 7, 8), 3, 0.0, 0), ((6, 7, 8), 3, 0.1, 1),
                                                    ((5, 6, 4, 3), 4, 0.1, 2), ((8, 8, 8), 5, None, 3)])
def test_cp_als_matches_tensorly_parafac(tl_numpy, shape, rank, noise, seed):
    """Same rank, same kind of start (left singular vectors), same sweep budget: stpnet's error is
    no worse than TensorLy's beyond a small margin (ALS is local, so the two can settle apart)."""
    from tensorly.decomposition import parafac

    if noise is None:  # no low-rank structure at all
        X = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        X = _cp_data(shape, rank, seed, noise)
    ours = stpnet.relative_error(X, stpnet.decompose(X, "cp", rank=rank, n_iter=200))
    theirs_cp = parafac(X.numpy(), rank, n_iter_max=200, init="svd", tol=1e-12)
    theirs = float(np.linalg.norm(X.numpy() - tl_numpy.cp_to_tensor(theirs_cp)) / np.linalg.norm(X.numpy()))
    assert ours <= theirs * 1.02 + 1e-7, (ours, theirs)
    if noise == 0.0:
        assert ours < 1e-6 and theirs < 1e-6


def test_cp_has_no_semi_tensor_variant():
    assert FORMATS["cp"] == (CPTensor, False)
    with pytest.raises(ValueError, match="format 'cp' has no semi-tensor variant; t must be 1, got 2"):
        stpnet.decompose(torch.randn(4, 4, 4), "cp", rank=2, t=2)
    with pytest.raises(ValueError, match="format 'cp' has no semi-tensor variant"):
        stpnet.nn.FactorizedLinear(8, 8, format="cp", rank=2, t=2)


def test_rank_rules_raise_clear_errors():
    with pytest.raises(ValueError, match=r"a CP tensor has one rank R, got 2 ranks \(2, 3\)"):
        CPTensor.validate_rank((4, 4, 4), (2, 3))
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        CPTensor.validate_rank((4, 4, 4), 0)
    with pytest.raises(ValueError, match="all factors need the same rank R"):
        CPTensor([torch.randn(3, 2), torch.randn(4, 3)])
    with pytest.raises(ValueError, match="n_iter and n_restarts must be >= 0"):
        stpnet.decompose(torch.randn(4, 4, 4), "cp", rank=2, n_iter=-1)


def test_the_registry_refuses_a_taken_name_and_a_format_without_layouts():
    with pytest.raises(TypeError, match="format name 'tt' is taken by TTTensor"):
        class Clash(CPTensor):
            family = "tt"
    with pytest.raises(TypeError, match="must declare the layer layouts it supports"):
        class NoLayouts(CPTensor):
            family = "cp-without-layouts"
            layouts = ()
    assert "cp-without-layouts" not in FORMATS and format_class("tt")[0] is stpnet.TTTensor


def test_a_model_compresses_trains_fuses_and_decompresses_in_cp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(4, 3, 8, 8)
    small, report = stpnet.compress(model, "cp", compression=3)
    assert report.params < sum(p.numel() for p in model.parameters()) / 2.5
    assert {r.format for r in report.layers if r.format != "dense"} == {"cp"}
    loss = small(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)
    small.eval()
    fused = stpnet.fuse(small)
    assert torch.allclose(fused(x), small(x), atol=1e-5)
    assert torch.allclose(stpnet.decompress(small)(x), small(x), atol=1e-5)


def test_cp_layers_from_trained_weights_approach_the_dense_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    errors = []
    for rank in (4, 32, 256):
        layer = stpnet.nn.FactorizedConv2d.from_dense(conv, "cp", rank=rank)
        errors.append(float(((layer.weight - conv.weight).norm() / conv.weight.norm()).detach()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5
