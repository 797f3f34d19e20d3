"""Fused transformers: the encoder layer's fast path reads each checked weight once and computes what
PyTorch's layer computes, in every case; a Linear's fused 'dense' form stands for its rebuilt dense
op when forms are measured; a small embedding table gathers in inference with the layer's errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import stpnet
from stpnet.deploy.fused import FusedLayer, fuse
from stpnet.nn import FactorizedEmbedding, FactorizedLinear
from stpnet.nn._cache import InferenceCache
from stpnet.nn.attention import UnpackedMultiheadAttention, WeightsOnceEncoderLayer

pytestmark = pytest.mark.usefixtures("one_thread")


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, **kwargs):
        return self.encoder(x, **kwargs)


def _compressed() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = stpnet.compress(_Encoder().eval(), "stt", compression=2)
    return small.eval()


def _fused(form: str = "dense") -> nn.Module:
    """The compressed encoder fused, every fused layer in ``form``."""
    fused = fuse(_compressed())
    for m in fused.modules():
        if isinstance(m, FusedLayer):
            m.form = form
    return fused


def _stock(model: nn.Module) -> nn.Module:
    """A copy whose encoder layers are PyTorch's own class again."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is WeightsOnceEncoderLayer:
            m.__class__ = nn.TransformerEncoderLayer
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    kernel = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or kernel(*a))
    return calls


def test_fuse_gives_encoder_layers_that_read_each_weight_once(kernel_calls, monkeypatch):
    model = _compressed()
    fused = fuse(model)
    for m in fused.modules():
        if isinstance(m, FusedLayer):
            m.form = "dense"
    layers = [m for m in fused.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert len(layers) == 2 and all(type(m) is WeightsOnceEncoderLayer for m in layers)
    assert all(isinstance(m.self_attn, UnpackedMultiheadAttention) for m in layers)
    assert all(type(m) is nn.TransformerEncoderLayer for m in model.modules()
               if isinstance(m, nn.TransformerEncoderLayer))  # the model fused from is left alone
    cached = sum(isinstance(m, InferenceCache) for m in fused.modules())
    assert cached >= 6  # most of the 2 x 4 projections are compressed
    x = torch.randn(3, 5, 16)
    checks = []
    valid = InferenceCache._cache_valid
    monkeypatch.setattr(InferenceCache, "_cache_valid", lambda self, key: checks.append(1) or valid(self, key))
    with torch.no_grad():
        fused(x)
        checks.clear(), kernel_calls.clear()
        out = fused(x)
        assert len(kernel_calls) == 2  # the fused kernel ran in both layers
        assert len(checks) == cached  # each compressed projection's weight, checked once
        stock_checks = len(checks)
        reference = _stock(fused)(x)
        assert len(checks) - stock_checks == 2 * cached  # PyTorch's layer reads each twice
    assert torch.equal(out, reference)  # the same kernel on the same weights
    with torch.enable_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["training", "grad", "padding-mask", "causal-mask", "hook", "fastpath-off",
                                  "unbatched"])
def test_every_other_call_is_pytorchs_own_layer(case, kernel_calls):
    fused = _fused("dense")
    stock = _stock(fused)
    x = torch.randn(3, 5, 16)
    kwargs = {}
    hooked = []
    if case == "training":
        fused.train(), stock.train()
    if case == "padding-mask":
        kwargs["src_key_padding_mask"] = torch.tensor([[False] * 4 + [True]] * 3)
    if case == "causal-mask":
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(5)
    if case == "hook":
        for model in (fused, stock):
            model.encoder.layers[0].linear1.register_forward_hook(lambda *a: hooked.append(1))
    if case == "unbatched":
        x = x[0]
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(case != "fastpath-off")
        with torch.set_grad_enabled(case in ("training", "grad")):
            out = fused(x, **kwargs)
            fused_kernels = len(kernel_calls)
            reference = stock(x, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert fused_kernels == len(kernel_calls) - fused_kernels  # the fused kernel exactly where PyTorch takes it
    if case == "hook":
        assert len(hooked) == 2 and fused_kernels == 1  # the hooked layer ran its modules, in both models


@pytest.mark.parametrize("form", ["chain", "plain"])
def test_projections_in_other_forms_run_the_modules(form, kernel_calls):
    """The kernel would run every projection on its dense weight: where fuse chose another form
    for them, the layer runs its modules (PyTorch's layer with the fast path off)."""
    fused = _fused(form)
    x = torch.randn(3, 5, 16)
    previous = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        out = fused(x)
        assert not kernel_calls
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            reference = _stock(fused)(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)
    assert torch.equal(out, reference)
    with torch.enable_grad():
        torch.testing.assert_close(out, fused(x), rtol=1e-5, atol=1e-6)


def test_the_encoder_fast_path_sees_a_data_edit_of_a_factor():
    fused = _fused("dense")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fused(x)
        before = fused(x)
        layer = next(m for m in fused.modules() if isinstance(m, FusedLayer))
        next(p for n, p in layer.named_parameters() if n != "bias").data.mul_(-2.0)
        after = fused(x)
    with torch.enable_grad():
        fresh = fused(x).detach()
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-6)


def test_a_linear_is_fused_in_the_dense_form_when_it_is_fastest(monkeypatch):
    """For a Linear the fused 'dense' form is the rebuilt dense op: it is always a candidate, and
    the layer is fused (not kept factorized) in it when it is timed fastest; the chain otherwise."""
    import stpnet.deploy.fused as fused_module

    torch.manual_seed(1)
    model = nn.Sequential(FactorizedLinear(24, 32, format="stt", rank=4), nn.ReLU(),
                          FactorizedLinear(32, 8, format="tt", rank=3)).eval()
    x = torch.randn(4, 24)
    tables = iter([{("chain", None): 2.0, ("plain", None): 1.5, ("dense", None): 1.0},
                   {("chain", None): 1.0, ("plain", None): 1.5, ("dense", None): 2.0}])

    def fake_times(runs, device, rounds=3, repeats=2):
        for run in runs.values():
            run()
        table = next(tables)
        assert set(runs) == set(table)  # every form, and no separate 'rebuild' run
        return {k: table[k] for k in runs}

    monkeypatch.setattr(fused_module, "interleaved_best_times", fake_times)
    monkeypatch.setattr(fused_module, "_model_time", lambda m, inp: 1.0)
    fused = fuse(model, example=x)
    assert isinstance(fused[0], FusedLayer) and fused[0].form == "dense"
    assert isinstance(fused[2], FusedLayer) and fused[2].form == "chain"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


def test_an_attention_block_measured_faster_on_dense_weights_runs_them_all(monkeypatch):
    import stpnet.deploy.fused as fused_module

    model = _compressed()
    x = torch.randn(2, 5, 16)
    monkeypatch.setattr(fused_module, "interleaved_best_times",
                        lambda runs, device: {k: (0.5 if k == ("chain", None) else 1.0) for k in runs})
    monkeypatch.setattr(fused_module, "_model_time",
                        lambda m, inp: 1.0 if all(layer.form == "dense" for layer in m.modules()
                                                  if isinstance(layer, FusedLayer)) else 2.0)
    fused = fuse(model, example=x)
    layers = [m for m in fused.modules() if isinstance(m, FusedLayer)]
    assert len(layers) >= 6 and all(m.form == "dense" for m in layers)
    assert all(type(m) is WeightsOnceEncoderLayer for m in fused.encoder.layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_small_embedding_gathers_in_inference_with_the_layers_errors():
    torch.manual_seed(2)
    emb = FactorizedEmbedding(10, 8, format="tt", rank=2, padding_idx=3).eval()
    idx = torch.tensor([[0, 3, 9], [9, 1, 3]])
    with torch.enable_grad():
        expected = emb(idx).detach()  # the lookup path
    with torch.no_grad():
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            torch.testing.assert_close(emb(idx.to(dtype)), expected, rtol=1e-5, atol=1e-6)
        assert torch.all(emb(idx)[idx == 3] == 0)
        with pytest.raises(IndexError, match=r"must lie in \[0, 10\), got values from 0 to 10"):
            emb(torch.tensor([0, 10]))
        with pytest.raises(IndexError, match=r"must lie in \[0, 10\), got values from -1"):
            emb(torch.tensor([-1, 2]))
