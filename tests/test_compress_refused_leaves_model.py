"""A compression that is refused leaves an ``inplace=True`` model exactly as it was: its
attentions are not left unpacked, its linear-like layers not left rewritten as ``nn.Linear``,
and no layer is left factorized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stpnet
from test_linear_like_probe import TransposedLinear


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = TransposedLinear(32, 16)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.relu(self.mid(torch.relu(self.proj(h)))))


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype, kwargs, match", [
    (torch.float32, {"rank": {"mid": 4, "nope": 4}}, "does not have"),
    (torch.float32, {"rank": 4, "include": ["nothing*"]}, "no eligible layer"),
    (torch.float32, {"compression": 1e6}, "unreachable"),
    (torch.bfloat16, {"rank": 4}, "float32 or float64"),  # refused once the layers are chosen
])
def test_a_refused_inplace_compression_leaves_the_model_as_it_was(dtype, kwargs, match):
    torch.manual_seed(0)
    model = Mixed().eval().to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    with torch.no_grad():
        before = model(x)
    modules, state = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        stpnet.compress(model, "tt", inplace=True, **kwargs)
    after_modules, after_state = _snapshot(model)
    assert after_modules == modules
    assert list(after_state) == list(state) and all(torch.equal(state[k], after_state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_an_accepted_inplace_compression_still_changes_the_model():
    torch.manual_seed(0)
    model = Mixed().eval()
    small, report = stpnet.compress(model, "tt", rank=4, inplace=True)
    assert small is model
    assert isinstance(model.proj, stpnet.nn.FactorizedLinear) and isinstance(model.mid, stpnet.nn.FactorizedLinear)
    assert isinstance(model.attn, stpnet.nn.UnpackedMultiheadAttention)


def test_a_decomposition_failing_midway_puts_the_layers_already_factorized_back(monkeypatch):
    torch.manual_seed(0)
    model = Mixed().eval()
    modules, state = _snapshot(model)
    original = stpnet.nn.FactorizedLinear.from_dense.__func__
    calls = []

    def failing_second(cls, dense, *args, **kwargs):
        calls.append(dense)
        if len(calls) == 2:
            raise MemoryError("out of memory in the second decomposition")
        return original(cls, dense, *args, **kwargs)

    monkeypatch.setattr(stpnet.nn.FactorizedLinear, "from_dense", classmethod(failing_second))
    with pytest.raises(MemoryError, match="second decomposition"):
        stpnet.compress(model, "tt", rank=4, inplace=True)
    assert len(calls) == 2
    after_modules, after_state = _snapshot(model)
    assert after_modules == modules
    assert all(torch.equal(state[k], after_state[k]) for k in state)
