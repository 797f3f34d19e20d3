"""The narrow-convolution kernel of the contraction paths (stpnet.functional.conv): the same values
and gradients as torch's convolution, its input gradient computed as a forward convolution of the
flipped, transposed kernel exactly where it applies, and the training-time grouped stage forms."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stpnet.functional.conv import conv_nd, flipped_transposed_kernel
from stpnet.nn import FactorizedConv2d

CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _used_forward_input_grad(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__.startswith("_ConvInputGradByForward")


@pytest.mark.parametrize("dims,kernel,padding,dilation,groups", [
    (2, (3, 3), (1, 1), (1, 1), 1), (2, (3, 3), (1, 1), (1, 1), 3), (1, (5,), (2,), (1,), 1),
    (3, (3, 3, 3), (1, 1, 1), (1, 1, 1), 1), (2, (3, 3), (0, 0), (1, 1), 1), (2, (3, 3), (2, 2), (2, 2), 2),
    (2, (3, 1), (1, 0), (1, 1), 1), (3, (1, 3, 3), (0, 1, 1), (1, 1, 1), 1), (2, (2, 4), (1, 3), (1, 1), 1)])
def test_values_gradients_and_second_order_match_torch(dims, kernel, padding, dilation, groups):
    torch.manual_seed(0)
    x = torch.randn(3, 6, *([7] * dims), dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6 // groups, *kernel, dtype=torch.float64, requires_grad=True)
    y = conv_nd(x, w, 1, padding, dilation, groups)
    assert _used_forward_input_grad(y)
    ref = CONVS[dims - 1](x, w, None, 1, padding, dilation, groups)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # numerical checks on a small copy (their cost grows with the number of inputs squared)
    xs = torch.randn(1, 2 * groups, *([5] * dims), dtype=torch.float64, requires_grad=True)
    ws = torch.randn(2 * groups, 2, *kernel, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: conv_nd(a, b, 1, padding, dilation, groups), (xs, ws))
    if dims < 3:  # second order: the backward is differentiable (double backward)
        assert torch.autograd.gradgradcheck(lambda a, b: conv_nd(a, b, 1, padding, dilation, groups), (xs, ws))


def test_flipped_transposed_kernel_is_the_input_gradient_operator():
    """For stride 1, d/dx <g, conv(x, W)> = conv(g, flip(W^T)) with padding d(k-1) - p, per group."""
    torch.manual_seed(1)
    W = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    (expected,) = torch.autograd.grad(F.conv2d(x, W, padding=1, groups=2), x, g)
    Wt = flipped_transposed_kernel(W, 2)
    assert Wt.shape == (4, 3, 3, 3)
    torch.testing.assert_close(F.conv2d(g, Wt, padding=1, groups=2), expected)
    assert torch.equal(Wt[0, 1], W[1, 0].flip(0, 1))  # group 0: in 0 <- out 1, reversed taps


@pytest.mark.parametrize("case", ["no_grad", "stride2", "channels_last", "autocast", "bfloat16", "same", "trace"])
def test_torch_convolution_is_kept_where_the_forward_gradient_does_not_apply(case):
    torch.manual_seed(2)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    stride, padding = (2 if case == "stride2" else 1), ("same" if case == "same" else 1)
    if case == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    if case == "bfloat16":
        x, w = (x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_())
    if case == "no_grad":
        with torch.no_grad():
            y = conv_nd(x, w, stride, padding)
        assert y.grad_fn is None
        return
    if case == "trace":
        traced = torch.jit.trace(lambda a, b: conv_nd(a, b, 1, 1), (x, w))
        assert "_ConvInputGradByForward" not in str(traced.graph)
        return
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = conv_nd(x, w, stride, padding)
    assert not _used_forward_input_grad(y)
    ref = F.conv2d(x, w, None, stride, padding)
    torch.testing.assert_close(y.to(ref.dtype), ref, rtol=0.05 if case == "autocast" else 1.3e-6,
                               atol=0.1 if case == "autocast" else 1e-5)


def test_bad_weight_rank_is_refused():
    with pytest.raises(ValueError, match="weight must have 3 to 5 dimensions"):
        conv_nd(torch.randn(1, 2, 4, 4), torch.randn(2, 2))


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 4), groups=st.sampled_from([1, 2]), k=st.integers(1, 4), p=st.integers(0, 3),
       d=st.integers(1, 2), size=st.integers(5, 9), dims=st.integers(1, 2))
def test_property_any_padding_and_dilation_match_torch(c, groups, k, p, d, size, dims):
    """Wherever the flipped form applies (padding <= dilation * (k - 1)) it is used and agrees; a
    wider padding falls back to torch's convolution."""
    torch.manual_seed(c * 100 + k * 10 + p)
    ch = c * groups
    x = torch.randn(2, ch, *([size] * dims), dtype=torch.float64, requires_grad=True)
    w = torch.randn(ch, c, *([k] * dims), dtype=torch.float64, requires_grad=True)
    assume(size + 2 * p >= d * (k - 1) + 1)  # the dilated kernel fits the padded input
    y = conv_nd(x, w, 1, p, d, groups)
    assert _used_forward_input_grad(y) == (p <= d * (k - 1))
    ref = CONVS[dims - 1](x, w, None, 1, p, d, groups)
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt,t,stage", [("stt", 2, "block"), ("str", 2, "block"), ("tr", 1, "depth"),
                                         ("stt", 2, "depth"), ("stt", 2, "fold")])
def test_training_gradients_of_every_grouped_stage_form_match_the_rebuilt_layer(fmt, t, stage):
    """Forward + backward through the contraction path with a given grouped-stage form: the factor
    gradients equal those through the rebuilt dense weight (float64)."""
    from stpnet.functional.contract import sequential_conv, sequential_factors

    torch.manual_seed(3)
    layer = FactorizedConv2d(8, 8, 3, padding=1, format=fmt, rank=4, t=t, dtype=torch.float64)
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    w = layer.weight_tensor
    f = sequential_factors(w.factors, w.t, len(layer.tensorization.in_modes), has_kernel=True)
    y = sequential_conv(x, f, layer.kernel_size, layer.stride, (1, 1), layer.dilation, stage=stage)
    ref = F.conv2d(x, layer.dense_weight(), None, 1, 1)
    g = torch.randn_like(ref)
    params = [x, *w.factors]
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_default_training_stage_of_a_narrow_rank_space_is_the_block_form(monkeypatch):
    """A ResNet-20-like 16-channel STT layer at a small rank trains through the block form by
    default, and its output and gradients are those of the rebuilt layer."""
    import stpnet.functional.contract as contract

    seen = []
    original = contract.grouped_stage
    monkeypatch.setattr(contract, "grouped_stage", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    torch.manual_seed(4)
    layer = FactorizedConv2d(16, 16, 3, padding=1, format="stt", rank=6, t=2, forward_path="contract")
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    y = layer(x)
    assert seen == ["block"]
    y.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = None
    rebuilt = F.conv2d(x, layer.dense_weight(), layer.bias, 1, 1)
    torch.testing.assert_close(y, rebuilt, rtol=1e-4, atol=1e-5)
    rebuilt.square().sum().backward()
    for a, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-3)
