"""The fused deployment form: same function as the factorized layer (and as the dense op on the
rebuilt weight), every format, layout and layer kind; whole networks; TorchScript and ONNX export.

A test that takes ``combo`` runs for every (format, layout, t) combination of the registries
(the ``combo`` fixture of conftest.py)."""

from __future__ import annotations

import io
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpnet
from stpnet.functional.contract import conv1x1_mix
from stpnet.models import resnet20
from stpnet.functional.plain import PLAIN_FORMS, PlainChain, plain_form_weights
from stpnet.deploy.native import onepass_available
from stpnet.deploy.fused import FUSED_FORMS, FusedLayer, fuse, fuse_layer
from stpnet.nn import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d, FactorizedLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(kind: str, combo, seed: int = 0):
    fmt, layout, t = combo
    torch.manual_seed(seed)
    kw = dict(format=fmt, rank=4, t=t, layout=layout, dtype=torch.float64, forward_path="rebuild")
    if kind == "linear":
        return FactorizedLinear(12, 16, **kw), torch.randn(3, 5, 12, dtype=torch.float64)
    if kind == "conv1d":
        return FactorizedConv1d(8, 16, 3, 2, 1, padding_mode="reflect", **kw), torch.randn(2, 8, 11, dtype=torch.float64)
    if kind == "conv2d":
        return (FactorizedConv2d(8, 16, 3, 1, "same", dilation=2, bias=False, **kw),
                torch.randn(2, 8, 9, 9, dtype=torch.float64))
    if kind == "conv2d-strided":
        return FactorizedConv2d(8, 16, 3, 2, 1, **kw), torch.randn(2, 8, 9, 9, dtype=torch.float64)
    return FactorizedConv3d(8, 16, 3, 1, 1, **kw), torch.randn(2, 8, 5, 5, 5, dtype=torch.float64)


def _dense(layer, x):
    w = layer.dense_weight()
    if isinstance(layer, FactorizedLinear):
        return F.linear(x, w, layer.bias)
    return layer._dense_forward(x, w)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d-strided", "conv3d"])
def test_fused_layer_computes_the_same_function(combo, kind):
    layout = combo[1]
    layer, x = _layer(kind, combo)
    fused = fuse_layer(layer)
    assert isinstance(fused, FusedLayer)
    with torch.no_grad():
        expected = _dense(layer, x)
        got = fused(x)
    assert got.shape == expected.shape
    assert float((got - expected).norm() / expected.norm()) < 1e-12
    fused.mix = conv1x1_mix  # the 1x1 stages as conv1d, as exported to ONNX
    with torch.no_grad():
        assert float((fused(x) - expected).norm() / expected.norm()) < 1e-12
    del fused.mix
    # every conv form computes the same function (the plain ones on derived weights), and stays
    # differentiable through the merged factors
    onepass = kind == "conv2d-strided" and onepass_available()  # 2-D, dilation 1 (conv2d has dilation 2)
    linear_forms = ("chain", "plain", "dense") if layout in ("sequential", "ring", "tucker2") else ("chain", "dense")
    assert fused.forms == (linear_forms if kind == "linear" else ("chain", "dense") if layout == "paired" else
                           tuple(f for f in FUSED_FORMS if onepass or f != "onepass"))
    x_ref = x.clone().requires_grad_(True)
    _dense(layer, x_ref).square().sum().backward()  # the input gradient through the dense weight
    for form in fused.forms:
        fused.form = form
        with torch.no_grad():
            assert float((fused(x) - expected).norm() / expected.norm()) < 1e-12, form
        fused.zero_grad()
        x_in = x.clone().requires_grad_(True)
        fused(x_in).square().sum().backward()
        assert all(p.grad is not None for p in fused.parameters()), form
        assert float((x_in.grad - x_ref.grad).norm() / x_ref.grad.norm()) < 1e-10, form
        if layer.bias is not None:
            assert float((fused.bias.grad - layer.bias.grad).norm() / layer.bias.grad.norm()) < 1e-10, form
    fused.form = "chain"
    # it stays compressed: about the factorized parameter count, far from the dense one
    n_fused = sum(p.numel() for p in fused.parameters())
    assert n_fused < 2 * layer.num_params + 64
    # it is a drop-in: `weight` is the dense weight it applies (read from the chain itself)
    assert fused.weight.shape == layer.dense_weight().shape
    assert float(((fused.weight - layer.dense_weight()).norm() / layer.dense_weight().norm()).detach()) < 1e-12
    # and it is still a module that trains
    fused(x).square().sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_fused_weight_is_computed_once_in_inference_and_follows_parameter_changes():
    layer, _ = _layer("conv2d", ("stt", "sequential", 2))
    fused = fuse_layer(layer).eval()
    with torch.no_grad():
        first = fused.weight
        assert fused.weight is first
        fused.B.mul_(2)
        assert fused.weight is not first
        torch.testing.assert_close(fused.weight, 2 * first)
    with pytest.raises(AttributeError):
        fused.weight = first


def test_fuse_a_whole_network_keeps_outputs_and_sharing():
    torch.manual_seed(1)
    dense = resnet20().eval()
    small, report = stpnet.compress(dense, "stt", compression=9)
    fused = fuse(small.eval())
    assert not any(isinstance(m, stpnet.nn.FactorizedLayer) for m in fused.modules())
    assert any(isinstance(m, FusedLayer) for m in fused.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), small(x), rtol=1e-4, atol=1e-5)
    n_fused = sum(p.numel() for p in fused.parameters())
    assert n_fused < report.dense_params / 4  # still compressed
    shared = FactorizedLinear(8, 8, format="tt", rank=2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    out = fuse(model)
    assert out[0] is out[2]


def test_fuse_rejects_what_is_not_factorized():
    with pytest.raises(ValueError, match="expects a factorized layer"):
        fuse_layer(nn.Linear(4, 4))


def _small_net(combo):
    fmt, layout, t = combo
    torch.manual_seed(2)
    return nn.Sequential(
        FactorizedConv2d(4, 8, 3, 1, 1, format=fmt, rank=4, t=t, layout=layout), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), FactorizedLinear(8, 6, format=fmt, rank=4, t=t, layout=layout)).eval()


def _check_onnx(ort, net, x, expected):
    """Export ``net`` to ONNX, run it in ONNX Runtime on ``x`` and compare with ``expected``."""
    onnx_bytes = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), onnx_bytes, dynamo=False, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(onnx_bytes.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-5)


def test_fused_network_exports_to_torchscript_and_onnx(combo):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = fuse(_small_net(combo))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        expected = net(x)
        traced = torch.jit.trace(net, x)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    _check_onnx(ort, net, x, expected)


@pytest.mark.parametrize("form", [*PLAIN_FORMS, "dense", *(["onepass"] if onepass_available() else [])])
@pytest.mark.parametrize("combo", [("stt", "sequential", 2), ("sttu", "tucker2", 2), ("cp", "cp", 1)],
                         ids=["stt", "sttu", "cp"])
def test_every_fused_form_exports_to_onnx(combo, form):
    """A conv form chosen by fuse(example=) is baked into the export (its weights computed from the
    factors in the graph): each runs in ONNX Runtime ('onepass' exports as 'plain', checked against
    the native kernel's outputs)."""
    _check_fused_onnx(combo, lambda m: isinstance(m, FusedLayer) and m.kernel_size, "form", form, size=8)


def test_plain_forms_plan_repeated_inference_calls_and_follow_changes():
    torch.manual_seed(7)
    layer = FactorizedConv2d(8, 12, 3, 1, 1, format="stt", rank=4, t=2)
    fused = fuse_layer(layer).eval()
    x = torch.randn(1, 8, 8, 8)
    expected = _dense(layer, x).detach()
    with torch.no_grad():
        for form in (*PLAIN_FORMS, "dense"):
            fused.form = form
            for _ in range(2):  # the second call runs the remembered plan
                torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        assert fused.__dict__["_plan"][2][0] == "dense"
        xc = x.contiguous(memory_format=torch.channels_last)  # another memory format: its own weights
        torch.testing.assert_close(fused(xc), expected, rtol=1e-4, atol=1e-5)
        assert fused.__dict__["_plan"][2] == ("dense", True)
        fused.A.mul_(-1)  # a parameter changed in place: the plan is dropped, the weights rebuilt
        changed = fused(x)
        fused.form = "chain"
        torch.testing.assert_close(changed, fused(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(changed, expected, atol=1e-3)


def test_plain_chain_follows_the_kronecker_definition():
    """The plain chain of an STT conv equals A -> (I_g ⊗ S) -> (B ⊗ I_t) built entry by entry."""
    torch.manual_seed(6)
    layer = FactorizedConv2d(8, 12, 3, 1, 1, format="stt", rank=4, t=2, dtype=torch.float64)
    fused = fuse_layer(layer)
    chain = fused._plain_chain()
    r, a, t = fused.rank_in, fused.ring, fused.t
    g, r_out = a * t, fused.S.shape[0]
    S = fused.S.reshape(r_out, r, 3, 3)
    for h in range(g):
        for k in range(g):
            block = chain.W_mid[h * r_out:(h + 1) * r_out, k * r:(k + 1) * r]
            torch.testing.assert_close(block, S if h == k else torch.zeros_like(S))
    B = fused.B.detach().reshape(-1, r_out, a)  # (o, b', a)
    W_out = chain.W_out.detach()
    for o in range(B.shape[0]):
        for u in range(t):
            for aa in range(a):
                for v in range(t):
                    for b in range(r_out):
                        expected = B[o, b, aa] if u == v else 0.0
                        assert float(W_out[o * t + u, (aa * t + v) * r_out + b]) == float(expected)
    torch.testing.assert_close(chain.W_in, fused.A.reshape(8, r, g).permute(2, 1, 0).reshape(g * r, 8))


def test_a_form_the_layer_lacks_is_refused():
    net = fuse(_small_net(("tt", "paired", 1)))
    layer = next(m for m in net.modules() if isinstance(m, FusedLayer) and m.kernel_size)
    assert layer.forms == ("chain", "dense")
    layer.form = "plain"
    with pytest.raises(ValueError, match="form 'plain' is not available for this layer; valid: \\('chain', 'dense'\\)"):
        layer(torch.randn(1, layer.in_channels, 8, 8))
    with pytest.raises(ValueError, match="form must be one of"):
        plain_form_weights(PlainChain(torch.eye(2), torch.ones(2, 2, 3, 3), torch.eye(2)), "blocked")


@pytest.mark.parametrize("stage", ["depth", "fold", "stacked"])
def test_every_grouped_stage_form_exports_to_onnx(stage):
    """A stage form chosen by fuse(example=) is baked into the export: each runs in ONNX Runtime."""
    _check_fused_onnx(("str", "ring", 2), lambda m: isinstance(m, stpnet.deploy.fused.FusedSequential), "spatial_stage",
                      stage, size=16)


def _check_fused_onnx(combo, selected, attribute: str, value, size: int) -> None:
    """Fuse the small network of ``combo``, set ``attribute`` to ``value`` on the fused layers
    ``selected`` picks, and check its ONNX export in ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = fuse(_small_net(combo))
    for module in net.modules():
        if selected(module):
            setattr(module, attribute, value)
    x = torch.randn(1, 4, size, size)
    with torch.no_grad():
        expected = net(x)
    _check_onnx(ort, net, x, expected)


# ----------------------------------------------------------------------------- path choice
def test_path_choice_is_remembered_per_shape_and_ranks():
    layer = FactorizedConv2d(8, 16, 3, 1, 1, format="stt", rank=4)
    calls = []
    original = layer.path_costs

    def counting(shape):
        calls.append(tuple(shape))
        return original(shape)

    layer.path_costs = counting
    x = torch.randn(2, 8, 6, 6)
    for _ in range(3):
        layer(x)
    assert calls == [(2, 8, 6, 6)]  # the cost model ran once for this shape
    layer(torch.randn(1, 8, 6, 6))
    assert len(calls) == 2


def test_measured_path_choice_times_both_paths_once_per_shape():
    torch.manual_seed(3)
    layer = FactorizedConv2d(8, 16, 3, 1, 1, format="str", rank=4, forward_path="measure").double()
    reference = FactorizedConv2d(8, 16, 3, 1, 1, format="str", rank=4, forward_path="rebuild").double()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    measured = []
    original = layer._measure_paths
    layer._measure_paths = lambda inp, *rest: measured.append(tuple(inp.shape)) or original(inp, *rest)
    for _ in range(3):
        torch.testing.assert_close(layer(x), reference(x))
    assert measured == [(2, 8, 6, 6)]
    choice = layer.choose_path(x.shape)
    assert choice in ("rebuild", "contract")
    # gradients still flow in training after the choice
    layer.train()
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.weight_tensor.parameters())


class _SlowBackward(torch.autograd.Function):
    """The identity, whose backward pass sleeps: a path fast forward and slow to train through."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.03)
        return grad


def test_measured_path_choice_in_training_times_the_backward_pass_too():
    # contract: fast forward, slow backward; rebuild: slower forward, fast backward. Timed forward
    # only (inference) contract wins; timed as a training step runs it, rebuild does.
    torch.manual_seed(6)
    layer = FactorizedConv2d(8, 8, 3, 1, 1, format="stt", rank=4, t=2, forward_path="measure").double()
    reference = FactorizedConv2d(8, 8, 3, 1, 1, format="stt", rank=4, t=2, forward_path="rebuild").double()
    reference.load_state_dict(layer.state_dict())
    dense_forward, contract_forward = layer._dense_forward, layer._contract_forward

    def slow_forward(x, weight):
        time.sleep(0.01)
        return dense_forward(x, weight)

    layer._dense_forward = slow_forward
    layer._contract_forward = lambda x: _SlowBackward.apply(contract_forward(x))
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)  # training mode, gradients on: measured with the backward pass
    assert layer.choose_path(x.shape) == "rebuild"
    # the measurement left no gradient behind: one backward gives the reference's gradients
    assert all(p.grad is None for p in layer.parameters()) and x.grad is None
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, q in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    layer.eval()
    with torch.no_grad():
        layer(x)  # an inference call is timed forward only
    assert layer.choose_path(x.shape, inference=True) == "contract"


def test_fuse_with_an_example_keeps_layers_that_prefer_rebuilding():
    torch.manual_seed(4)
    model = nn.Sequential(FactorizedConv2d(8, 16, 3, 1, 1, format="str", rank=8, forward_path="rebuild"),
                          FactorizedConv2d(16, 16, 3, 1, 1, format="stt", rank=4, forward_path="contract")).eval()
    x = torch.randn(4, 8, 8, 8)
    fused = fuse(model, example=x, decide="cost")
    assert isinstance(fused[0], stpnet.nn.FactorizedLayer) and fused[0].forward_path == "rebuild"
    assert isinstance(fused[1], FusedLayer)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(isinstance(m, FusedLayer) for m in fuse(model)) is True


def test_fuse_with_an_example_measures_each_layer_and_keeps_the_fastest_form(monkeypatch):
    import stpnet.deploy.fused as fused_module

    torch.manual_seed(5)
    model = nn.Sequential(FactorizedConv2d(8, 16, 3, 1, 1, format="str", rank=8),
                          FactorizedConv2d(16, 16, 3, 1, 1, format="stt", rank=4),
                          FactorizedConv2d(16, 16, 3, 1, 1, format="tr", rank=4)).eval()
    x = torch.randn(2, 8, 8, 8)
    # per layer: the fused chain's time with each grouped-stage form (depth, fold, stacked, block),
    # each plain conv form (plain, merged_in, merged_out, dense, and onepass where the native kernel
    # is built), then the rebuilt dense op's
    onepass = [4.0] if onepass_available() else []
    tables = iter([[2.0, 3.0, 2.5, 2.2, 1.5, 1.5, 1.5, 1.5, *onepass, 1.0],
                   [3.0, 1.0, 2.0, 1.1, 2.0, 2.0, 2.0, 2.0, *onepass, 2.0],
                   [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.5, 3.0, *onepass, 2.0]])

    def fake_times(runs, device, rounds=3, repeats=2):
        for run in runs.values():
            run()
        values = next(tables)
        assert list(runs)[-1] == "rebuild" and len(values) == len(runs)
        return dict(zip(runs, values))

    monkeypatch.setattr(fused_module, "interleaved_best_times", fake_times)
    # the whole-model check: the chosen forms faster than every layer on its dense weight
    monkeypatch.setattr(fused_module, "_model_time",
                        lambda m, x: 2.0 if all(layer.form == "dense" for layer in m.modules() if isinstance(layer, FusedLayer))
                        else 1.0)
    fused = fuse(model, example=x)
    assert isinstance(fused[0], stpnet.nn.FactorizedLayer) and fused[0].forward_path == "rebuild"
    assert isinstance(fused[1], FusedLayer) and fused[1].spatial_stage == "fold" and fused[1].form == "chain"
    assert isinstance(fused[2], FusedLayer) and fused[2].form == "merged_out"
    assert next(tables, None) is None
    monkeypatch.undo()
    real = fuse(model, example=x)  # real timings: either form, the same function
    assert all(isinstance(m, FusedLayer) or m.forward_path == "rebuild" for m in real)
    with torch.no_grad():
        torch.testing.assert_close(real(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="decide must be 'measure' or 'cost'"):
        fuse(model, example=x, decide="guess")


def test_fuse_with_an_example_keeps_the_dense_forms_when_the_whole_model_runs_faster_so(monkeypatch):
    """Per-layer choices that lose inside the network: the whole model measured slower than on its
    rebuilt dense weights runs every fused layer in the 'dense' form (the same function)."""
    import stpnet.deploy.fused as fused_module

    torch.manual_seed(6)
    model = nn.Sequential(FactorizedConv2d(8, 16, 3, 1, 1, format="stt", rank=4),
                          nn.ReLU(), FactorizedConv2d(16, 8, 1, format="tr", rank=3)).eval()
    x = torch.randn(2, 8, 8, 8)
    monkeypatch.setattr(fused_module, "interleaved_best_times", lambda runs, device: dict.fromkeys(runs, 1.0))
    calls = []

    def model_time(m, inp):
        dense = all(layer.form == "dense" for layer in m.modules() if isinstance(layer, FusedLayer))
        calls.append(dense)
        return 1.0 if dense else 3.0

    monkeypatch.setattr(fused_module, "_model_time", model_time)
    fused = fuse(model, example=x)
    assert calls == [False, True] * 3  # alternating rounds
    layers = [m for m in fused.modules() if isinstance(m, FusedLayer)]
    assert len(layers) == 2 and all(m.form == "dense" for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(fused_module, "_model_time", lambda m, inp: 3.0 if model_time(m, inp) == 1.0 else 1.0)
    kept = fuse(model, example=x)
    assert all(m.form != "dense" for m in kept.modules() if isinstance(m, FusedLayer))


def test_forms_are_timed_in_alternating_rounds():
    from stpnet.nn._timing import interleaved_best_times

    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleaved_best_times(runs, torch.device("cpu"), rounds=2, repeats=1)
    # each round: every candidate's warm-up and timed call, then the next candidate
    assert calls == ["a", "a", "b", "b", "c", "c"] * 2
    assert set(times) == {"a", "b", "c"} and all(0 <= t < 1 for t in times.values())
