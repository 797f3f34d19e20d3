"""Recovery after compression: BatchNorm recalibration, data-aware fitting, rank allocation,
distillation, and their CLI flags."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpnet
from stpnet.app.cli import main
from stpnet.recovery import (activation_errors, allocate_ranks, factorized_layer_order, fit_to_activations,
                             recalibrate_batchnorm)
from stpnet.train import (FeatureTaps, TrainConfig, Trainer, distillation_loss, distillation_points,
                          feature_distillation_loss)

FORMATS = [("tucker", None), ("sttu", 2), ("tt", None), ("stt", 2), ("tr", None), ("str", 2)]


class SmallNet(nn.Module):
    """Three convolutions with BatchNorm and a classifier; widths divisible by 2 for every t = 2 format."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, as after training
        for bn in (net.bn0, net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth images (correlated pixels), as real ones are: the fit has structure to learn
    x = torch.randn(n, 3, 6, 6, generator=g)
    return F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------ BatchNorm recalibration
def test_bn_recalibration_changes_only_batchnorm_buffers():
    small, _ = stpnet.compress(_net(), "tt", rank=2)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    params = {k: p.clone() for k, p in small.named_parameters()}
    assert recalibrate_batchnorm(small, _images(64, 1), batch_size=16) == 3
    after = small.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[0].startswith("bn") and k.split(".")[-1] in
                           ("running_mean", "running_var", "num_batches_tracked") for k in changed)
    assert all(torch.equal(params[k], p) for k, p in small.named_parameters())
    assert not small.training and small.bn1.momentum == 0.1  # mode and momentum restored


def test_augmented_calibration_images_are_shifted_and_flipped_training_images():
    """augment=True: each image is its unaugmented self shifted by at most 4 pixels (zeros coming in)
    and possibly mirrored, as the trainer augments; the same seed gives the same images."""
    from stpnet.data import ImageDataset, normalize
    from stpnet.app.pipeline import calibration_images

    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=g),
                        torch.randint(0, 3, (40,), generator=g),
                        torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=g),
                        torch.randint(0, 3, (4,), generator=g), ("a", "b", "c"), "toy")
    plain = calibration_images(data, 16, seed=3)
    aug = calibration_images(data, 16, seed=3, augment=True)
    assert torch.equal(aug, calibration_images(data, 16, seed=3, augment=True)) and aug.shape == plain.shape
    assert not torch.equal(aug, plain)
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), data.mean, data.std)  # a padded pixel
    raw = torch.nn.functional.pad(plain - zero, (4, 4, 4, 4)) + zero  # padded with what 0 becomes
    for i in range(16):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.allclose((raw[i, :, dy:dy + 12, dx:dx + 12].flip(-1) if flip else
                                      raw[i, :, dy:dy + 12, dx:dx + 12]), aug[i])]
        assert matches, f"image {i} is not a shifted / mirrored training image"


def test_bn_recalibration_equals_the_exact_batch_statistics():
    net = _net()
    x = _images(48, 2)
    recalibrate_batchnorm(net, x, batch_size=48)
    with torch.no_grad():
        h = net.stem(x)
    assert torch.allclose(net.bn0.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    n = h.numel() / h.shape[1]
    assert torch.allclose(net.bn0.running_var, h.var((0, 2, 3), unbiased=False) * n / (n - 1), rtol=1e-4)


def _bn_inputs_eval(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What reaches each BatchNorm in eval mode (the function the network computes now)."""
    seen, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name, i[0].detach())))
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("fmt,t", [("tt", None), ("stt", 2), ("str", 2)])
def test_bn_keep_function_keeps_the_eval_function_and_measures_the_real_statistics(fmt, t):
    small, _ = stpnet.compress(_net().double(), fmt, rank=2, t=t)  # stale (dense) statistics, as after a fit
    x = _images(40, 6).double()
    ref = copy.deepcopy(small)
    inputs = _bn_inputs_eval(small, x)
    others = {k: p.clone() for k, p in small.named_parameters() if not k.startswith("bn")}
    assert recalibrate_batchnorm(small, x, batch_size=16, keep_function=True) == 3
    held_out = _images(8, 7).double()
    with torch.no_grad():
        assert torch.allclose(small.eval()(held_out), ref.eval()(held_out), rtol=1e-10, atol=1e-10)
    for name, h in inputs.items():  # the statistics are the exact ones of the eval-mode inputs
        bn = small.get_submodule(name)
        assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-12)
        assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-10)
    assert all(torch.equal(others[k], p) for k, p in small.named_parameters() if k in others)
    assert not small.training and small.bn1.momentum == 0.1


def test_bn_keep_function_makes_training_mode_compute_the_fitted_function():
    """After keep_function, BatchNorm in training mode (batch statistics) on the calibration batch
    computes what the network computed in eval mode; before it, it does not."""
    small, _ = stpnet.compress(_net().double(), "stt", rank=2, t=2)
    x = _images(64, 8).double()
    with torch.no_grad():
        target = small.eval()(x)
        stale = copy.deepcopy(small).train()(x)  # (a training-mode call also moves the running statistics)
        recalibrate_batchnorm(small, x, batch_size=64, keep_function=True)
        now = small.train()(x)
    error = lambda y: ((y - target).norm() / target.norm()).item()  # noqa: E731
    assert error(now) < 1e-6 and error(stale) > 0.05, (error(now), error(stale))


def test_bn_keep_function_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    with pytest.raises(ValueError, match=r"affine=False.*\['1'\]"):
        recalibrate_batchnorm(net, _images(4, 0), keep_function=True)
    with pytest.raises(ValueError, match="False, True or 'keep_function'"), pytest.warns(DeprecationWarning):
        stpnet.compress(_net(), "tt", rank=2, calibration=_images(8, 0), recalibrate_bn="keep")


def test_compress_recalibrate_bn_keep_function():
    # the recovery arguments of compress (deprecated for stpnet.recover) still work for a release
    dense = _net()
    x = _images(48, 9)
    with pytest.warns(DeprecationWarning, match="stpnet.recover"):
        small, report = stpnet.compress(dense, "tt", rank=2, calibration=x, fit_steps=3,
                                        recalibrate_bn="keep_function")
    with pytest.warns(DeprecationWarning, match="stpnet.recover"):
        fitted, _ = stpnet.compress(dense, "tt", rank=2, calibration=x, fit_steps=3)
    with torch.no_grad():
        assert torch.allclose(small(x), fitted(x), atol=1e-4)
    assert not torch.equal(small.bn1.running_mean, fitted.bn1.running_mean)
    assert report.bn_recalibrated == "keep_function" and "keep the function" in report.to_markdown()


# ------------------------------------------------------------------ data-aware fitting
@pytest.mark.parametrize("fmt,t", FORMATS)
def test_fitting_lowers_the_output_error_on_held_out_images(fmt, t):
    dense = _net()
    plain, _ = stpnet.compress(dense, fmt, rank=2, t=t, include=["conv1", "conv2"])
    fitted = copy.deepcopy(plain)
    report = fit_to_activations(fitted, dense, _images(96, 3), steps=15, batch_size=48)
    assert [f.name for f in report.layers] == ["conv1", "conv2"]
    assert all(f.error_after <= f.error_before for f in report.layers)
    held_out = _images(64, 4)
    before, after = activation_errors(plain, dense, held_out), activation_errors(fitted, dense, held_out)
    assert all(after[name] < before[name] for name in before), (before, after)
    assert after["conv2"] < 0.95 * before["conv2"]
    # the dense network is untouched
    assert all(torch.equal(p, q) for p, q in zip(dense.parameters(), _net().parameters()))


def test_fit_target_layer_imitates_the_dense_layer_on_the_same_inputs():
    dense = _net()
    small, _ = stpnet.compress(dense, "tucker", rank=4, include=["conv1", "conv2"])
    report = fit_to_activations(small, dense, _images(64, 5), steps=10, target="layer")
    assert report.target == "layer" and all(f.error_after <= f.error_before for f in report.layers)


def test_execution_order_not_module_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(6, 6)
            self.early = nn.Linear(6, 6)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    small, _ = stpnet.compress(Reversed(), "tt", rank=2, include=["late", "early"])
    assert factorized_layer_order(small, torch.randn(2, 6)) == ["early", "late"]


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class _Mix(nn.Module):
    """A block called with two inputs: it cannot be refitted from one captured input."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, x, y):
        return self.proj(x) + y


class BlockNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1, self.block2, self.mix = _Block(width), _Block(width), _Mix(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = self.block2(self.block1(h))
        return self.fc(self.mix(h, h).mean((2, 3)))


def _block_net() -> BlockNet:
    torch.manual_seed(3)
    net = BlockNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def _block_output_error(model, dense, name, images):
    from stpnet.train import FeatureTaps

    with torch.no_grad(), FeatureTaps(model, [name]) as a, FeatureTaps(dense, [name]) as b:
        model.eval()(images)
        dense(images)
        return float(feature_distillation_loss(a.collect(), b.collect()))


@pytest.mark.parametrize("fmt,t", [("tt", None), ("stt", 2), ("tucker", None), ("str", 2)])
def test_block_fitting_matches_the_dense_blocks(fmt, t):
    dense = _block_net()
    plain, _ = stpnet.compress(dense, fmt, rank=4 if t else 3, t=t, include=["block*", "mix.*"])
    by_block = copy.deepcopy(plain)
    calib, held_out = _images(96, 6), _images(64, 7)
    report = fit_to_activations(by_block, dense, calib, steps=15, batch_size=48, unit="block")
    # one entry per block; the two-input block falls back to its layer
    assert report.unit == "block" and [f.name for f in report.layers] == ["block1", "block2", "mix.proj"]
    assert all(f.error_after <= f.error_before for f in report.layers)
    for name in ("block1", "block2"):
        plain_error = _block_output_error(plain, dense, name, held_out)
        assert _block_output_error(by_block, dense, name, held_out) < 0.9 * plain_error
    # BatchNorm statistics and the dense network are untouched
    for bn_name in ("block1.bn1", "block2.bn2"):
        torch.testing.assert_close(by_block.get_submodule(bn_name).running_var,
                                   dense.get_submodule(bn_name).running_var)
    with pytest.raises(ValueError, match="unit must be one of"):
        fit_to_activations(by_block, dense, calib, unit="stage")


def test_fitting_rejects_bad_input():
    dense = _net()
    small, _ = stpnet.compress(dense, "tt", rank=2)
    with pytest.raises(ValueError, match="floating point"):
        fit_to_activations(small, dense, torch.zeros(4, 3, 12, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-empty batch"):
        fit_to_activations(small, dense, torch.zeros(0, 3, 12, 12))
    with pytest.raises(RuntimeError):  # wrong channel count reaches the network
        fit_to_activations(small, dense, torch.zeros(4, 5, 12, 12))
    with pytest.raises(ValueError, match="target must be one of"):
        fit_to_activations(small, dense, _images(4, 0), target="output")
    with pytest.raises(ValueError, match="weighting must be one of"):
        fit_to_activations(small, dense, _images(4, 0), weighting="bn")
    with pytest.raises(ValueError, match="uncompressed model"):
        fit_to_activations(small, small, _images(4, 0))
    with pytest.raises(ValueError, match="no factorized layer"):
        fit_to_activations(dense, dense, _images(4, 0))
    with pytest.raises(ValueError, match="NaN"):
        fit_to_activations(small, dense, torch.full((4, 3, 12, 12), float("nan")))


# ------------------------------------------------------------------ rank allocation
def _two_spectra_net() -> nn.Sequential:
    """Twelve 32x32 3x3 convolutions: half nearly rank-2, half full-rank noise."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()]
    for _ in range(12):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for i in LOW_RANK:
            u, v = torch.randn(32, 2), torch.randn(2, 32 * 9)
            net[int(i)].weight.copy_((u @ v + 0.01 * torch.randn(32, 32 * 9)).view(32, 32, 3, 3))
    return net


LOW_RANK, NOISE = ("2", "6", "10", "14", "18", "22"), ("4", "8", "12", "16", "20", "24")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["max", "sum"])
@pytest.mark.parametrize("target", [3.0, 5.0])
def test_allocation_meets_the_target_and_follows_the_spectra(objective, target):
    net = _two_spectra_net()
    alloc = allocate_ranks(net, "tt", target, objective=objective)
    assert set(alloc.ranks) == set(LOW_RANK + NOISE)
    assert alloc.params <= alloc.dense_params / target * 1.0001
    assert abs(alloc.compression - target) / target < 0.02
    assert len(set(alloc.ranks.values())) > 1  # not the uniform rule
    if objective == "max":  # equal errors: the nearly low-rank layers need fewer parameters for theirs
        assert all(alloc.layer_params[low] < alloc.layer_params[noise] for low, noise in zip(LOW_RANK, NOISE))
    if objective == "max":
        assert max(alloc.layer_errors.values()) <= max(
            allocate_ranks(net, "tt", target, objective="sum").layer_errors.values()) + 1e-12
        small, report = stpnet.compress(net, "tt", compression=target, allocation="weight")
        assert abs(report.compression - target) / target < 0.02 and report.allocation == "weight"
        assert report.ranks["2"] != report.ranks["4"]
    else:
        assert sum(alloc.layer_errors.values()) <= sum(
            allocate_ranks(net, "tt", target, objective="max").layer_errors.values()) + 1e-12


def test_activation_allocation_needs_images_and_uses_them():
    net = _two_spectra_net()
    with pytest.raises(ValueError, match="needs calibration images"):
        allocate_ranks(net, "tt", 3.0, criterion="activation")
    alloc = allocate_ranks(net, "tt", 3.0, criterion="activation", images=_images(16, 0))
    assert abs(alloc.compression - 3.0) / 3.0 < 0.02
    # the errors it weighs are measured on those images: other images, other errors
    other = allocate_ranks(net, "tt", 3.0, criterion="activation", images=_images(16, 1))
    assert alloc.layer_errors != other.layer_errors


def test_allocation_rejects_an_unreachable_target_and_bad_options():
    net = _two_spectra_net()
    with pytest.raises(ValueError, match="unreachable.*at most"):
        allocate_ranks(net, "tt", 500.0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        allocate_ranks(net, "tt", 3.0, criterion="flops")
    with pytest.raises(ValueError, match="objective must be one of"):
        allocate_ranks(net, "tt", 3.0, objective="mean")
    with pytest.raises(ValueError, match="allocation must be one of"):
        stpnet.compress(net, "tt", compression=3.0, allocation="greedy")
    with pytest.raises(ValueError, match="needs compression=... and init='decompose'"):
        stpnet.compress(net, "tt", rank=2, allocation="weight")
    with pytest.raises(ValueError, match="need calibration inputs"), pytest.warns(DeprecationWarning):
        stpnet.compress(net, "tt", rank=2, fit_steps=5)
    with pytest.raises(ValueError, match="need calibration inputs"), pytest.warns(DeprecationWarning):
        stpnet.compress(net, "tt", rank=2, recalibrate_bn=True)


@pytest.mark.slow
def test_allocation_chooses_t_per_layer_in_the_same_search():
    """t_choices: every layer's candidates at t = 1, 2 and 4 enter one search; the target is met,
    the largest error is no worse than with t = 2 alone, and compress builds each layer with the
    t chosen for it (the report gives it back, and the architecture rebuilds from ranks and t)."""
    net = _two_spectra_net()
    fixed = allocate_ranks(net, "stt", 3.0, t=2)
    searched = allocate_ranks(net, "stt", 3.0, t_choices=(4, 1, 2))
    assert abs(searched.compression - 3.0) / 3.0 < 0.02 and searched.params <= searched.dense_params / 3.0 * 1.0001
    assert set(searched.t) == set(searched.ranks) and set(searched.t.values()) <= {1, 2, 4}
    assert set(fixed.t.values()) == {2}
    assert max(searched.layer_errors.values()) <= max(fixed.layer_errors.values()) + 1e-12
    small, report = stpnet.compress(net, "stt", compression=3.0, allocation="weight", t_choices=(1, 2, 4))
    assert report.t == searched.t and report.ranks == searched.ranks
    for name, t in searched.t.items():
        assert small.get_submodule(name).t == t
    rebuilt, again = stpnet.compress(net, "stt", rank=report.ranks, t=report.t, init="random")
    assert again.params == report.params and again.t == report.t


def test_t_choices_and_per_layer_t_errors():
    net = _two_spectra_net()
    with pytest.raises(ValueError, match="needs a semi-tensor format"):
        allocate_ranks(net, "tt", 3.0, t_choices=(1, 2))
    with pytest.raises(ValueError, match="non-empty sequence of positive ints"):
        allocate_ranks(net, "stt", 3.0, t_choices=(0, 2))
    with pytest.raises(ValueError, match="needs allocation='weight' or 'activation'"):
        stpnet.compress(net, "stt", compression=3.0, t_choices=(1, 2))
    with pytest.raises(ValueError, match="and no t="):
        stpnet.compress(net, "stt", compression=3.0, allocation="weight", t=2, t_choices=(1, 2))
    with pytest.raises(ValueError, match="none of t_choices=\\(3,\\) fits"):
        allocate_ranks(net, "stt", 3.0, t_choices=(3,))
    ranks = {"2": (2, 2, 2, 2, 2, 2), "4": (2, 2, 2, 2, 2, 2)}
    with pytest.raises(ValueError, match="needs rank as a mapping of the same layer names"):
        stpnet.compress(net, "stt", rank=ranks, t={"2": 2}, init="random")
    with pytest.raises(ValueError, match="layer '4': t=3"):
        stpnet.compress(net, "stt", rank=ranks, t={"2": 2, "4": 3}, init="random")


def test_compress_with_every_recovery_step_reports_them():
    dense = _net()
    calib = _images(64, 7)
    with pytest.warns(DeprecationWarning, match="stpnet.recover"):  # the one-call form, kept for a release
        small, report = stpnet.compress(dense, "stt", compression=2.0, allocation="weight", calibration=calib,
                                        fit_steps=5, recalibrate_bn=True, include=["conv1", "conv2"])
    assert report.fit is not None and [f.name for f in report.fit.layers] == ["conv1", "conv2"]
    assert report.bn_recalibrated and report.allocation == "weight"
    text = report.to_markdown()
    assert "fit error (before -> after)" in text and "BatchNorm statistics re-estimated" in text
    assert json.loads(json.dumps(report.to_dict()))["fit"]["layers"][0]["name"] == "conv1"


# ------------------------------------------------------------------ distillation
def test_distillation_loss_equals_a_hand_computed_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3])
    alpha, T = 0.7, 3.0
    ref = 0.0
    for i in range(5):
        p_s = np.exp(s[i].numpy() / T) / np.exp(s[i].numpy() / T).sum()
        p_t = np.exp(t[i].numpy() / T) / np.exp(t[i].numpy() / T).sum()
        ce = -math.log(np.exp(s[i].numpy())[y[i]] / np.exp(s[i].numpy()).sum())
        kl = float((p_t * np.log(p_t / p_s)).sum())
        ref += ((1 - alpha) * ce + alpha * T * T * kl) / 5
    got = distillation_loss(s, t, y, alpha=alpha, temperature=T)
    assert float(got) == pytest.approx(ref, rel=1e-6)
    assert float(distillation_loss(s, t, y, alpha=0.0, temperature=T)) == pytest.approx(
        float(F.cross_entropy(s.float(), y)), rel=1e-6)
    # the teacher is a constant: no gradient flows into it
    t.requires_grad_(True)
    distillation_loss(s.requires_grad_(True), t, y, alpha=alpha, temperature=T).backward()
    assert t.grad is None and s.grad is not None


def test_distillation_rejects_a_teacher_with_other_classes_and_bad_settings():
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(torch.randn(4, 10), torch.randn(4, 100), torch.zeros(4, dtype=torch.long),
                          alpha=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="distill_alpha must be in"):
        TrainConfig(distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_temperature must be"):
        TrainConfig(distill_temperature=0.0)
    from stpnet.data import ImageDataset

    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    data = ImageDataset(x, torch.arange(16) % 10, x[:8], torch.arange(8) % 10, tuple("abcdefghij"), "toy")
    with pytest.raises(ValueError, match="need a teacher"):
        Trainer(_net(), data, TrainConfig(epochs=1, distill_alpha=0.5), device="cpu")
    trainer = Trainer(_net(), data, TrainConfig(epochs=1, batch_size=8, distill_alpha=0.5), device="cpu",
                      teacher=SmallNet(classes=7))
    with pytest.raises(ValueError, match="same classes"):
        trainer.fit()


def test_distilled_training_moves_the_student_toward_the_teacher():
    from stpnet.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 12), generator=g, dtype=torch.uint8)
    data = ImageDataset(x[:48], torch.arange(48) % 10, x[48:], torch.arange(16) % 10, tuple("abcdefghij"), "toy")
    teacher = _net(1)
    student = _net(2)
    xn = stpnet.data.normalize(x[:48], data.mean, data.std)

    def gap():
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student.eval()(xn), 1), F.log_softmax(teacher(xn), 1),
                                  reduction="batchmean", log_target=True))

    before = gap()
    Trainer(student, data, TrainConfig(epochs=4, batch_size=16, lr=0.05, distill_alpha=1.0, augment=False),
            device="cpu", teacher=teacher).fit()
    assert gap() < 0.5 * before


# ------------------------------------------------------------------ feature (block-wise) distillation
def test_feature_distillation_loss_equals_a_hand_computed_reference():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)]
    t = [torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), 10 * torch.randn(3, 7, generator=g,
                                                                                       dtype=torch.float64)]
    ref = np.mean([((a.numpy() - b.numpy()) ** 2).sum() / (b.numpy() ** 2).sum() for a, b in zip(s, t)])
    assert float(feature_distillation_loss(s, t)) == pytest.approx(ref, rel=1e-6)
    assert float(feature_distillation_loss(t, t)) == 0.0
    # the teacher is a constant; the student's gradient is the derivative of the reference
    s0 = s[0].clone().requires_grad_(True)
    t0 = t[0].clone().requires_grad_(True)
    feature_distillation_loss([s0], [t0]).backward()
    assert t0.grad is None
    torch.testing.assert_close(s0.grad, 2 * (s[0] - t[0]) / t[0].square().sum())


def test_feature_distillation_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same shape"):
        feature_distillation_loss([torch.zeros(2, 3)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="same positive number"):
        feature_distillation_loss([], [])
    with pytest.raises(ValueError, match="distill_features must be"):
        TrainConfig(distill_features=-1.0)
    with pytest.raises(ValueError, match="distill_points must be"):
        TrainConfig(distill_points="layer1")


def test_distillation_points_are_the_blocks_that_hold_factorized_layers():
    from stpnet.models import build_model

    dense = build_model("resnet20", 3, 10)
    small, _ = stpnet.compress(dense, "stt", compression=4, t=2)
    points = distillation_points(small, dense)
    assert points == tuple(f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3))
    with pytest.raises(ValueError, match="found no module"):
        distillation_points(dense, dense)  # nothing compressed


def test_feature_taps_collect_in_order_and_remove():
    net = _net()
    taps = FeatureTaps(net, ["conv2", "bn0"])
    x = torch.randn(2, 3, 8, 8)
    net(x)
    a, b = taps.collect()
    assert a.shape == (2, 16, 8, 8) and b.shape == (2, 8, 8, 8)
    torch.testing.assert_close(b, net.bn0(net.stem(x)))
    with pytest.raises(RuntimeError, match="did not run"):
        taps.collect()  # collected outputs are forgotten
    taps.remove()
    net(x)
    assert not taps._outputs
    attention = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))
    with FeatureTaps(attention, ["0"]) as t:  # a tuple output is tapped at its first element
        q = torch.randn(1, 3, 4)
        attention[0](q, q, q)
        assert t.collect()[0].shape == (1, 3, 4)
    with pytest.raises(ValueError, match="no module named"):
        FeatureTaps(net, ["conv9"])


def test_block_distillation_moves_the_student_blocks_toward_the_teacher():
    from stpnet.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 12), generator=g, dtype=torch.uint8)
    data = ImageDataset(x[:48], torch.arange(48) % 10, x[48:], torch.arange(16) % 10, tuple("abcdefghij"), "toy")
    teacher = _net(1)
    points = ("conv1", "conv2")
    xn = stpnet.data.normalize(x[:48], data.mean, data.std)

    def gap(student):
        with torch.no_grad(), FeatureTaps(student.eval(), points) as s, FeatureTaps(teacher, points) as t:
            student(xn)
            teacher(xn)
            return float(feature_distillation_loss(s.collect(), t.collect()))

    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.02, grad_clip=1.0, distill_alpha=0.5, distill_features=1.0,
                      distill_points=points, augment=False, amp="off")
    gaps = {}
    for weight in (0.0, 1.0):
        student, _ = stpnet.compress(_net(1), "tt", compression=2, init="random")
        before = gap(student)
        Trainer(student, data, dataclasses.replace(cfg, distill_features=weight), device="cpu",
                teacher=teacher).fit()
        gaps[weight] = gap(student)
    # matching the blocks brings them far closer than matching the logits alone
    assert gaps[1.0] < 0.25 * before and gaps[1.0] < 0.5 * gaps[0.0], (before, gaps)
    # the hooks are gone after training
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))
    with pytest.raises(ValueError, match="no module named"):
        Trainer(student, data, dataclasses.replace(cfg, distill_points=("nope",)), device="cpu", teacher=teacher)
    with pytest.raises(ValueError, match="need a teacher"):
        Trainer(student, data, TrainConfig(distill_features=1.0), device="cpu")


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 6)] + [("test_batch", 40)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture(scope="module")
def dense_checkpoint(cifar_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("dense")
    assert main(["train", "--model", "resnet20", "--data", str(cifar_dir), "--epochs", "1", "--batch-size", "40",
                 "--run-dir", str(run), "--quiet"]) == 0
    return run / "checkpoint.pt"


@pytest.mark.slow
def test_cli_recover_and_distill_writes_a_checkpoint_that_evaluates(dense_checkpoint, cifar_dir, tmp_path, capsys):
    run = tmp_path / "small"
    assert main(["compress", str(dense_checkpoint), "--data", str(cifar_dir), "--format", "stt", "--compression", "4",
                 "--recover", "--fit-steps", "3", "--calibration-images", "32",
                 "--distill",
                 "--distill-features", "0.5", "--epochs", "1",
                 "--batch-size", "40", "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rank allocation: weight" in out and "weights rescaled to keep the function" in out
    from stpnet.train import load_checkpoint

    state = load_checkpoint(run / "checkpoint.pt")
    made = state["metadata"]["made_by"]
    assert made["distill"] and made["allocation"] == "weight" and made["fit_steps"] == 3
    # --recover with fine-tuning moves the BatchNorm statistics keeping the function, on augmented images
    assert made["bn_recalibrated"] == "keep_function" and made["bn_calibration"] == "augmented"
    assert made["calibration_images"] == 32
    assert state["config"]["distill_alpha"] == 0.9
    assert state["config"]["distill_features"] == 0.5 and made["distill_features"] == 0.5
    assert main(["eval", str(run / "checkpoint.pt"), "--data", str(cifar_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "stt"


@pytest.mark.slow
def test_cli_recover_without_epochs_leaves_batchnorm_alone(dense_checkpoint, cifar_dir, tmp_path, capsys):
    run = tmp_path / "noft"
    assert main(["compress", str(dense_checkpoint), "--data", str(cifar_dir), "--format", "tt", "--compression", "4",
                 "--recover", "--fit-steps", "2", "--calibration-images", "32", "--epochs", "0",
                 "--run-dir", str(run), "--quiet"]) == 0
    assert "keep the function" not in capsys.readouterr().out
    from stpnet.train import load_checkpoint

    made = load_checkpoint(run / "checkpoint.pt")["metadata"]["made_by"]
    assert made["bn_recalibrated"] is False and made["bn_calibration"] is None


def test_cli_bn_recalibrate_takes_an_optional_mode():
    from stpnet.app.cli import build_parser

    parse = lambda *flags: build_parser().parse_args(["compress", "ckpt", "--format", "tt", "--compression", "4",
                                                      "--run-dir", "r", *flags])  # noqa: E731
    assert parse().bn_recalibrate is None
    assert parse("--bn-recalibrate").bn_recalibrate == "estimate"
    assert parse("--bn-recalibrate", "--recover").bn_recalibrate == "estimate"
    assert parse("--bn-recalibrate", "keep-function").bn_recalibrate == "keep-function"
    assert parse("--bn-recalibrate", "off", "--recover").bn_recalibrate == "off"
    with pytest.raises(SystemExit):
        parse("--bn-recalibrate", "sometimes")


@pytest.mark.slow
def test_cli_t_choices_records_each_layers_t_and_the_checkpoint_rebuilds(dense_checkpoint, cifar_dir, tmp_path,
                                                                          capsys):
    run = tmp_path / "tchoice"
    assert main(["compress", str(dense_checkpoint), "--data", str(cifar_dir), "--format", "stt", "--compression", "4",
                 "--allocation", "weight", "--t-choices", "1", "2", "--epochs", "0", "--run-dir", str(run),
                 "--quiet"]) == 0
    capsys.readouterr()
    from stpnet.train import load_checkpoint

    state = load_checkpoint(run / "checkpoint.pt")
    assert state["metadata"]["made_by"]["t_choices"] == [1, 2]
    t = state["metadata"]["spec"]["t"]
    assert isinstance(t, dict) and set(t.values()) <= {1, 2}
    assert main(["eval", str(run / "checkpoint.pt"), "--data", str(cifar_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "stt"


@pytest.mark.parametrize("args, message", [
    (["--distill", "--epochs", "0"], "--distill fine-tunes"),
    (["--distill-features", "1", "--epochs", "1"], "add --distill"),
    (["--allocation", "weight", "--rank", "4", "--epochs", "0"], "give --compression instead of --rank"),
    (["--recover", "--calibration-images", "1", "--epochs", "0"], "calibration batch needs an int >= 2"),
])
def test_cli_recovery_errors(args, message, dense_checkpoint, cifar_dir, tmp_path, capsys):
    base = ["compress", str(dense_checkpoint), "--data", str(cifar_dir), "--format", "tt", "--run-dir",
            str(tmp_path / "r"), "--quiet"]
    if "--rank" not in args:
        base += ["--compression", "3"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
