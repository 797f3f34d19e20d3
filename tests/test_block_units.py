"""Block fitting on networks stpnet did not build: which module is fitted as one block."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

import stpnet
from stpnet.recovery import fit_to_activations


class UserBlock(nn.Module):
    """A user's residual block: two 3x3 convs and a projection shortcut ``nn.Sequential(conv, bn)``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sh = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sh(x))


class WrappedBlock(nn.Module):
    """A block whose convolutions each sit in an ``nn.Sequential(conv, bn[, relu])``."""

    def __init__(self, width: int):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return F.relu(self.second(self.first(x)) + x)


def _user_resnet() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          WrappedBlock(8), UserBlock(8, 16, 2), UserBlock(16, 16, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics
        x = torch.randn(64, 3, 12, 12)
        model.train()
        for _ in range(3):
            model(x)
    return model.eval()


def test_a_block_with_a_sequential_shortcut_is_fitted_as_one_unit():
    dense = _user_resnet()
    compressed, _ = stpnet.compress(dense, "stt", rank=4, t=2, include=["3.*", "4.*", "5.*"])
    images = torch.randn(96, 3, 12, 12)
    before = copy.deepcopy(compressed)
    report = fit_to_activations(compressed, dense, images, steps=10, batch_size=48, unit="block")
    # one unit per residual block: the shortcut's conv is fitted with c1 and c2 through block "4",
    # and the wrapped convs through block "3" (not "3.first", "3.second" or "4.sh")
    assert [f.name for f in report.layers] == ["3", "4", "5"]
    held_out = torch.randn(48, 3, 12, 12)
    for name in ("3", "4", "5"):
        target = _output(dense, name, held_out)
        err_before = (_output(before, name, held_out) - target).norm() / target.norm()
        err_after = (_output(compressed, name, held_out) - target).norm() / target.norm()
        assert err_after < err_before, name


def test_layers_directly_under_the_model_are_fitted_one_at_a_time():
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6)).eval()
    compressed, compression = stpnet.compress(dense, "tt", rank=3, include=["0", "2"])
    assert sorted(compression.ranks) == ["0", "2"]
    report = fit_to_activations(compressed, dense, torch.randn(64, 12), steps=5, unit="block")
    assert [f.name for f in report.layers] == ["0", "2"]


def _output(model: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.setdefault("y", out))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return captured["y"]
