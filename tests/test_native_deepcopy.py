"""A fused model that has cached its native onepass kernel can be deep-copied (``export`` copies the
model it is given): the kernel object never changes after it is made, so the copy shares it, and a
copy whose weights are then edited computes with its own weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stpnet
from stpnet.deploy.native.onepass import OnepassConv2d, onepass_available

needs_native = pytest.mark.skipif(not onepass_available(), reason="no native onepass kernel here")


@needs_native
def test_a_onepass_kernel_deep_copies_to_itself_and_still_runs():
    torch.manual_seed(0)
    W_in, W_mid, W_out = torch.randn(4, 6), torch.randn(5, 4, 3, 3), torch.randn(8, 5)
    op = OnepassConv2d(W_in, W_mid, W_out, (1, 1), (1, 1), torch.randn(8))
    holder = nn.Module()
    holder.__dict__["kernel"] = op  # as a fused layer caches it
    twin = copy.deepcopy(holder)
    assert twin.__dict__["kernel"] is op
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(twin.__dict__["kernel"](x), op(x))


def _cached_values(module: nn.Module) -> list:
    """Whatever ``module`` keeps in its instance dict, one level of containers opened."""
    out = []
    for value in vars(module).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


@needs_native
def test_a_fused_model_deep_copies_after_a_forward_and_its_copy_follows_its_own_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    small, _ = stpnet.compress(net.eval(), "tt", rank=4, keep_first_conv=False)
    forms = {name: "onepass" for name, m in small.named_modules() if isinstance(m, stpnet.nn.FactorizedLayer)
             and len(m.kernel_size) == 2}
    x = torch.randn(2, 3, 8, 8)
    fused = stpnet.fuse(small, forms=forms).eval()
    with torch.no_grad():
        fused(x)
        expected = fused(x)  # the kernel is cached now
        assert any(isinstance(v, OnepassConv2d) for m in fused.modules() for v in _cached_values(m))
        twin = copy.deepcopy(fused)
        torch.testing.assert_close(twin(x), expected)
        for p in twin.parameters():
            p.data.mul_(1.25)
        reference = stpnet.fuse(small, forms=stpnet.deploy.fused.fused_forms(twin)).eval()
        reference.load_state_dict(twin.state_dict())
        torch.testing.assert_close(twin(x), reference(x))
        assert not torch.allclose(twin(x), expected)
