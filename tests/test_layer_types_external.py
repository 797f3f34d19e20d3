"""A layer type defined outside stpnet (a ``LayerType`` subclass with its torch class and a
factorized class) is compressed like the built-in ones: ``compress`` and ``from_dense`` ask the
layer type for the factorized class rather than a table built when stpnet was imported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpnet
from stpnet.nn import FactorizedLinear, from_dense
from stpnet.nn import layer_types


class PlainLinear(nn.Module):
    """A Linear of its own class (not an nn.Linear subclass)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FactorizedPlainLinear(FactorizedLinear):
    """The factorized counterpart of PlainLinear: decomposed through the nn.Linear it computes."""

    @classmethod
    def from_dense(cls, layer, format="tt", **kwargs):
        linear = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            linear.bias.copy_(layer.bias)
        return super().from_dense(linear, format, **kwargs)


@pytest.fixture
def plain_linear_type():
    class PlainLinearType(layer_types.LinearType):
        name = "external_plain_linear"
        dense = PlainLinear
        factorized = FactorizedPlainLinear

    yield layer_types.LAYER_TYPES["external_plain_linear"]
    layer_types._REGISTRY.pop("external_plain_linear")  # the registry is process-wide: leave it as it was


def test_a_layer_type_registered_later_is_compressed(plain_linear_type):
    torch.manual_seed(0)
    model = nn.Sequential(PlainLinear(16, 32), nn.ReLU(), PlainLinear(32, 16), nn.Linear(16, 2)).eval()
    assert stpnet.nn.layer_type(model[0]) is plain_linear_type
    small, report = stpnet.compress(model, "tt", rank=64)  # capped at the full ranks: exact
    assert isinstance(small[0], FactorizedPlainLinear) and isinstance(small[2], FactorizedPlainLinear)
    assert sorted(report.ranks) == ["0", "2"]
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)
    layer = from_dense(model[0], "tt", rank=64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), model[0](x), rtol=1e-4, atol=1e-4)
