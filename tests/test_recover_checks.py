"""``stpnet.recover``: an argument that would be ignored is refused, a network whose linear layers
store their weight transposed (HuggingFace's ``Conv1D``) is fitted through its dense form, and
fitting an attention model without it says to use it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stpnet
from stpnet.recovery import fit_to_activations
from test_linear_like_probe import Net, TransposedLinear


def test_bn_calibration_without_the_batchnorm_step_is_refused():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    small, _ = stpnet.compress(dense, "tt", rank=4)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    x = torch.randn(8, 3, 8, 8)
    with pytest.raises(ValueError, match="bn_calibration .* needs recalibrate_bn"):
        stpnet.recover(small, dense, x, fit_steps=0, bn_calibration=x)
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())  # nothing ran


def test_recover_fits_factorized_layers_that_replaced_transposed_linears():
    torch.manual_seed(0)
    dense = Net(TransposedLinear).eval()
    small, report = stpnet.compress(dense, "tt", rank=3)
    assert sorted(report.ranks) == ["a", "b"]
    x = torch.randn(128, 32)
    recovery = stpnet.recover(small, dense, x, fit_steps=20, fit_unit="layer")
    errors = {f.name: f for f in recovery.fit.layers}
    assert sorted(errors) == ["a", "b"]
    assert all(f.error_after < f.error_before for f in errors.values())
    # the error the report gives is the network's: against the dense layer's own output
    with torch.no_grad():
        y_dense = dense.a(x)
        y_small = small.a(x)
    measured = float((y_small - y_dense).norm() / y_dense.norm())
    assert abs(measured - errors["a"].error_after) < 0.05


def test_fitting_to_a_dense_attention_directly_points_to_recover():
    torch.manual_seed(1)
    dense = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(64, 3)).eval()
    small, _ = stpnet.compress(dense, "tt", rank=4)
    x = torch.randn(8, 4, 16)
    with pytest.raises(ValueError, match=r"projection of the attention '0.self_attn'.*stpnet.recover"):
        fit_to_activations(small, dense, x, steps=2)
    recovery = stpnet.recover(small, dense, x, fit_steps=2, fit_unit="layer")  # the remedy the message gives
    assert "0.self_attn.in_proj" in {f.name for f in recovery.fit.layers}
