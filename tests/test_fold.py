"""Folding eval-mode BatchNorm into dense and fused convolutions (stpnet.fold_batchnorm).

A test that takes ``combo`` runs for every (format, layout, t) combination of the registries
(the ``combo`` fixture of conftest.py)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import stpnet
from stpnet.models import resnet20
from stpnet.deploy.fold import fold_batchnorm
from stpnet.deploy.fused import FusedLayer, fuse, fuse_layer
from stpnet.nn import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = {1: (FactorizedConv1d, nn.BatchNorm1d), 2: (FactorizedConv2d, nn.BatchNorm2d),
         3: (FactorizedConv3d, nn.BatchNorm3d)}


def _norm(kind, channels: int, seed: int, dtype=torch.float64) -> nn.Module:
    """A BatchNorm with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    norm = kind(channels, eps=1e-3).to(dtype)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(channels, generator=g, dtype=dtype))
        norm.running_var.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.2)
        norm.weight.copy_(torch.randn(channels, generator=g, dtype=dtype))
        norm.bias.copy_(torch.randn(channels, generator=g, dtype=dtype))
    return norm.eval()


def _fused_block(combo, dims: int, bias: bool):
    fmt, layout, t = combo
    conv_kind, norm_kind = CONVS[dims]
    torch.manual_seed(3)
    conv = conv_kind(8, 16, 3, 1, 1, bias=bias, format=fmt, rank=4, t=t, layout=layout, dtype=torch.float64)
    net = nn.Sequential(fuse_layer(conv), _norm(norm_kind, 16, seed=dims), nn.ReLU()).eval()
    x = torch.randn(2, 8, *([6] * dims), dtype=torch.float64)
    return net, x


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_folded_fused_layer_computes_conv_then_batchnorm_in_every_form(combo, dims):
    net, x = _fused_block(combo, dims, bias=dims == 2)
    with torch.no_grad():
        expected = net(x)
    conv, norm = net[0], net[1]
    # the reference weight: the unfolded dense weight with rows scaled, as torch's own fusion does
    dense_conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](8, 16, 3, padding=1, bias=conv.bias is not None,
                                                             dtype=torch.float64)
    with torch.no_grad():
        dense_conv.weight.copy_(conv.weight)
        if conv.bias is not None:
            dense_conv.bias.copy_(conv.bias)
    reference = fuse_conv_bn_eval(dense_conv.eval(), norm)
    n_params = sum(p.numel() for p in conv.parameters())
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity) and isinstance(net[1], type(norm))  # a copy by default
    fused = folded[0]
    assert fused.output_scale is not None
    # parameters stay the factors (plus the folded bias where there was none)
    assert sum(p.numel() for p in fused.parameters()) == n_params + (16 if conv.bias is None else 0)
    for form in fused.forms:
        fused.form = form
        with torch.no_grad():
            got = folded(x)
            again = folded(x)  # cached forms and plans
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=form)
        torch.testing.assert_close(again, expected, rtol=1e-10, atol=1e-12, msg=form)
    torch.testing.assert_close(fused.weight, reference.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.bias, reference.bias, rtol=1e-10, atol=1e-12)
    # with gradients (no in-place update) the same values, and gradients reach the factors
    fused.form = "chain"
    folded.train()
    out = folded(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_inference_in_place_update_leaves_the_input_and_earlier_outputs_alone():
    net, x = _fused_block(("stt", "sequential", 2), 2, bias=True)
    folded = fold_batchnorm(net)
    folded[0].form = "chain"
    before = x.clone()
    with torch.no_grad():
        first = folded[0](x)
        kept = first.clone()
        second = folded[0](x)
    assert torch.equal(x, before)
    assert torch.equal(first, kept)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), c_in=st.integers(1, 6), c_out=st.integers(1, 6), groups_one=st.booleans(),
       bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 10_000))
def test_dense_convolutions_fold_like_torch_fusion(dims, c_in, c_out, groups_one, bias, affine, seed):
    groups = 1 if groups_one else c_in
    if c_out % groups:
        c_out = groups * c_out
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](c_in, c_out, 3, padding=1, groups=groups, bias=bias,
                                                       dtype=torch.float64)
    norm = _norm((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1], c_out, seed)
    if not affine:
        norm = type(norm)(c_out, eps=norm.eps, affine=False, dtype=torch.float64).eval()
        norm.running_mean.copy_(torch.randn(c_out, dtype=torch.float64))
    net = nn.Sequential(conv, norm).eval()
    x = torch.randn(2, c_in, *([5] * dims), dtype=torch.float64)
    folded = fold_batchnorm(net)
    reference = fuse_conv_bn_eval(copy.deepcopy(conv).eval(), copy.deepcopy(norm))
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded[0].weight, reference.weight)
    torch.testing.assert_close(folded[0].bias, reference.bias)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x))


class _Residual(nn.Module):
    """conv -> bn where the conv output also feeds a second branch: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _SharedNorm(nn.Module):
    """One BatchNorm called after two convolutions: not foldable into either."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class _Branching(nn.Module):
    """Data-dependent control flow at the top (not traceable); a traceable block inside."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


class _AliasedNorm(nn.Module):
    """The BatchNorm registered under two names, reached by the second: it must not run after folding."""

    def __init__(self):
        super().__init__()
        conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.last_bn = bn
        self.body = nn.Sequential(conv, bn)

    def forward(self, x):
        return self.body(x)


class _WeightReadElsewhere(nn.Module):
    """conv -> bn, and the conv's weight read by another op: folding would change that op."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight)


class _NormWeightReadElsewhere(_WeightReadElsewhere):
    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.reshape(1, -1, 1, 1)


def _randomize_norms(model: nn.Module) -> nn.Module:
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("model, folds", [
    (_Residual(), 0),
    (_SharedNorm(), 0),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), 0),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), 0),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)), 0),  # the BatchNorm1d axis is not checked
    (_Branching(), 1),
    (_AliasedNorm(), 1),
    (_WeightReadElsewhere(), 0),
    (_NormWeightReadElsewhere(), 0),
], ids=["residual", "shared-norm", "batch-statistics", "after-relu", "linear", "untraceable-top", "aliased-norm",
        "conv-weight-read", "norm-weight-read"])
def test_only_what_the_dataflow_allows_is_folded(model, folds):
    model = _randomize_norms(model)
    x = torch.randn(2, 4 if isinstance(model, (_Residual, _SharedNorm)) else 3, 2, 2)
    with torch.no_grad():
        expected = model(x)
    folded = fold_batchnorm(model)
    n_before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert n_before - n_after == folds
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected)


def test_a_model_that_cannot_be_traced_anywhere_is_left_with_a_warning():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else self.bn(self.conv(-x))

    with pytest.warns(UserWarning, match="could trace .* and were not folded: bn"):
        folded = fold_batchnorm(Opaque().eval())
    assert isinstance(folded.bn, nn.BatchNorm2d)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fold_batchnorm(torch.zeros(3))


@pytest.mark.slow
def test_fuse_can_fold_a_whole_compressed_network_and_it_still_exports():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(4)
    dense = _randomize_norms(resnet20())
    small, _ = stpnet.compress(dense, "stt", compression=9, t=2)
    small.eval()
    folded = fuse(small, fold_batchnorm=True).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every BN follows a conv here
    assert sum(isinstance(m, FusedLayer) and m.output_scale is not None for m in folded.modules()) >= 18
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = small(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(folded, x)
            torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-4)
            buffer = io.BytesIO()
            torch.onnx.export(folded, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)
    # for a batch: measured forms, then folded; the same function
    for_batch = fuse(small, example=x, fold_batchnorm=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(for_batch(x), expected, rtol=1e-4, atol=1e-4)


def test_a_changed_output_scale_or_a_reloaded_state_reaches_the_cached_forms():
    net, x = _fused_block(("stt", "sequential", 2), 2, bias=True)
    folded = fold_batchnorm(net)
    layer = folded[0]
    for form in ("dense", "plain"):
        layer.form = form
        with torch.no_grad():
            before = layer(x)
            layer.output_scale.mul_(2)
            after = layer(x)
            layer.output_scale.div_(2)
        torch.testing.assert_close(after - layer.bias.reshape(1, -1, 1, 1),
                                   2 * (before - layer.bias.reshape(1, -1, 1, 1)))
    # a folded state_dict loads into a model folded the same way and gives its outputs
    torch.manual_seed(9)
    other, _ = _fused_block(("stt", "sequential", 2), 2, bias=True)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other = fold_batchnorm(other)
    other.load_state_dict(folded.state_dict())
    other[0].form = folded[0].form = "chain"
    with torch.no_grad():
        torch.testing.assert_close(other(x), folded(x))
