"""Linear-like layers (a Linear storing its weight transposed, as HuggingFace's ``Conv1D``): the
probe that recognises one must not run the module's hooks, so code that asks for a layer's type
inside a forward hook (the activation criterion of the rank allocation) sees only real inputs."""

from __future__ import annotations

import torch
from torch import nn

from stpnet.discovery import eligible_layers
from stpnet.nn import layer_type
from stpnet.recovery import allocate_ranks
from test_linear_like import TransposedLinear  # HuggingFace's Conv1D, written without transformers


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.a, self.b, self.head = layer(48, 32), layer(32, 48), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _as_linear_net(net: Net) -> Net:
    """The same function with nn.Linear layers (the independent reference)."""
    ref = Net(lambda out_f, in_f: nn.Linear(in_f, out_f))
    with torch.no_grad():
        for name in ("a", "b"):
            ref.get_submodule(name).weight.copy_(net.get_submodule(name).weight.T)
            ref.get_submodule(name).bias.copy_(net.get_submodule(name).bias)
        ref.head.load_state_dict(net.head.state_dict())
    return ref


def test_recognising_a_linear_like_layer_runs_none_of_its_hooks():
    torch.manual_seed(0)
    net = Net(TransposedLinear)
    calls = []
    net.a.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    net.a.register_forward_hook(lambda module, args, output: calls.append("post"))
    assert layer_type(net.a).name == "linear_like"
    assert eligible_layers(net) == ["a", "b"]
    assert calls == []
    net(torch.randn(2, 32))
    assert calls == ["pre", "post"]


def test_activation_allocation_of_linear_like_layers_equals_that_of_the_linears():
    torch.manual_seed(0)
    net = Net(TransposedLinear)
    reference = _as_linear_net(net)
    x = torch.randn(64, 32)
    torch.testing.assert_close(net(x), reference(x))
    got = allocate_ranks(net, "tt", 2.0, criterion="activation", images=x, layers=["a", "b"])
    want = allocate_ranks(reference, "tt", 2.0, criterion="activation", images=x, layers=["a", "b"])
    assert got.ranks == want.ranks
    assert got.layer_params == want.layer_params
    for name in ("a", "b"):
        assert abs(got.layer_errors[name] - want.layer_errors[name]) < 1e-6
