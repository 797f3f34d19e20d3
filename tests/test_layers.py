"""Factorized layers: both forward paths against a dense reference, initialisation, from_dense,
tensorization, reporting, and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import COMBO_IDS, COMBOS
from stpnet import FORMATS
from stpnet.nn import LAYOUTS, FactorizedConv1d, FactorizedConv2d, FactorizedConv3d, FactorizedLinear
from stpnet.nn.cost import MEMORY_WEIGHT

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def test_the_combinations_cover_every_registered_format_and_layout():
    """The suites' (format, layout, t) list is read from the registries: every format name and every
    layout appears, each pair once, with t = 2 exactly for the semi-tensor names."""
    assert {fmt for fmt, _, _ in COMBOS} == set(FORMATS)
    assert {layout for _, layout, _ in COMBOS} == set(LAYOUTS)
    assert len({(fmt, layout) for fmt, layout, _ in COMBOS}) == len(COMBOS)
    assert all((t == 2) == FORMATS[fmt][1] for fmt, _, t in COMBOS)


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grads(layer, x, path):
    layer.forward_path = path
    x = x.clone().requires_grad_()
    y = layer(x)
    torch.manual_seed(0)
    g = torch.randn(y.shape, dtype=y.dtype)
    layer.zero_grad()
    (y * g).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in layer.weight_tensor.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt,layout,t", COMBOS, ids=COMBO_IDS)
def test_conv_paths_match_dense_reference(fmt, layout, t, dtype):
    torch.manual_seed(1)
    layer = FactorizedConv2d(16, 32, 3, stride=(2, 1), padding=1, format=fmt, layout=layout, rank=4, t=t,
                             dtype=dtype)
    x = torch.randn(3, 16, 9, 8, dtype=dtype)
    # the dense reference: torch's conv with the reconstructed weight as a leaf tensor
    W = layer.weight.detach().requires_grad_()
    xr = x.clone().requires_grad_()
    ref = F.conv2d(xr, W, layer.bias, (2, 1), 1)
    y_rebuild, gx_rebuild, gp_rebuild = grads(layer, x, "rebuild")
    y_contract, gx_contract, gp_contract = grads(layer, x, "contract")
    torch.manual_seed(0)
    g = torch.randn(ref.shape, dtype=dtype)
    (ref * g).sum().backward()
    for y in (y_rebuild, y_contract):
        assert rel(y, ref.detach()) < TOL[dtype]
    for gx in (gx_rebuild, gx_contract):
        assert rel(gx, xr.grad) < TOL[dtype]
    for a, b in zip(gp_contract, gp_rebuild):
        assert rel(a, b) < 10 * TOL[dtype]
    # weight gradient: the factor gradients of the rebuild path are the chain rule through dW
    dW = torch.autograd.grad(layer.weight, list(layer.weight_tensor.parameters()), W.grad)
    for a, b in zip(dW, gp_rebuild):
        assert rel(a, b) < 10 * TOL[dtype]


@pytest.mark.parametrize("fmt,layout,t", COMBOS, ids=COMBO_IDS)
def test_linear_paths_match_dense_reference(fmt, layout, t):
    torch.manual_seed(2)
    layer = FactorizedLinear(24, 32, format=fmt, layout=layout, rank=4, t=t, dtype=torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    ref = F.linear(x, layer.weight.detach(), layer.bias)
    y_r, gx_r, gp_r = grads(layer, x, "rebuild")
    y_c, gx_c, gp_c = grads(layer, x, "contract")
    assert rel(y_r, ref) < 1e-12 and rel(y_c, ref) < 1e-12
    assert rel(gx_c, gx_r) < 1e-12
    assert all(rel(a, b) < 1e-10 for a, b in zip(gp_c, gp_r))


@given(c_in=st.sampled_from([4, 6, 8, 12]), c_out=st.sampled_from([4, 8, 12]), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 1), dilation=st.integers(1, 2),
       combo=st.sampled_from(COMBOS), rank=st.sampled_from([2, 4]))
def test_contract_equals_rebuild_for_varied_convs(c_in, c_out, k, stride, padding, dilation, combo, rank):
    fmt, layout, t = combo
    layer = FactorizedConv2d(c_in, c_out, k, stride, padding, dilation, format=fmt, layout=layout, rank=rank,
                             t=t, dtype=torch.float64)
    x = torch.randn(2, c_in, 7, 6, dtype=torch.float64)
    layer.forward_path = "rebuild"
    a = layer(x)
    layer.forward_path = "contract"
    assert rel(layer(x), a) < 1e-12


@pytest.mark.parametrize("cls,spatial", [(FactorizedConv1d, (11,)), (FactorizedConv3d, (5, 6, 4))])
@pytest.mark.parametrize("fmt,layout,t", COMBOS, ids=COMBO_IDS)
def test_conv1d_and_conv3d(cls, spatial, fmt, layout, t):
    layer = cls(8, 16, 3, padding=1, stride=2, format=fmt, layout=layout, rank=4, t=t, dtype=torch.float64)
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    ref = conv(x, layer.weight.detach(), layer.bias, 2, 1)
    for path in ("rebuild", "contract"):
        layer.forward_path = path
        assert rel(layer(x), ref) < 1e-12


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("fmt,layout,t", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("c,rank", [(64, 14), (32, 6)])
def test_initialisation_preserves_variance_like_kaiming(fmt, layout, t, c, rank):
    torch.manual_seed(3)
    x = torch.randn(16, c, 16, 16)
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(dense.weight, mode="fan_in", nonlinearity="relu")
    layer = FactorizedConv2d(c, c, 3, padding=1, bias=False, format=fmt, layout=layout, rank=rank, t=t)
    with torch.no_grad():
        ratio_dense = float(dense(x).std() / x.std())
        ratio = float(layer(x).std() / x.std())
        w_std = float(layer.weight.std())
    assert abs(ratio / ratio_dense - 1) < 0.15
    assert w_std == pytest.approx(math.sqrt(2 / (c * 9)), rel=0.02)


# ---------------------------------------------------------------- from dense


@pytest.mark.parametrize("fmt,layout,t", COMBOS, ids=COMBO_IDS)
def test_from_dense_at_full_rank_reproduces_the_layer(fmt, layout, t):
    torch.manual_seed(4)
    dense = nn.Conv2d(8, 16, 3, stride=(2, 1), padding="valid", dilation=(1, 2), bias=True,
                      padding_mode="zeros").double()
    layer = FactorizedConv2d.from_dense(dense, fmt, rank=1000, t=t, layout=layout)
    x = torch.randn(2, 8, 11, 12, dtype=torch.float64)
    for path in ("rebuild", "contract"):
        layer.forward_path = path
        assert rel(layer(x), dense(x)) < 1e-10
    lin = nn.Linear(12, 16).double()
    flin = FactorizedLinear.from_dense(lin, fmt, rank=1000, t=t, layout=layout if layout != "tucker2" else None)
    xl = torch.randn(3, 12, dtype=torch.float64)
    assert rel(flin(xl), lin(xl)) < 1e-10


def test_from_dense_carries_over_configuration():
    dense = nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                      bias=False, padding_mode="circular")
    layer = FactorizedConv2d.from_dense(dense, "stt", rank=8, t=2)
    assert layer.bias is None
    assert layer.stride == (2, 1) and layer.padding == (1, 2) and layer.dilation == (1, 2)
    assert layer.kernel_size == (3, 5) and layer.padding_mode == "circular"
    x = torch.randn(2, 8, 10, 9)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)  # the dense layer with the factorized kernel
        for path in ("rebuild", "contract"):
            layer.forward_path = path
            assert rel(layer(x), dense(x)) < 1e-5
    same = nn.Conv2d(8, 8, 4, padding="same", padding_mode="reflect")
    layer = FactorizedConv2d.from_dense(same, "tt", rank=1000)
    assert layer.padding == "same"
    with torch.no_grad():
        for path in ("rebuild", "contract"):
            layer.forward_path = path
            assert layer(x).shape == same(x).shape and rel(layer(x), same(x)) < 1e-5


@pytest.mark.parametrize("rule", [{"tol": 0.3}, {"weight_compression": 8.0}])
def test_from_dense_with_tolerance_or_compression(rule):
    dense = nn.Conv2d(32, 64, 3, padding=1)
    layer = FactorizedConv2d.from_dense(dense, "stt", t=2, **rule)
    W = dense.weight.detach()
    err = rel(layer.weight.detach(), W)
    if "tol" in rule:
        assert err <= 0.3
    else:
        weight_params = sum(p.numel() for p in layer.weight_tensor.parameters())
        assert W.numel() / weight_params >= 8.0


def test_from_dense_rejects_groups_and_wrong_types():
    with pytest.raises(ValueError, match="groups=2"):
        FactorizedConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), "tt", rank=4)
    with pytest.raises(ValueError, match="groups=4"):
        FactorizedConv2d(8, 8, 3, groups=4, format="tt", rank=4)
    with pytest.raises(ValueError, match="expects an nn.Conv2d"):
        FactorizedConv2d.from_dense(nn.Linear(4, 4), "tt", rank=4)
    with pytest.raises(ValueError, match="exactly one"):
        FactorizedConv2d.from_dense(nn.Conv2d(8, 8, 3), "tt", rank=4, tol=0.1)


# ---------------------------------------------------------------- tensorization


def test_channel_factorization():
    from stpnet.nn import channel_modes, factorize
    assert factorize(16) == (4, 2, 2) and factorize(64) == (4, 4, 4) and factorize(3) == (3,)
    assert factorize(13) == (13,) and math.prod(factorize(640)) == 640
    assert channel_modes(12, 3, 4, last_divisible=True) == (3, 4)
    with pytest.raises(ValueError, match="t=2 must divide the output channel count 15"):
        FactorizedConv2d(16, 15, 3, format="stt", rank=4, t=2)
    # a prime channel count stays one mode and still works
    layer = FactorizedConv2d(3, 7, 3, format="tt", rank=4, dtype=torch.float64)
    layer.forward_path = "contract"
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert rel(layer(x), F.conv2d(x, layer.weight.detach(), layer.bias)) < 1e-12


@pytest.mark.parametrize("layout", ["sequential", "paired"])
def test_weight_tensorization_round_trip(layout):
    from stpnet.nn.base import layer_tensorization
    _, _, tz = layer_tensorization("tt", 1, layout, 16, 32, (3, 3), None, None, 3)
    W = torch.randn(32, 16, 3, 3)
    X = tz.weight_to_tensor(W)
    assert X.shape == tz.tensor_shape and torch.equal(tz.tensor_to_weight(X), W)
    if layout == "paired":  # X[k, (i_1 o_1), ...] = W[o, i, k]
        assert tz.tensor_shape == (9, 4 * 4, 2 * 4, 2 * 2)
        i, o, k = (3, 1, 0), (2, 3, 1), 7
        flat_i = (i[0] * 2 + i[1]) * 2 + i[2]
        flat_o = (o[0] * 4 + o[1]) * 2 + o[2]
        assert X[k, i[0] * 4 + o[0], i[1] * 4 + o[1], i[2] * 2 + o[2]] == W[flat_o, flat_i].reshape(-1)[k]


# ---------------------------------------------------------------- reporting


RESNET32_CONVS = [(16, 16)] * 10 + [(16, 32)] + [(32, 32)] * 9 + [(32, 64)] + [(64, 64)] * 9


@pytest.mark.parametrize("fmt,layout,t,rank,expected", [
    ("tt", "paired", 1, 14, 2.68), ("stt", "paired", 2, 14, 9.53),
    ("tt", "sequential", 1, 14, 3.40), ("stt", "sequential", 2, 14, 12.2),
    ("tt", "paired", 1, 10, 5.07), ("stt", "paired", 2, 10, 16.9),
    ("tt", "sequential", 1, 10, 6.45), ("stt", "sequential", 2, 10, 21.7),
])
def test_resnet32_compression_factors_match_math_table(fmt, layout, t, rank, expected):
    """docs/formats-spec.md, section 9: all 3x3 convs of ResNet-32 factorized, the rest dense (464,154 params)."""
    dense_conv = sum(a * b * 9 for a, b in RESNET32_CONVS)
    factorized = sum(FactorizedConv2d(a, b, 3, padding=1, bias=False, format=fmt, layout=layout, rank=rank,
                                      t=t).num_params for a, b in RESNET32_CONVS)
    assert 464154 / (464154 - dense_conv + factorized) == pytest.approx(expected, abs=0.05)  # as printed


def test_reporting_and_cost_model():
    layer = FactorizedConv2d(256, 256, 3, padding=1, bias=False, format="stt", layout="sequential", rank=14, t=2)
    shape = (32, 256, 32, 32)
    assert layer.dense_macs(shape) == 32 * 256 * 256 * 9 * 32 * 32
    assert layer.dense_params == 256 * 256 * 9
    assert layer.compression_ratio == pytest.approx(layer.dense_params / layer.num_params)
    costs = layer.path_costs(shape)
    assert costs["contract"].macs * 20 < costs["rebuild"].macs
    assert layer.choose_path(shape) == "contract"
    assert layer.macs(shape) == costs["contract"].macs
    layer.forward_path = "rebuild"
    assert layer.choose_path(shape) == "rebuild" and layer.macs(shape) == costs["rebuild"].macs
    # a single tiny input: rebuilding the weight costs more than the conv itself
    tiny = FactorizedConv2d(16, 16, 3, format="tt", layout="paired", rank=4)
    costs = tiny.path_costs((1, 16, 4, 4))
    assert tiny.choose_path((1, 16, 4, 4)) == min(costs, key=lambda p: costs[p].score("cpu"))


@pytest.mark.parametrize("fmt,t", [("tr", 1), ("str", 2), ("tt", 1), ("tucker", 1)])
def test_rebuild_cost_is_the_reconstruction_of_the_weight(fmt, t):
    """The rebuild path pays the dense op plus exactly what rebuilding the weight costs; a ring's
    rebuild is r_0 times a train's, so at batch 1 a 64-channel TR layer contracts instead (it used
    to rebuild, much slower than contracting: ResNet-20 TR R14 at batch 1 ran 16x the dense time)."""
    layer = FactorizedConv2d(64, 64, 3, padding=1, bias=False, format=fmt, rank=14, t=t)
    shape = (1, 64, 8, 8)
    assert layer.path_costs(shape)["rebuild"].macs == layer.dense_macs(shape) + layer.weight_tensor.reconstruction_macs()
    if fmt in ("tr", "str"):
        assert layer.choose_path(shape) == "contract"


@pytest.mark.parametrize("fmt,t", [("tr", 1), ("str", 2), ("tt", 1), ("stt", 2), ("tucker", 1), ("cp", 1)])
def test_inference_choice_leaves_out_the_cached_factor_work(fmt, t):
    """In eval mode without gradients the rebuilt weight and merged cores are cached, so the cost
    model scores the paths without that once-per-call work, and remembers the choice apart from
    the training one."""
    layer = FactorizedConv2d(64, 64, 3, padding=1, bias=False, format=fmt, rank=14 if fmt != "cp" else 40, t=t)
    x = torch.randn(1, 64, 8, 8)
    costs = layer.path_costs(x.shape)
    rebuild = costs["rebuild"]
    assert rebuild.once == layer.weight_tensor.reconstruction_macs() and rebuild.once_activations == 64 * 64 * 9
    assert rebuild.score("cpu", cached=True) == pytest.approx(
        rebuild.score("cpu") - rebuild.once - MEMORY_WEIGHT["cpu"] * rebuild.once_activations)
    training = min(costs, key=lambda p: (costs[p].score("cpu"), p != "rebuild"))
    inference = min(costs, key=lambda p: (costs[p].score("cpu", cached=True), p != "rebuild"))
    layer(x)
    layer.eval()
    with torch.no_grad():
        layer(x)
    choices = layer.__dict__["_path_choices"]
    assert choices[(tuple(x.shape), "cpu", torch.float32, tuple(layer.rank), False)] == training
    assert choices[(tuple(x.shape), "cpu", torch.float32, tuple(layer.rank), True)] == inference


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="layout 'paired' is not available for 'tr'; valid: ring"):
        FactorizedConv2d(8, 8, 3, format="tr", layout="paired", rank=4)
    with pytest.raises(ValueError, match="forward_path must be one of"):
        FactorizedLinear(8, 8, format="tt", rank=4, forward_path="fast")
    with pytest.raises(ValueError, match="exactly one of rank"):
        FactorizedLinear(8, 8, format="tt")
    with pytest.raises(ValueError, match="classic format"):
        FactorizedLinear(8, 8, format="tt", rank=4, t=2)
    with pytest.raises(ValueError, match=r"expected input \(N, 8"):
        FactorizedConv2d(8, 8, 3, format="tt", rank=4)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        FactorizedConv2d(8, 8, 3, stride=2, padding="same", format="tt", rank=4)
    with pytest.raises(ValueError, match="unknown format"):
        FactorizedConv2d(8, 8, 3, format="ht", rank=4)


def test_from_dense_dispatches_on_layer_type():
    from stpnet.nn import from_dense
    assert isinstance(from_dense(nn.Linear(16, 8), "stt", rank=4, t=2), FactorizedLinear)
    assert isinstance(from_dense(nn.Conv1d(8, 8, 3), "tr", rank=2), FactorizedConv1d)
    assert isinstance(from_dense(nn.Conv2d(8, 8, 3), "sttu", rank=4), FactorizedConv2d)
    with pytest.raises(ValueError, match="cannot factorize a BatchNorm2d; supported layers: nn.Linear"):
        from_dense(nn.BatchNorm2d(8), "tt", rank=4)


DENSE_CASES = [  # (factorized layer, input): every layer kind, bias or not, strides, padding modes
    (lambda **kw: FactorizedLinear(24, 18, **kw), (5, 24)),
    (lambda **kw: FactorizedLinear(24, 18, bias=False, **kw), (2, 3, 24)),
    (lambda **kw: FactorizedConv1d(8, 12, 3, stride=2, padding=1, **kw), (2, 8, 11)),
    (lambda **kw: FactorizedConv2d(8, 12, 3, stride=(2, 1), padding=1, bias=False, **kw), (2, 8, 9, 8)),
    (lambda **kw: FactorizedConv2d(8, 12, (3, 2), padding="same", dilation=2, **kw), (2, 8, 7, 6)),
    (lambda **kw: FactorizedConv2d(8, 12, 3, padding=1, padding_mode="reflect", **kw), (2, 8, 6, 6)),
    (lambda **kw: FactorizedConv3d(8, 12, 3, padding=1, **kw), (1, 8, 4, 5, 3)),
]


@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
@pytest.mark.parametrize("fmt,layout,t", COMBOS, ids=COMBO_IDS)
def test_to_dense_computes_what_the_factorized_layer_computes(fmt, layout, t, case):
    from stpnet.nn import to_dense

    make, shape = DENSE_CASES[case]
    torch.manual_seed(3)
    layer = make(format=fmt, layout=layout, rank=4, t=t, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    dense = to_dense(layer)
    assert type(dense).__name__ == type(layer).__name__.replace("Factorized", "")
    assert sum(p.numel() for p in dense.parameters()) == layer.dense_params
    assert dense.weight.dtype == torch.float64 and dense.weight.requires_grad and dense.training
    assert rel(dense(x), layer(x)) < 1e-12
    dense(x).sum().backward()  # an ordinary trainable layer
    assert dense.weight.grad is not None


def test_to_dense_rejects_what_it_cannot_convert():
    from stpnet.nn import to_dense

    with pytest.raises(ValueError, match="cannot convert a Linear to a dense layer; supported layers: "
                                         "FactorizedLinear, FactorizedConv1d"):
        to_dense(nn.Linear(3, 4))


# ------------------------------------------------------------------ inference cache
@pytest.mark.parametrize("path", ["rebuild", "contract"])
@pytest.mark.parametrize("fmt", ["tt", "stt", "tr", "tucker"])
def test_eval_inference_caches_merged_factors_until_they_change(fmt, path, monkeypatch):
    from stpnet.nn import FactorizedConv2d

    torch.manual_seed(0)
    layer = FactorizedConv2d(8, 8, 3, padding=1, format=fmt, rank=4, forward_path=path).eval()
    x = torch.randn(2, 8, 6, 6)
    builds = []
    original = type(layer.weight_tensor).to_tensor
    monkeypatch.setattr(type(layer.weight_tensor), "to_tensor", lambda self: builds.append(1) or original(self))
    with torch.no_grad():
        first = layer(x)
        n = len(builds)
        again = layer(x)
    assert torch.equal(first, again)
    assert len(builds) == n  # nothing rebuilt on the second call
    # an optimizer step changes the factors: the next inference sees them
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    layer(x).square().mean().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        stepped = layer(x)
    reference = torch.nn.functional.conv2d(x, layer.weight.detach(), layer.bias, padding=1)
    assert not torch.allclose(stepped, first) and torch.allclose(stepped, reference, rtol=1e-4, atol=1e-5)
    # load_state_dict too (same layer object, still in eval mode)
    state = {k: v * 0.5 if k.startswith("weight_tensor") else v for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(state)
        loaded = layer(x)
    reference = torch.nn.functional.conv2d(x, layer.weight.detach(), layer.bias, padding=1)
    assert torch.allclose(loaded, reference, rtol=1e-4, atol=1e-5) and not torch.allclose(loaded, stepped)
    # a factor replaced by a new Parameter object (same version counter value possible) and a
    # factor whose .data is swapped: both seen
    with torch.no_grad():
        owner, name = next((m, n) for m in layer.weight_tensor.modules() for n in m._parameters)
        old = owner._parameters[name]
        setattr(owner, name, torch.nn.Parameter(old.detach() * 3))
        replaced = layer(x)
        reference = torch.nn.functional.conv2d(x, layer.dense_weight(), layer.bias, padding=1)
        assert torch.allclose(replaced, reference, rtol=1e-4, atol=1e-5) and not torch.allclose(replaced, loaded)
        fresh = owner._parameters[name]
        fresh.data = fresh.data * -1
        swapped = layer(x)
        reference = torch.nn.functional.conv2d(x, layer.dense_weight(), layer.bias, padding=1)
        assert torch.allclose(swapped, reference, rtol=1e-4, atol=1e-5) and not torch.allclose(swapped, replaced)
    # with gradients on, nothing is cached: the output still depends on the factors
    out = layer(x)
    assert out.requires_grad


@pytest.mark.parametrize("fmt", ["stt", "tucker", "cp"])
def test_a_repeated_inference_call_follows_its_plan_and_every_change_is_seen(fmt):
    """The second inference call on an input like the first skips the path choice and the checks;
    a new shape, another forward_path, new parameters, a new bias or new geometry attributes are
    all seen."""
    torch.manual_seed(1)
    layer = FactorizedConv2d(8, 8, 3, padding=1, format=fmt, rank=4 if fmt != "cp" else 12,
                             t=2 if fmt == "stt" else None, forward_path="rebuild").eval()
    x = torch.randn(1, 8, 6, 6)
    choices = []
    original = layer.path_for
    layer.path_for = lambda inp: choices.append(tuple(inp.shape)) or original(inp)

    def reference(inp):
        return torch.nn.functional.conv2d(inp, layer.dense_weight(), layer.bias, layer.stride, layer.padding)

    with torch.no_grad():
        first = layer(x)
        assert layer(x) is not None and choices == [(1, 8, 6, 6)]  # planned: no second choice
        torch.testing.assert_close(layer(x), first)
        layer(torch.randn(2, 8, 6, 6))  # another shape: chosen again
        assert len(choices) == 2
        layer.forward_path = "contract"
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)
        assert len(choices) == 3
        layer.forward_path = "rebuild"
        layer(x)
        layer.bias = nn.Parameter(torch.ones(8))  # a new bias object is read at call time
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)
        layer.stride = (2, 2)
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)
        layer.stride = (1, 1)
        layer.weight_tensor.factors[0].mul_(2)  # an in-place change of a factor
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)
    layer.train()  # training never plans
    y = layer(x)
    assert y.requires_grad


def test_renamed_methods_keep_deprecated_aliases():
    layer = FactorizedConv2d(8, 16, 3, padding=1, format="stt", rank=4, t=2)
    shape = (2, 8, 6, 6)
    assert layer.format == layer.weight_tensor.format == "stt"
    with pytest.warns(DeprecationWarning, match="use .format"):
        assert layer.format_name == "stt"
    with pytest.warns(DeprecationWarning, match="use macs"):
        assert layer.flops(shape) == layer.macs(shape)
    with pytest.warns(DeprecationWarning, match="use dense_macs"):
        assert layer.dense_flops(shape) == layer.dense_macs(shape)
    # a layer's compression= is its weight's factor, unlike compress(compression=) for the whole model
    with pytest.warns(DeprecationWarning, match="name it weight_compression="):
        old = FactorizedConv2d(8, 16, 3, format="stt", compression=4.0, t=2)
    assert old.rank == FactorizedConv2d(8, 16, 3, format="stt", weight_compression=4.0, t=2).rank
    with pytest.raises(ValueError, match="give weight_compression= only"):
        FactorizedLinear(8, 8, format="tt", compression=2.0, weight_compression=2.0)


@pytest.mark.parametrize("fmt,t", [("stt", 2), ("str", 2), ("tr", 1), ("tt", 1)])
@pytest.mark.parametrize("stage", ["depth", "fold", "stacked", "block", None])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)), dict(kernel_size=3, padding="same"),
    dict(kernel_size=(2, 3), padding=0)], ids=["3x3", "strided", "rect-dilated", "same", "2x3-valid"])
def test_grouped_spatial_stage_every_form_matches_dense(fmt, t, stage, geometry):
    """The a*t groups' shared kernel as a depth convolution, folded into the batch, stacked along
    the height (with a padding band per group), or as ``S ⊗ I_g`` on channel blocks: each against
    the dense convolution."""
    from stpnet.functional.contract import sequential_conv, sequential_factors
    from stpnet.nn.conv import prepare_conv_input

    torch.manual_seed(6)
    layer = FactorizedConv2d(16, 32, format=fmt, rank=4, t=t, dtype=torch.float64, **geometry)
    x = torch.randn(3, 16, 9, 8, dtype=torch.float64)
    w = layer.weight_tensor
    f = sequential_factors(w.factors, w.t, len(layer.tensorization.in_modes), has_kernel=True)
    z, padding = prepare_conv_input(x, 16, layer.padding, layer.kernel_size, layer.dilation, "zeros")
    got = sequential_conv(z, f, layer.kernel_size, layer.stride, padding, layer.dilation, stage=stage)
    expected = F.conv2d(x, layer.dense_weight(), None, layer.stride, layer.padding, layer.dilation)
    assert got.shape == expected.shape and rel(got, expected) < 1e-12


def test_grouped_spatial_stage_rejects_an_unknown_form():
    from stpnet.functional.contract import sequential_conv, sequential_factors

    layer = FactorizedConv2d(8, 8, 3, format="stt", rank=4, t=2)
    w = layer.weight_tensor
    f = sequential_factors(w.factors, w.t, len(layer.tensorization.in_modes), has_kernel=True)
    with pytest.raises(ValueError, match="stage must be one of"):
        sequential_conv(torch.randn(1, 8, 5, 5), f, (3, 3), (1, 1), (1, 1), (1, 1), stage="im2col")


def test_grouped_stage_rule_and_its_batch_one_form_match_dense():
    from stpnet.functional.contract import grouped_stage

    assert grouped_stage(1, (16, 16), (1, 1)) == "stacked"
    assert grouped_stage(1, (8, 8), (1, 1)) == "depth"  # small maps: the depth convolution is faster
    assert grouped_stage(32, (32, 32), (1, 1)) == "depth"  # batches: the depth convolution is faster
    # training, a rank space a few channels wide: one plain convolution on S ⊗ I_g is faster on CPU
    assert grouped_stage(128, (32, 32), (1, 1), "cpu", channels=12, needs_grad=True) == "block"
    assert grouped_stage(128, (16, 16), (1, 1), "cpu", channels=12, needs_grad=True) == "depth"
    assert grouped_stage(128, (16, 16), (2, 2), "cpu", channels=8, needs_grad=True) == "block"
    assert grouped_stage(32, (32, 32), (1, 1), "cpu", channels=6) == "depth"  # inference: depth
    assert grouped_stage(128, (32, 32), (1, 1), "cuda", channels=6, needs_grad=True) == "depth"  # not measured
    assert grouped_stage(1, (32, 32), (1, 1), "cpu", channels=6, needs_grad=True) == "stacked"
    assert grouped_stage(1, (32, 32), (2, 2)) == "depth"  # the stacked form needs height stride 1
    assert grouped_stage(1, (32,), (1,)) == "depth"
    torch.manual_seed(7)
    for fmt, t in (("stt", 2), ("str", 2)):
        layer = FactorizedConv2d(16, 16, 3, padding=1, format=fmt, rank=6, t=t, dtype=torch.float64,
                                 forward_path="contract").eval()
        x = torch.randn(1, 16, 16, 16, dtype=torch.float64)
        with torch.no_grad():
            assert rel(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, 1, 1)) < 1e-12
