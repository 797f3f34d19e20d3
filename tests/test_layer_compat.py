"""Compatibility of the factorized layers with the PyTorch ecosystem.

Every (format, layout, t) combination (conftest.COMBOS, read from the registries) is checked
with a small FactorizedConv2d and a small FactorizedLinear, on both forward paths, for:
state_dict round trips, torch.jit.trace, torch.export, torch.compile, ONNX export run in
onnxruntime, channels_last inputs, CPU autocast (bfloat16 and float16) and, where a GPU is
present, CUDA against CPU.

The heavy checks (ONNX through the dynamo exporter, torch.compile) run each combination on one
path per layer kind, alternating, and with the opposite alternation from each other, so that
between them every (combination, kind, path) triple goes through one heavy backend; they are in
the slow tier. The cheap checks (the legacy ONNX exporter and torch.export among them) run all
of them.
"""

from __future__ import annotations

import inspect
import io
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import COMBO_IDS, COMBOS, combo_id
from stpnet.nn import FactorizedConv2d, FactorizedLinear

PATHS = ("rebuild", "contract")
KINDS = ("conv", "linear")

# layer geometry: 8 -> 16 channels, 3x3, stride 2, padding 1 on a 9x9 input; 12 -> 16 features
C_IN, C_OUT, KERNEL, STRIDE, PADDING, SIDE = 8, 16, 3, 2, 1, 9
F_IN, F_OUT = 12, 16
RANK = 4


combo_params = pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
path_params = pytest.mark.parametrize("path", PATHS)
kind_params = pytest.mark.parametrize("kind", KINDS)


def make_layer(kind: str, combo, path: str, seed: int = 0, stride: int = STRIDE, **kw):
    """A freshly initialised layer; ``seed`` drives the random factors and bias."""
    fmt, layout, t = combo
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "conv":
            return FactorizedConv2d(C_IN, C_OUT, KERNEL, stride, PADDING, format=fmt, rank=RANK, t=t,
                                    layout=layout, forward_path=path, **kw)
        return FactorizedLinear(F_IN, F_OUT, format=fmt, rank=RANK, t=t, layout=layout,
                                forward_path=path, **kw)


def make_input(kind: str, seed: int = 100, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    shape = (batch, C_IN, SIDE, SIDE) if kind == "conv" else (batch, F_IN)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The dense op on the rebuilt weight: what nn.Conv2d / nn.Linear would compute."""
    w = layer.weight
    if isinstance(layer, FactorizedConv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, w, layer.bias)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def heavy_cases(offset: int):
    """(combo, kind, path) with one path per kind and combination, alternating."""
    cases = []
    for i, combo in enumerate(COMBOS):
        for j, kind in enumerate(KINDS):
            path = PATHS[(i + j + offset) % 2]
            cases.append(pytest.param(combo, kind, path, id=f"{combo_id(combo)}-{kind}-{path}"))
    return cases


heavy_params = pytest.mark.parametrize("combo,kind,path", heavy_cases(0))
heavy_params_flipped = pytest.mark.parametrize("combo,kind,path", heavy_cases(1))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These shapes are tiny: one intra-op thread avoids OpenMP wake-up latency (tens of ms per
    parallel region on small CI machines), which otherwise dominates this file's runtime."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_layers_match_dense_reference():
    """Sanity of the fixtures: every configuration builds and both paths agree with the dense op."""
    for combo in COMBOS:
        for kind in KINDS:
            x = make_input(kind)
            for path in PATHS:
                layer = make_layer(kind, combo, path)
                y = layer(x)
                assert y.shape == ((2, C_OUT, 5, 5) if kind == "conv" else (2, F_OUT))
                torch.testing.assert_close(y, dense_reference(layer, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- state_dict
@combo_params
@path_params
@kind_params
def test_state_dict_roundtrip(combo, path, kind):
    src = make_layer(kind, combo, path, seed=0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors only: safe loading works

    dst = make_layer(kind, combo, path, seed=1)
    x = make_input(kind)
    assert not torch.allclose(dst(x), src(x)), "different seeds should give different layers"
    assert set(dst.state_dict()) == set(state)
    dst.load_state_dict(state, strict=True)
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(dst(x), src(x))

    # the state is independent of the forward path: load it into the other path's layer
    other = make_layer(kind, combo, PATHS[1 - PATHS.index(path)], seed=2)
    other.load_state_dict(state, strict=True)
    torch.testing.assert_close(other(x), src(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- jit.trace
@combo_params
@path_params
@kind_params
def test_jit_trace(combo, path, kind):
    layer = make_layer(kind, combo, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning on the input-shape checks; deprecations
        traced = torch.jit.trace(layer, (make_input(kind, seed=1),))
    x = make_input(kind, seed=2)  # a new input of the same shape
    torch.testing.assert_close(traced(x), layer(x))


# --------------------------------------------------------------------------- torch.export
@combo_params
@path_params
@kind_params
def test_torch_export(combo, path, kind):
    """Exported with a dynamic batch dimension; run on the example's shape and on another batch."""
    layer = make_layer(kind, combo, path)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(layer, (make_input(kind, seed=1),), dynamic_shapes={"x": {0: batch}})
    module = ep.module()
    for x in (make_input(kind, seed=2), make_input(kind, seed=3, batch=5)):
        torch.testing.assert_close(module(x), layer(x))


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@heavy_params_flipped
def test_torch_compile_aot_eager(combo, kind, path):
    """fullgraph (no graph breaks) through dynamo and AOTAutograd; forward and gradients match."""
    torch._dynamo.reset()
    layer = make_layer(kind, combo, path)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = make_input(kind, seed=2).requires_grad_()
    y_c = compiled(x)
    y_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    y_e = layer(x)
    y_e.square().sum().backward()
    grads_e = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    torch.testing.assert_close(y_c, y_e)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e)
    torch._dynamo.reset()


@pytest.mark.skipif(os.environ.get("STPNET_TEST_INDUCTOR") != "1",
                    reason="inductor's first CPU compile (C++ codegen) takes ~40 s on 2 cores; "
                           "set STPNET_TEST_INDUCTOR=1 to run it")
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_inductor():
    torch._dynamo.reset()
    layer = make_layer("conv", ("stt", "sequential", 2), "contract")
    compiled = torch.compile(layer)
    x = make_input("conv", seed=2)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- ONNX
def _onnx_run(path_or_bytes, inputs: dict) -> list:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@pytest.mark.slow
@heavy_params
def test_onnx_export_onnxruntime(combo, kind, path, tmp_path):
    """The default (dynamo) exporter, which needs onnxscript; a dynamic batch dimension."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    layer = make_layer(kind, combo, path).eval()
    file = tmp_path / "layer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (make_input(kind, seed=1),), str(file), dynamo=True,
                          input_names=["x"], output_names=["y"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    onnx.checker.check_model(str(file))
    for x in (make_input(kind, seed=2), make_input(kind, seed=3, batch=5)):
        (y,) = _onnx_run(str(file), {"x": x.numpy()})
        with torch.no_grad():
            ref = layer(x)
        torch.testing.assert_close(torch.from_numpy(y), ref, rtol=1e-4, atol=1e-4)


_LEGACY_CASES = [
    pytest.param(combo, kind, path, id=f"{combo_id(combo)}-{kind}-{path}")
    for combo in COMBOS for kind in KINDS for path in PATHS
]


@pytest.mark.skipif("dynamo" not in inspect.signature(torch.onnx.export).parameters,
                    reason="this torch has no dynamo= switch on torch.onnx.export")
@pytest.mark.parametrize("combo,kind,path", _LEGACY_CASES)
def test_onnx_legacy_exporter(combo, kind, path):
    """The TorchScript-based exporter (dynamo=False): the default of torch.onnx.export before
    torch 2.9, so what users of torch 2.1-2.8 (allowed by the requirements) get."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    layer = make_layer(kind, combo, path).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (make_input(kind, seed=1),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"])
    x = make_input(kind, seed=2)
    (y,) = _onnx_run(buf.getvalue(), {"x": x.numpy()})
    with torch.no_grad():
        ref = layer(x)
    torch.testing.assert_close(torch.from_numpy(y), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- channels_last
@combo_params
@path_params
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_input(combo, path, stride):
    layer = make_layer("conv", combo, path, stride=stride)
    x = make_input("conv", seed=2)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)

    x1, x2 = x.clone().requires_grad_(), x_cl.clone().requires_grad_()
    y = layer(x1)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y_cl = layer(x2)
    y_cl.square().sum().backward()
    torch.testing.assert_close(y_cl, y)
    torch.testing.assert_close(x2.grad, x1.grad)
    # the weight gradient of a channels_last convolution reduces over N*H*W in another order
    # (as with a dense nn.Conv2d), hence a tolerance relative to the gradient's scale
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))

    # the usual model-level conversion leaves the layer working and its output unchanged
    layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(layer(x_cl), y.detach())


# --------------------------------------------------------------------------- autocast
def _cpu_autocast_dtype(dtype: torch.dtype) -> torch.dtype:
    """What F.linear returns under CPU autocast to ``dtype`` (float32 when unsupported)."""
    a = torch.ones(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            return F.linear(a, a).dtype


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
@combo_params
@path_params
@kind_params
def test_autocast_close_to_float32(dtype, combo, path, kind):
    if _cpu_autocast_dtype(dtype) != dtype:
        pytest.skip(f"CPU autocast does not support {dtype} in torch {torch.__version__}")
    layer = make_layer(kind, combo, path)
    x = make_input(kind, seed=2)
    with torch.no_grad():
        y32 = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype in (dtype, torch.float32)
    assert torch.isfinite(y).all()
    assert rel_err(y, y32) < 3e-2
    y.float().square().sum().backward()  # mixed-precision training step
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name


@combo_params
@pytest.mark.parametrize("path", PATHS)
@kind_params
def test_autocast_output_dtype_matches_dense(combo, path, kind):
    """Under autocast the output dtype is that of the dense op, whichever path runs (with
    forward_path='auto' the path, and so the dtype, would otherwise depend on the input shape)."""
    layer = make_layer(kind, combo, path)
    x = make_input(kind, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = dense_reference(layer, x).dtype
        y = layer(x)
    assert expected == torch.bfloat16
    assert y.dtype == expected


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@combo_params
@path_params
@kind_params
def test_cuda_matches_cpu(dtype, combo, path, kind):
    """Outputs and gradients (factors, bias, input) on CUDA match CPU.

    float64 is compared tightly; float32 loosely, since convolutions may use TF32 on CUDA.
    """
    cpu = make_layer(kind, combo, path).to(dtype)
    gpu = make_layer(kind, combo, path).to(dtype).cuda()
    assert all(p.is_cuda for p in gpu.parameters())
    x = make_input(kind, seed=2, dtype=dtype)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu, y_gpu = cpu(x_cpu), gpu(x_gpu)
    assert y_gpu.is_cuda and y_gpu.dtype == dtype
    g = torch.randn(y_cpu.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    y_cpu.backward(g)
    y_gpu.backward(g.cuda())

    pairs = [("output", y_gpu, y_cpu), ("input grad", x_gpu.grad, x_cpu.grad)]
    pairs += [(f"grad {n}", pg.grad, pc.grad)
              for (n, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters())]
    for name, a, b in pairs:
        assert a is not None and a.is_cuda, name
        if dtype == torch.float64:
            torch.testing.assert_close(a.cpu(), b, msg=name)
        else:
            assert rel_err(a, b) < 1e-2, name
