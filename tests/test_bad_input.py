"""Bad and edge-case input to the layers and decompositions: a clear ValueError/TypeError (or
MemoryError) with a message, or a finite result of the right shape; never a crash deep inside."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import stpnet
from stpnet.decomposition import InsufficientMemoryError
from stpnet.nn import FactorizedConv2d, FactorizedLinear
from stpnet.formats import format_class

FORMATS = list(stpnet.FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["rebuild", "contract", "auto"])
def test_an_empty_batch_gives_an_empty_output_as_torch_does(fmt, path):
    conv = FactorizedConv2d(16, 8, 3, stride=2, padding=1, format=fmt, rank=4, forward_path=path)
    lin = FactorizedLinear(16, 8, format=fmt, rank=4, forward_path=path)
    assert conv(torch.randn(0, 16, 9, 9)).shape == nn.Conv2d(16, 8, 3, stride=2, padding=1)(
        torch.randn(0, 16, 9, 9)).shape
    assert lin(torch.randn(0, 16)).shape == (0, 8)
    assert lin(torch.randn(3, 0, 16)).shape == (3, 0, 8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_initialise_in_float32_and_cast(fmt, dtype):
    torch.manual_seed(0)
    layer = FactorizedConv2d(16, 16, 3, padding=1, format=fmt, rank=4, dtype=dtype)
    assert all(p.dtype == dtype for p in layer.parameters())
    w = layer.weight.detach().float()
    assert torch.isfinite(w).all()
    assert float(w.std()) == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.05)  # kaiming, as in float32


def test_a_rank_that_would_exhaust_memory_is_refused_before_allocating():
    with pytest.raises(InsufficientMemoryError, match="needs about .* TiB.*lower the rank"):
        FactorizedConv2d(16, 16, 3, format="tt", rank=10**6)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(FORMATS), c_in=st.integers(1, 24), c_out=st.integers(1, 24),
       rank=st.one_of(st.integers(-2, 12), st.floats(allow_nan=True), st.none(), st.text(max_size=2)),
       t=st.one_of(st.none(), st.integers(-1, 4)), batch=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_linear_construction_either_refuses_clearly_or_computes_finite_outputs(fmt, c_in, c_out, rank, t, batch,
                                                                                dtype):
    plainly_valid = (fmt in ("tucker", "tt", "tr", "cp") and t in (None, 1) and isinstance(rank, int)
                     and not isinstance(rank, bool) and rank >= 1)
    try:
        layer = FactorizedLinear(c_in, c_out, format=fmt, rank=rank, t=t, dtype=dtype)
    except (ValueError, TypeError) as exc:
        assert not plainly_valid, f"a classic format at a positive int rank was refused: {exc}"
        assert len(str(exc)) > 10  # says what is wrong
        return
    y = layer(torch.randn(batch, c_in, dtype=dtype))
    assert y.shape == (batch, c_out) and y.dtype == dtype and torch.isfinite(y).all()


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS), scale=st.sampled_from([0.0, 1e-300, 1e-30, 1.0, 1e18, 1e30]),
       n_iter=st.sampled_from([0, 2]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_decompositions_of_zero_and_extreme_scales(fmt, scale, n_iter, dtype):
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(4, 6, 4, generator=g, dtype=torch.float64) * scale).to(dtype)
    assume(torch.isfinite(X).all())  # 1e30 overflows float32
    t = 2 if fmt in ("sttu", "stt", "str") else None
    if n_iter and format_class(fmt)[0].refinement is None:  # TT/STT: the SVD fit has no refinement
        with pytest.raises(ValueError, match="has no refinement"):
            stpnet.decompose(X, fmt, rank=2, t=t, n_iter=n_iter)
        n_iter = 0
    result = stpnet.decompose(X, fmt, rank=2, t=t, n_iter=n_iter)  # a valid request at any scale
    Y = result.to_tensor()
    assert torch.isfinite(Y).all()
    error = stpnet.relative_error(X, result)
    assert error == error  # never NaN
    if scale == 0.0:
        assert error == 0.0 and float(Y.detach().abs().max()) == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_tol_is_honoured_at_extreme_scales(fmt):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 6, 6, generator=g, dtype=torch.float32)
    t = 2 if fmt in ("sttu", "stt", "str") else None
    for scale in (1e-20, 1.0, 1e18):
        X = base * scale
        result = stpnet.decompose(X, fmt, tol=0.3, t=t)
        assert stpnet.relative_error(X.double(), result) <= 0.3 + 1e-4, (fmt, scale)


@pytest.mark.parametrize("entry", ["layer", "compress", "decompose", "tensorization", "embedding"])
def test_unknown_format_or_layout_raises_at_every_entry_point(entry):
    import stpnet
    from stpnet.nn import FactorizedEmbedding, FactorizedLinear, Tensorization

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    calls = {
        "layer": [lambda: FactorizedLinear(8, 8, format="cp2", rank=2),
                  lambda: FactorizedLinear(8, 8, format="tt", rank=2, layout="ring")],
        "compress": [lambda: stpnet.compress(model, "hosvd", rank=2),
                     lambda: stpnet.compress(model, "tt", rank=2, layout="zigzag")],
        "decompose": [lambda: stpnet.decompose(torch.randn(4, 4, 4), "ht", rank=2)],
        "tensorization": [lambda: Tensorization("zigzag", (2, 4), (2, 4))],
        "embedding": [lambda: FactorizedEmbedding(10, 8, format="tr", rank=2, layout="paired")],
    }[entry]
    for call in calls:
        with pytest.raises(ValueError, match=r"(valid|one of|available)"):
            call()
