"""Linear-like layers (a Linear storing its weight transposed, as HuggingFace's Conv1D): recognised by
structure, compressed as Linear layers, the replacement a drop-in; against HF semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stpnet
from stpnet.nn import FactorizedLinear, LinearView, linear_view, register_linear_like
from stpnet.nn.linear_like import LINEAR_LIKE_ADAPTERS, as_linear

pytestmark = pytest.mark.usefixtures("one_thread")


class TransposedLinear(nn.Module):
    """HF ``Conv1D`` semantics, written here: weight (in, out), bias (out,), ``nf`` = out features,
    forward ``x @ weight + bias`` on the last dimension."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


class LooksTransposedButIsNot(TransposedLinear):
    """The same structure, another function: must not be taken for a Linear."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.c_attn = TransposedLinear(3 * d, d)
        self.c_proj = TransposedLinear(d, 3 * d)
        self.c_fc = TransposedLinear(4 * d, d)
        self.mlp_proj = TransposedLinear(d, 4 * d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = x + self.c_proj(torch.tanh(self.c_attn(x)))
        h = h + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(h)))
        return self.head(h)


def test_a_transposed_weight_layer_is_read_as_the_linear_it_computes():
    torch.manual_seed(0)
    layer = TransposedLinear(12, 8)
    view = linear_view(layer)
    assert isinstance(view, LinearView) and (view.in_features, view.out_features) == (8, 12)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(x @ view.weight.T + view.bias, layer(x))
    dense = as_linear(layer)
    assert isinstance(dense, nn.Linear) and torch.allclose(dense(x), layer(x), atol=1e-6)
    assert linear_view(LooksTransposedButIsNot(12, 8)) is None  # the probe sees a different forward
    assert linear_view(nn.Linear(8, 12)) is None and linear_view(nn.Conv1d(8, 12, 1)) is None
    assert stpnet.nn.why_not_factorizable(layer) is None
    assert "no factorized counterpart" in stpnet.nn.why_not_factorizable(LooksTransposedButIsNot(12, 8))


@pytest.mark.parametrize("fmt", ["tt", "stt", "tucker", "sttu"])
def test_from_dense_of_a_transposed_layer_matches_the_dense_computation(fmt):
    torch.manual_seed(0)
    layer = TransposedLinear(16, 24)
    full = FactorizedLinear.from_dense(layer, fmt, rank=64)  # a rank that keeps the weight
    assert (full.in_features, full.out_features) == (24, 16)
    x = torch.randn(4, 24)
    torch.testing.assert_close(full(x), x @ layer.weight + layer.bias, rtol=1e-4, atol=1e-4)
    small = stpnet.nn.from_dense(layer, fmt, rank=2)
    assert isinstance(small, FactorizedLinear)
    torch.testing.assert_close(small(x), x @ small.weight.T + layer.bias)  # bias copied, weight (out, in)


def test_compress_replaces_transposed_layers_by_drop_in_factorized_linears():
    torch.manual_seed(0)
    model = Block().eval()
    small, report = stpnet.compress(model, "stt", compression=2)
    for name in ("c_attn", "c_proj", "c_fc", "mlp_proj"):
        assert isinstance(getattr(small, name), FactorizedLinear), name
    assert isinstance(model.c_attn, TransposedLinear)  # the input is not changed
    assert isinstance(small.head, nn.Linear)  # the classifier kept
    assert report.compression == pytest.approx(2, rel=0.1)
    # drop-in: the model's forward, unchanged, runs on the factorized layers and computes what
    # the rebuilt dense weights compute
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = model.head(_dense_block(model, small, x))
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
    # a partial selection: the unselected transposed layers stay as they were
    partial, rep = stpnet.compress(model, "tt", rank=4, include=["c_fc"])
    assert isinstance(partial.c_fc, FactorizedLinear) and type(partial.c_attn) is TransposedLinear
    assert partial.c_attn is not model.c_attn and torch.equal(partial.c_attn.weight, model.c_attn.weight)
    kinds = {r.name: (r.kind, r.format) for r in rep.layers}
    assert kinds["c_attn"] == ("TransposedLinear", "dense") and kinds["c_fc"][1] == "tt"


def _dense_block(model, small, x):
    """The block with each transposed layer's weight replaced by its factorized layer's rebuilt one."""
    def lin(name, v):
        layer = getattr(small, name)
        return v @ layer.dense_weight().T + layer.bias
    h = x + lin("c_proj", torch.tanh(lin("c_attn", x)))
    return h + lin("mlp_proj", torch.nn.functional.gelu(lin("c_fc", h)))


def test_a_registered_linear_like_type_is_compressed_through_its_adapter():
    class Scaled(nn.Module):  # y = x (2 A)^T: a weight stored at half scale
        def __init__(self):
            super().__init__()
            self.halved = nn.Parameter(torch.randn(6, 10))

        def forward(self, x):
            return x @ (2 * self.halved).T

    model = nn.Sequential(Scaled(), nn.ReLU(), nn.Linear(6, 2))
    assert stpnet.nn.why_not_factorizable(model[0]) is not None
    register_linear_like(Scaled, lambda m: LinearView(10, 6, 2 * m.halved.detach(), None))
    try:
        small, _ = stpnet.compress(model, "tt", rank=64)
        x = torch.randn(3, 10)
        assert isinstance(small[0], FactorizedLinear)
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    finally:
        LINEAR_LIKE_ADAPTERS.pop(Scaled)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_linear_like(int, lambda m: None)


def test_a_tied_transposed_layer_is_kept_as_it_is():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = TransposedLinear(8, 8)
            self.b = TransposedLinear(8, 8)
            self.b.weight = self.a.weight
            self.c = TransposedLinear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.c(self.b(self.a(x))))

    model = Tied()
    with pytest.warns(UserWarning, match=r"\['a', 'b'\] share their weight"):
        small, report = stpnet.compress(model, "tt", rank=2)
    assert type(small.a) is TransposedLinear and small.a.weight is small.b.weight
    assert isinstance(small.c, FactorizedLinear)




@pytest.mark.slow
def test_hf_gpt2_conv1d_compresses_to_4x_generates_and_matches_hf_semantics():
    tf = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8)
    nn.init.normal_(conv.bias)
    view = linear_view(conv)
    x = torch.randn(2, 3, 8)
    assert view is not None and (view.in_features, view.out_features) == (8, 12)
    torch.testing.assert_close(FactorizedLinear.from_dense(conv, "tt", rank=64)(x), conv(x), rtol=1e-4, atol=1e-5)
    config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0,
                           eos_token_id=0)
    model = tf.GPT2LMHeadModel(config).eval()
    with pytest.warns(UserWarning, match="tied"):
        small, report = stpnet.compress(model, "stt", compression=4, keep_classifier=False)
    assert report.compression == pytest.approx(4, rel=0.1)
    assert isinstance(small.transformer.h[0].attn.c_attn, FactorizedLinear)
    assert small.lm_head.weight is small.transformer.wte.weight  # the tie stays
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = small(ids).logits
    assert logits.shape == (2, 10, 128) and bool(torch.isfinite(logits).all())
    out = small.generate(ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
    # at full rank the compressed GPT-2 computes what HF's does
    full, _ = stpnet.compress(model, "tt", rank=4096, keep_classifier=False,
                              exclude=["transformer.wte", "transformer.wpe", "lm_head"])
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-4)


def test_a_frozen_transposed_layer_stays_frozen():
    model = Block()
    model.c_fc.requires_grad_(False)
    small, _ = stpnet.compress(model, "tt", rank=3)
    assert not any(p.requires_grad for p in small.c_fc.parameters())
    assert all(p.requires_grad for p in small.c_attn.parameters())
