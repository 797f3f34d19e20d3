"""A fused model records each layer's chosen form: ``fuse(model, forms=...)`` and loading its state
dict rebuild the same structure, whatever the timings of a later ``fuse(example=...)`` choose."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import stpnet.deploy.fused as fused_module
from stpnet.deploy.fused import FusedLayer, fuse, fused_forms
from stpnet.nn import FactorizedConv2d, FactorizedLayer
from stpnet.deploy.native import onepass_available

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(FactorizedConv2d(8, 16, 3, 1, 1, format="str", rank=8),
                         FactorizedConv2d(16, 16, 3, 1, 1, format="stt", rank=4), nn.ReLU(),
                         FactorizedConv2d(16, 16, 3, 1, 1, format="tr", rank=4)).eval()


def _fuse_with_timings(monkeypatch, model, x, tables):
    """``fuse(model, example=x)`` with the per-layer timings given (as in test_fuse)."""
    tables = iter(tables)

    def fake_times(runs, device, rounds=3, repeats=2):
        values = next(tables)
        return dict(zip(runs, values))

    with monkeypatch.context() as patch:
        patch.setattr(fused_module, "interleaved_best_times", fake_times)
        patch.setattr(fused_module, "_model_time", lambda m, x: 2.0 if all(
            layer.form == "dense" for layer in m.modules() if isinstance(layer, FusedLayer)) else 1.0)
        return fuse(model, example=x)


def _tables(first_rebuilds: bool):
    onepass = [4.0] if onepass_available() else []
    rebuild = 1.0 if first_rebuilds else 9.0
    return [[2.0, 3.0, 2.5, 2.2, 1.5, 1.5, 1.5, 1.5, *onepass, rebuild],
            [3.0, 1.0, 2.0, 1.1, 2.0, 2.0, 2.0, 2.0, *onepass, 2.0],
            [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.5, 3.0, *onepass, 2.0]]


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_fused_state_dict_loads_into_the_structure_its_forms_rebuild(monkeypatch):
    model = _model()
    x = torch.randn(2, 8, 8, 8)
    saved = _fuse_with_timings(monkeypatch, model, x, _tables(first_rebuilds=True))
    assert isinstance(saved[0], FactorizedLayer) and saved[0].forward_path == "rebuild"
    assert saved[1].form_spec == "chain:fold" and saved[3].form == "merged_out"
    state = _round_trip(saved.state_dict())
    # another fuse of the same model, other timings: another structure, other keys (the trap)
    other = _fuse_with_timings(monkeypatch, model, x, _tables(first_rebuilds=False))
    assert isinstance(other[0], FusedLayer)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        other.load_state_dict(state)
    assert fused_forms(state) == fused_forms(saved) == {"0": "rebuild", "1": "chain:fold", "3": "merged_out"}
    for source in (state, fused_forms(state)):
        rebuilt = fuse(model, forms=source)
        rebuilt.load_state_dict(state)
        assert fused_forms(rebuilt) == fused_forms(saved)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), saved(x))


def test_loading_a_fused_state_dict_sets_the_recorded_forms():
    model = _model()
    saved = fuse(model)
    saved[1].set_form_spec("chain:stacked")
    saved[3].set_form_spec("merged_in")
    target = fuse(model)  # every layer in the chain form
    target.load_state_dict(_round_trip(saved.state_dict()))
    assert target[1].form_spec == "chain:stacked" and target[3].form == "merged_in"


def test_forms_are_checked():
    model = _model()
    x = torch.randn(1, 8, 8, 8)
    with pytest.raises(ValueError, match="not both"):
        fuse(model, example=x, forms={"0": "chain"})
    with pytest.raises(ValueError, match=r"no form for the factorized layers \['1', '3'\]"):
        fuse(model, forms={"0": "chain"})
    with pytest.raises(ValueError, match="no factorized layer at: \\['9'\\]"):
        fuse(model, forms={"0": "chain", "1": "chain", "3": "chain", "9": "plain"})
    with pytest.raises(ValueError, match="layer '0': form 'warp' is not available"):
        fuse(model, forms={"0": "warp", "1": "chain", "3": "chain"})
    with pytest.raises(ValueError, match="grouped stage"):
        fuse(model, forms={"0": "plain:fold", "1": "chain", "3": "chain"})
    with pytest.raises(ValueError, match="no fused layer's form is recorded"):
        fused_forms(dict(fuse(model).state_dict()))  # a plain dict copy: the metadata is gone


def test_a_recorded_onepass_form_runs_plain_where_the_native_kernel_is_missing(monkeypatch):
    model = _model()
    monkeypatch.setattr(fused_module, "onepass_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse(model, forms={"0": "onepass", "1": "chain", "3": "chain"})
    assert fused[0].form == "plain"
    assert any("onepass" in str(w.message) for w in caught)
