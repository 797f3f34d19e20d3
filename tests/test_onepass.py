"""The native one-pass kernel (stpnet.deploy.native) against three float64 convolutions, and the fused
layers' 'onepass' form against the dense layer."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

import stpnet
from stpnet.models import build_model
from stpnet.deploy.native import OnepassConv2d, build, onepass_available
from stpnet.deploy.fused import FusedLayer, fuse_layer
from stpnet.nn import FactorizedConv2d

needs_kernel = pytest.mark.skipif(not onepass_available(), reason="the native kernel does not build here")


def _reference(x, W_in, W_mid, W_out, stride, padding, bias):
    """The chain as three float64 library convolutions."""
    d = torch.float64
    y = F.conv2d(x.to(d), W_in.to(d).reshape(*W_in.shape[:2], 1, 1))
    y = F.conv2d(y, W_mid.to(d), stride=stride, padding=padding)
    return F.conv2d(y, W_out.to(d).reshape(*W_out.shape[:2], 1, 1), None if bias is None else bias.to(d))


def _sparse(shape, density, generator):
    """Random weights with whole (out, in) blocks zeroed (the structural zeros the kernel skips)."""
    W = torch.randn(shape, generator=generator)
    keep = torch.rand(shape[:2], generator=generator) < density
    return W * keep.reshape(*shape[:2], *([1] * (len(shape) - 2)))


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5), c_in=st.integers(1, 12), m1=st.integers(1, 9), m2=st.integers(1, 9),
       c_out=st.integers(1, 12), h=st.integers(1, 19), w=st.sampled_from([1, 3, 7, 8, 9, 16, 17, 24, 32]),
       kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 2), pw=st.integers(0, 2), with_bias=st.booleans(), density=st.sampled_from([1.0, 0.5, 0.0]),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_onepass_matches_three_convolutions(n, c_in, m1, m2, c_out, h, w, kh, kw, sh, sw, ph, pw, with_bias,
                                            density, threads, seed):
    """Every shape, stride, padding and sparsity (vector and scalar paths, threads over images and
    over channels of one image) against float64 library convolutions."""
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw)  # the kernel fits the padded image
    g = torch.Generator().manual_seed(seed)
    W_in, W_mid, W_out = (_sparse(s, density, g) for s in ((m1, c_in), (m2, m1, kh, kw), (c_out, m2)))
    bias = torch.randn(c_out, generator=g) if with_bias else None
    x = torch.randn(n, c_in, h, w, generator=g)
    op = OnepassConv2d(W_in, W_mid, W_out, (sh, sw), (ph, pw), bias)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = op(x)
    finally:
        torch.set_num_threads(previous)
    expected = _reference(x, W_in, W_mid, W_out, (sh, sw), (ph, pw), bias)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # float32 rounding is bounded by the same chain on absolute values
    bound = _reference(x.abs(), W_in.abs(), W_mid.abs(), W_out.abs(), (sh, sw), (ph, pw),
                       None if bias is None else bias.abs())
    assert bool(((got.double() - expected).abs() <= 1e-5 * bound + 1e-30).all())


@needs_kernel
@pytest.mark.parametrize("h,w,k,stride,padding", [
    (32, 32, 3, 1, 1), (32, 32, 3, 2, 1), (16, 16, 3, 2, 1), (8, 8, 3, 1, 1), (3, 8, 3, 1, 1), (17, 16, 1, 2, 0),
    (33, 33, 5, 2, 2), (32, 32, 5, 1, 2), (9, 24, 3, 1, 1), (5, 40, 3, 2, 1), (12, 64, 3, 3, 1)])
def test_onepass_vector_paths(h, w, k, stride, padding):
    """Shapes whose output rows are whole vectors of 8 (the vectorised stages and the stride-2 lane
    shuffle; full tiles of 8 vectors and remainders; outputs alone, in pairs and in threes), with
    structural zeros, at 1 and 2 threads."""
    g = torch.Generator().manual_seed(h * w + k)
    W_in, W_mid, W_out = (_sparse(s, 0.6, g) for s in ((6, 16), (6, 6, k, k), (16, 6)))
    W_mid[:5] = torch.randn(5, 6, k, k, generator=g)  # outputs 0-2 and 3-4 read the same inputs: a triple, a pair
    W_mid[5, 0] = 0  # and output 5 others: alone
    bias = torch.randn(16, generator=g)
    op = OnepassConv2d(W_in, W_mid, W_out, (stride, stride), (padding, padding), bias)
    previous = torch.get_num_threads()
    for n, threads in ((3, 2), (1, 2), (2, 1)):
        x = torch.randn(n, 16, h, w, generator=g)
        torch.set_num_threads(threads)
        try:
            got = op(x)
        finally:
            torch.set_num_threads(previous)
        expected = _reference(x, W_in, W_mid, W_out, stride, padding, bias)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_onepass_takes_4d_kernels_and_any_memory_format():
    torch.manual_seed(0)
    W_in, W_mid, W_out = torch.randn(6, 16, 1, 1), torch.randn(6, 6, 3, 3), torch.randn(16, 6, 1, 1)
    op = OnepassConv2d(W_in, W_mid, W_out, (1, 1), (1, 1))
    x = torch.randn(3, 16, 32, 32)
    expected = _reference(x, W_in.flatten(1), W_mid, W_out.flatten(1), 1, 1, None).float()
    torch.testing.assert_close(op(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(op(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(op(x[:, :, :, :32:1].transpose(2, 3).transpose(2, 3)), expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_onepass_rejects_bad_input_clearly():
    W_in, W_mid, W_out = torch.randn(4, 8), torch.randn(5, 4, 3, 3), torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"expected W_in \(m1, C_in\), W_mid \(m2, m1, kh, kw\)"):
        OnepassConv2d(W_in, torch.randn(5, 3, 3, 3), W_out, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="expected 1x1 weights W_in and W_out"):
        OnepassConv2d(torch.randn(4, 8, 3, 3), W_mid, W_out, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="stride"):
        OnepassConv2d(W_in, W_mid, W_out, (0, 1), (1, 1))
    with pytest.raises(ValueError, match=r"bias of shape \(6,\)"):
        OnepassConv2d(W_in, W_mid, W_out, (1, 1), (1, 1), torch.randn(5))
    op = OnepassConv2d(W_in, W_mid, W_out, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"float32 CPU tensor \(N, 8, H, W\)"):
        op(torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match="float32"):
        op(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        op(torch.randn(1, 8, 2, 5))


def test_the_kernel_builds_where_a_compiler_is_found():
    """Where a C compiler is on the PATH and native kernels are on (CI, this project's machines),
    the kernel must build: otherwise every test above would skip and a broken kernel go unseen."""
    if not build.native_enabled() or build.c_compiler() is None:
        pytest.skip("no C compiler, or STPNET_NATIVE=0")
    assert onepass_available(), "the onepass kernel did not build (see the warning logged by stpnet.deploy.native.build)"


def test_native_kernels_can_be_turned_off_and_a_missing_compiler_is_reported(monkeypatch, tmp_path, caplog):
    """STPNET_NATIVE=0 or no compiler: no library, the fused layers do not offer 'onepass', and
    OnepassConv2d says why it cannot be made."""
    monkeypatch.setenv("STPNET_CACHE_DIR", str(tmp_path))
    try:
        build.load_library.cache_clear()
        monkeypatch.setenv("STPNET_NATIVE", "0")
        assert build.load_library("onepass") is None and not onepass_available()
        layer = fuse_layer(FactorizedConv2d(8, 8, 3, 1, 1, format="stt", rank=2, t=2))
        assert "onepass" not in layer.forms and "plain" in layer.forms
        with pytest.raises(RuntimeError, match="STPNET_NATIVE=0"):
            OnepassConv2d(torch.randn(2, 8), torch.randn(2, 2, 3, 3), torch.randn(8, 2), (1, 1), (1, 1))
        build.load_library.cache_clear()
        monkeypatch.setenv("STPNET_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        with caplog.at_level(logging.INFO, logger="stpnet.deploy.native.build"):
            assert build.load_library("onepass") is None
            assert build.load_library("onepass") is None  # said once per process
        assert [r.levelname for r in caplog.records] == ["INFO"]  # a machine without a compiler is not a fault
        assert "no C compiler" in caplog.text and "'plain' form" in caplog.text
        assert not list(tmp_path.iterdir())  # nothing half-built left behind
    finally:
        monkeypatch.undo()
        build.load_library.cache_clear()


@needs_kernel
def test_a_failed_build_is_reported_and_leaves_nothing(monkeypatch, tmp_path, caplog):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("STPNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    try:
        build.load_library.cache_clear()
        with caplog.at_level(logging.WARNING, logger="stpnet.deploy.native.build"):
            assert build.load_library("onepass") is None
        assert "could not build" in caplog.text and "broken compiler" in caplog.text
        assert not list((tmp_path / "cache" / "native").iterdir())
    finally:
        monkeypatch.undo()
        build.load_library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("fmt,t", [("stt", 2), ("tt", None), ("str", 2), ("tr", None), ("sttu", 2), ("tucker", None),
                                   ("cp", None)])
@pytest.mark.parametrize("stride", [1, 2])
def test_onepass_form_computes_the_layer(fmt, t, stride):
    """The 'onepass' form equals the dense layer (with a folded BatchNorm scale and a bias),
    remembers its plan for repeated calls, follows parameter changes, and runs the plain form where
    it cannot apply (gradients, float64, channels_last)."""
    torch.manual_seed(3)
    layer = FactorizedConv2d(16, 12, 3, stride, 1, format=fmt, rank=4, t=t)
    fused = fuse_layer(layer).eval()
    fused.output_scale = torch.rand(12) + 0.5
    assert "onepass" in fused.forms
    x = torch.randn(3, 16, 16, 16)
    with torch.no_grad():
        fused.form = "chain"
        expected = fused(x)
        fused.form = "onepass"
        for _ in range(2):  # the second call runs the remembered plan
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
        assert fused.__dict__["_plan"][2] == ("onepass", False)
        torch.testing.assert_close(fused(x[:1]), expected[:1], rtol=1e-4, atol=1e-4)  # one image: threads share it
        torch.testing.assert_close(fused(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4,
                                   atol=1e-4)
        fused.A.mul_(-1) if hasattr(fused, "A") else next(fused.parameters()).mul_(-1)  # in place: plan dropped
        changed = fused(x)
        fused.form = "chain"
        torch.testing.assert_close(changed, fused(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(changed, expected, atol=1e-3)
    fused.form = "onepass"
    y = fused(x)  # gradients on: the plain form, differentiable
    y.square().sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fused.double()(x.double()), y.detach().double(), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.slow
def test_fuse_with_an_example_may_choose_onepass_and_keeps_the_function():
    """A compressed ResNet-20 fused for batch 1 and batch 8 (real timings): whatever the forms,
    the same outputs as the factorized network."""
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=10).eval()
    small, _ = stpnet.compress(dense, "stt", compression=9, t=2)
    small.eval()
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        fused = stpnet.fuse(small, example=x)
        forms = {m.form for m in fused.modules() if isinstance(m, FusedLayer)}
        assert forms
        with torch.no_grad():
            torch.testing.assert_close(fused(x), small(x), rtol=1e-3, atol=1e-4)
