"""The inference caches (a factorized layer's rebuilt weight and merged cores, a fused layer's derived
weights and plans) never return a stale result: every way of changing the tensors they are computed
from is noticed, checked against a fresh (gradient-mode, uncached) forward of the same model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import stpnet
from stpnet.deploy.fused import FusedLayer, fuse
from stpnet.nn import FactorizedConv2d, FactorizedLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = stpnet.compress(dense, "stt", rank=4, keep_first_conv=False, keep_classifier=False)
    return small.eval()


def _fused(form: str) -> nn.Module:
    model = fuse(_net())
    for m in model.modules():
        if isinstance(m, FusedLayer):
            m.form = form if form in m.forms else "dense"
    return model.eval()


def _fresh(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output computed without any cache (gradient mode rebuilds everything)."""
    with torch.enable_grad():
        return model(x).detach()


def _cached(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model(x)
        return model(x)  # the second call runs the remembered plans and cached weights


def _models():
    return {"factorized": _net, "fused-dense": lambda: _fused("dense"), "fused-plain": lambda: _fused("plain"),
            "fused-merged_in": lambda: _fused("merged_in"), "fused-chain": lambda: _fused("chain")}


def _data_edit(model: nn.Module) -> None:
    for p in model.parameters():
        p.data.mul_(1.5)


def _load_state_dict(model: nn.Module) -> None:
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _load_state_dict_assign(model: nn.Module) -> None:
    state = {k: (v * 1.5 if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _data_assign(model: nn.Module) -> None:
    for p in model.parameters():
        p.data = p.data * 1.5


def _single_entry_edit(model: nn.Module) -> None:
    """One value of one factor changed through ``.data``; sums and norms would barely move."""
    p = next(p for m in model.modules() if isinstance(m, (FactorizedLayer, FusedLayer))
             for n, p in m.named_parameters() if n != "bias")
    flat = p.data.view(-1)
    flat[0], flat[1] = flat[1].clone(), flat[0].clone()  # a swap: the same sum, another function


EDITS = {"data-mul": _data_edit, "load_state_dict": _load_state_dict, "load_state_dict-assign": _load_state_dict_assign,
         "data-assign": _data_assign, "data-swap": _single_entry_edit}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("kind", list(_models()))
def test_an_edit_of_the_source_tensors_is_seen_by_the_next_inference_call(kind, edit):
    model = _models()[kind]()
    x = torch.randn(2, 3, 8, 8)
    before = _cached(model, x)
    EDITS[edit](model)
    after = _fresh(model, x)
    assert not torch.allclose(after, before, atol=1e-4), "the edit should change the function"
    with torch.no_grad():
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)  # and the plan made after it


@pytest.mark.parametrize("kind", list(_models()))
def test_to_and_half_drop_the_caches(kind):
    model = _models()[kind]()
    x = torch.randn(2, 3, 8, 8)
    _cached(model, x)
    model.double()
    xd = x.double()
    with torch.no_grad():
        torch.testing.assert_close(model(xd), _fresh(model, xd))
    model.half()
    for m in model.modules():
        if isinstance(m, (FactorizedLayer, FusedLayer)):
            assert "_inference_cache" not in m.__dict__ and "_plan" not in m.__dict__
    model.float()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _fresh(model, x), rtol=1e-4, atol=1e-5)  # rounded through half, no stale cache


@pytest.mark.parametrize("kind", ["factorized", "fused-dense"])
def test_requires_grad_drops_the_caches(kind):
    model = _models()[kind]()
    layer = next(m for m in model.modules() if isinstance(m, (FactorizedLayer, FusedLayer)))
    x = torch.randn(2, 3, 8, 8)
    _cached(model, x)
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first
        model.requires_grad_(False)  # each parameter's flag: the recorded flag no longer matches
        assert layer.weight is not first
        second = layer.weight
        layer.requires_grad_(True)  # the layer's own call: dropped outright
        assert "_inference_cache" not in layer.__dict__ or layer.weight is not second
        torch.testing.assert_close(model(x), _fresh(model, x))


def test_the_cached_weight_follows_a_data_edit_of_one_layer():
    torch.manual_seed(3)
    layer = FactorizedConv2d(8, 12, 3, 1, 1, format="stt", rank=4, t=2).eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first
        for p in layer.weight_tensor.parameters():
            p.data.mul_(2)
        torch.testing.assert_close(layer.weight, first * 2 ** len(list(layer.weight_tensor.parameters())))


def test_a_deep_copy_and_an_optimizer_step_are_followed():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    _cached(model, x)
    clone = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _fresh(model, x))
        torch.testing.assert_close(clone(x), _fresh(clone, x))


@pytest.fixture(params=["memcmp", "torch"])
def comparison(request, monkeypatch):
    """Each source comparison: byte-wise on the host (``memcmp``), and the batched ``torch.equal``
    of their bits that accelerators (and hosts without a C library) use."""
    if request.param == "torch":
        import stpnet.nn._cache as cache

        monkeypatch.setattr(cache, "_memcmp", lambda: None)
    return request.param


def _bias_data_edit(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (FactorizedLayer, FusedLayer)) and m.bias is not None:
            m.bias.data.add_(1.0)


def _reshaped_in_place(model: nn.Module) -> None:
    """A factor given another layout of the same memory (same pointer, shape and bytes; other strides)."""
    layer = next(m for m in model.modules() if isinstance(m, FusedLayer))
    p = next(p for n, p in layer.named_parameters() if n != "bias" and p.ndim == 2 and p.shape[0] != p.shape[1])
    pointer, shape = p.data_ptr(), p.shape
    rows, cols = shape
    p.data = p.data.as_strided(shape, (1, rows) if p.stride() == (cols, 1) else (cols, 1))
    assert p.data_ptr() == pointer and p.shape == shape


@pytest.mark.parametrize("edit", ["data-mul", "data-swap", "bias-data"])
@pytest.mark.parametrize("kind", list(_models()))
def test_edits_are_seen_through_either_comparison(kind, edit, comparison):
    model = _models()[kind]()
    x = torch.randn(2, 3, 8, 8)
    before = _cached(model, x)
    {"data-mul": _data_edit, "data-swap": _single_entry_edit, "bias-data": _bias_data_edit}[edit](model)
    after = _fresh(model, x)
    assert not torch.allclose(after, before, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fused-dense", "fused-plain"])
def test_a_transposed_factor_is_compared_over_its_memory(kind, comparison):
    """Fused factors can be stored transposed (a permuted, not contiguous, layout): an edit of one
    entry through ``.data`` is still seen, and so is new data of a new layout."""
    model = _models()[kind]()
    layer = next(m for m in model.modules() if isinstance(m, FusedLayer))
    name, p = next((n, p) for n, p in layer.named_parameters() if n != "bias" and p.ndim == 2)
    with torch.no_grad():
        setattr(layer, name, nn.Parameter(p.detach().t().contiguous().t()))  # same values, transposed storage
    p = getattr(layer, name)
    assert not p.is_contiguous()
    x = torch.randn(2, 3, 8, 8)
    before = _cached(model, x)
    p.data[-1, 0] += 3.0  # one entry, through .data (no version bump)
    after = _fresh(model, x)
    assert not torch.allclose(after, before, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)
        p.data = p.data.t().contiguous().t() * 2  # another storage, the same layout
        torch.testing.assert_close(model(x), _fresh(model, x), rtol=1e-4, atol=1e-5)


def test_a_factor_reshaped_on_the_same_memory_is_seen(comparison):
    model = _models()["fused-dense"]()
    x = torch.randn(2, 3, 8, 8)
    before = _cached(model, x)
    _reshaped_in_place(model)
    after = _fresh(model, x)
    assert not torch.allclose(after, before, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)


def test_a_cached_value_is_reused_while_unchanged_even_with_nan_factors(comparison):
    """The sources are compared bit for bit: a NaN equals itself, so an unchanged layer holding one
    keeps its cache (``torch.equal`` would call it changed on every call)."""
    torch.manual_seed(0)
    layer = FactorizedConv2d(8, 12, 3, 1, 1, format="stt", rank=4, t=2).eval()
    factor = next(layer.weight_tensor.parameters())
    with torch.no_grad():
        factor[(0,) * factor.ndim] = float("nan")
        first = layer.weight
        assert layer.weight is first
        factor.data[(0,) * factor.ndim] = 0.0
        assert layer.weight is not first and not torch.isnan(layer.weight).any()


# ---------------------------------------------------------------- fuse(watch='versions')
def _versions_model() -> nn.Module:
    model = fuse(_net(), watch="versions")
    for m in model.modules():
        if isinstance(m, FusedLayer):
            m.form = "dense"
    return model.eval()


def test_watch_versions_sets_every_cache_and_computes_the_same_function():
    x = torch.randn(2, 3, 8, 8)
    exact, served = _fused("dense"), _versions_model()
    caches = [m for m in served.modules() if hasattr(m, "watch")]
    assert caches and all(m.watch == "versions" for m in caches)
    assert all(m.watch == "bits" for m in exact.modules() if hasattr(m, "watch"))
    torch.testing.assert_close(_cached(served, x), _cached(exact, x), rtol=0, atol=0)
    again = copy.deepcopy(served).train().eval()  # kept through copies and mode changes
    assert all(m.watch == "versions" for m in again.modules() if hasattr(m, "watch"))


@pytest.mark.parametrize("edit", ["in-place op", "load_state_dict", "new parameter"])
def test_watch_versions_sees_every_edit_made_through_pytorch(edit):
    x = torch.randn(2, 3, 8, 8)
    model = _versions_model()
    before = _cached(model, x)
    layer = next(m for m in model.modules() if isinstance(m, FusedLayer))
    name, p = next((n, q) for n, q in layer.named_parameters() if n != "bias")
    with torch.no_grad():
        if edit == "in-place op":
            p.mul_(1.5)
        elif edit == "load_state_dict":
            state = model.state_dict()
            state[next(k for k in state if k.endswith(name))] = p * 1.5
            model.load_state_dict(state)
        else:
            setattr(layer, name, nn.Parameter(p * 1.5))
    after = _cached(model, x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _fresh(model, x))


def test_watch_versions_does_not_see_data_writes_and_bits_does():
    """The documented difference: ``p.data`` writes bump no version counter of ``p``."""
    x = torch.randn(2, 3, 8, 8)
    for watch, seen in (("bits", True), ("versions", False)):
        model = _versions_model() if watch == "versions" else _fused("dense")
        before = _cached(model, x)
        for layer in (m for m in model.modules() if isinstance(m, FusedLayer)):
            for name, p in layer.named_parameters():
                if name != "bias":  # the factors the cached dense weights come from
                    p.data.mul_(1.5)
        assert (not torch.equal(_cached(model, x), before)) is seen, watch


@pytest.mark.parametrize("bad", ["exact", "", None, True])
def test_watch_must_be_a_known_mode(bad):
    with pytest.raises(ValueError, match=r"watch must be one of \('bits', 'versions'\)"):
        fuse(_net(), watch=bad)
