"""``stpnet.recover``, the recovery step after ``compress``, and the deprecated recovery arguments
of ``compress`` that run it: both paths build the same model and report."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import stpnet
from stpnet.recovery import FitReport, RecoveryReport


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8), Block(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
    return model.eval()


def small_transformer() -> nn.Module:
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(16 * 4, 3)).eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("fit_unit, recalibrate_bn", [("block", False), ("layer", True), ("block", "keep_function")])
def test_recover_after_compress_equals_the_deprecated_arguments(fit_unit, recalibrate_bn):
    dense = small_cnn()
    calibration = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with pytest.warns(DeprecationWarning, match="stpnet.recover"):
        old, old_report = stpnet.compress(dense, "stt", rank=4, t=2, calibration=calibration, fit_steps=3,
                                          fit_unit=fit_unit, recalibrate_bn=recalibrate_bn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new, report = stpnet.compress(dense, "stt", rank=4, t=2)
        recovery = stpnet.recover(new, dense, calibration, fit_steps=3, fit_unit=fit_unit,
                                  recalibrate_bn=recalibrate_bn)
    assert isinstance(recovery, RecoveryReport) and isinstance(recovery.fit, FitReport)
    assert_same_state(old, new)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(old(x), new(x))
    new_report = report.with_recovery(recovery)
    assert new_report == old_report
    assert new_report.fit.unit == fit_unit and new_report.bn_recalibrated == recalibrate_bn
    # the fit did something: some error fell
    assert any(f.error_after < f.error_before for f in recovery.fit.layers)
    assert report.fit is None and report.bn_recalibrated is False  # compress alone: structure only


def test_recover_pairs_unpacked_attention_with_the_dense_attention():
    dense = small_transformer()
    calibration = torch.randn(16, 4, 16, generator=torch.Generator().manual_seed(3))
    for attention in ("packed", "separate"):
        with pytest.warns(DeprecationWarning):
            old, old_report = stpnet.compress(dense, "tt", rank=4, attention=attention, calibration=calibration,
                                              fit_steps=2, fit_unit="layer")
        new, report = stpnet.compress(dense, "tt", rank=4, attention=attention)
        recovery = stpnet.recover(new, dense, calibration, fit_steps=2, fit_unit="layer")
        assert_same_state(old, new)
        assert report.with_recovery(recovery) == old_report
        names = {f.name for f in recovery.fit.layers}
        assert ("0.self_attn.in_proj" in names) == (attention == "packed")
        assert isinstance(dense[0].self_attn, nn.MultiheadAttention)  # the dense model is not modified


def test_recover_bn_calibration_is_used_for_the_batchnorm_step():
    dense = small_cnn()
    calibration = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    other = calibration * 3 + 1
    a, _ = stpnet.compress(dense, "tt", rank=4)
    b, _ = stpnet.compress(dense, "tt", rank=4)
    c, _ = stpnet.compress(dense, "tt", rank=4)
    stpnet.recover(a, dense, calibration, fit_steps=0, recalibrate_bn=True, bn_calibration=other)
    stpnet.recover(b, dense, other, fit_steps=0, recalibrate_bn=True)
    stpnet.recover(c, dense, calibration, fit_steps=0, recalibrate_bn=True)
    assert_same_state(a, b)
    assert not torch.equal(a[1].running_mean, c[1].running_mean)


def test_recover_without_steps_changes_nothing():
    dense = small_cnn()
    small, _ = stpnet.compress(dense, "tt", rank=4)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    recovery = stpnet.recover(small, dense, torch.randn(8, 3, 8, 8), fit_steps=0)
    assert recovery == RecoveryReport(None, False)
    for key, value in small.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("options, message", [
    ({"fit_unit": "net"}, "fit_unit must be one of"),
    ({"fit_steps": -1}, "fit_steps must be an int >= 0"),
    ({"fit_steps": 1.5}, "fit_steps must be an int >= 0"),
    ({"recalibrate_bn": "yes"}, "recalibrate_bn must be False, True or 'keep_function'"),
])
def test_recover_refuses_bad_options(options, message):
    dense = small_cnn()
    small, _ = stpnet.compress(dense, "tt", rank=4)
    with pytest.raises(ValueError, match=message):
        stpnet.recover(small, dense, torch.randn(8, 3, 8, 8), **options)


def test_recover_refuses_missing_or_malformed_calibration():
    dense = small_cnn()
    small, _ = stpnet.compress(dense, "tt", rank=4)
    with pytest.raises(ValueError, match="calibration must be a non-empty batch"):
        stpnet.recover(small, dense, None)
    with pytest.raises(ValueError, match="calibration holds NaN"):
        stpnet.recover(small, dense, torch.full((4, 3, 8, 8), float("nan")))


def test_compress_still_checks_the_deprecated_arguments_up_front():
    dense = small_cnn()
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="need calibration inputs"):
        stpnet.compress(dense, "tt", rank=4, fit_steps=2)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="fit_unit must be one of"):
        stpnet.compress(dense, "tt", rank=4, fit_unit="net")


def test_the_structural_calibration_argument_does_not_warn():
    dense = small_cnn()
    calibration = torch.randn(16, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        small, report = stpnet.compress(dense, "tt", compression=2, allocation="activation", calibration=calibration)
    assert report.allocation == "activation" and report.fit is None
