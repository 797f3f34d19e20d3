"""Recovery after compression: BatchNorm recalibration, data-aware fitting, rank allocation,
distillation, and their CLI flags."""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpnet
from stpnet.cli import main
from stpnet.recovery import (activation_errors, allocate_ranks, factorized_layer_order, fit_to_activations,
                             recalibrate_batchnorm)
from stpnet.train import TrainConfig, Trainer, distillation_loss

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


def test_bn_recalibration_equals_the_exact_batch_statistics():
    net = _net()
    x = _images(48, 2)
    recalibrate_batchnorm(net, x, batch_size=48)
    with torch.no_grad():
        h = net.stem(x)
    assert torch.allclose(net.bn0.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    n = h.numel() / h.shape[1]
    assert torch.allclose(net.bn0.running_var, h.var((0, 2, 3), unbiased=False) * n / (n - 1), rtol=1e-4)


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
    with pytest.raises(ValueError, match="need calibration inputs"):
        stpnet.compress(net, "tt", rank=2, fit_steps=5)
    with pytest.raises(ValueError, match="need calibration inputs"):
        stpnet.compress(net, "tt", rank=2, recalibrate_bn=True)


def test_compress_with_every_recovery_step_reports_them():
    dense = _net()
    calib = _images(64, 7)
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
    with pytest.raises(ValueError, match="needs a teacher"):
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


def test_cli_recover_and_distill_writes_a_checkpoint_that_evaluates(dense_checkpoint, cifar_dir, tmp_path, capsys):
    run = tmp_path / "small"
    assert main(["compress", str(dense_checkpoint), "--data", str(cifar_dir), "--format", "stt", "--compression", "4",
                 "--recover", "--fit-steps", "3", "--bn-recalibrate", "--calibration-images", "32", "--distill",
                 "--epochs", "1",
                 "--batch-size", "40", "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rank allocation: weight" in out and "BatchNorm statistics re-estimated" in out
    from stpnet.train import load_checkpoint

    state = load_checkpoint(run / "checkpoint.pt")
    made = state["metadata"]["made_by"]
    assert made["distill"] and made["allocation"] == "weight" and made["fit_steps"] == 3
    assert made["bn_recalibrated"] and made["calibration_images"] == 32
    assert state["config"]["distill_alpha"] == 0.9
    assert main(["eval", str(run / "checkpoint.pt"), "--data", str(cifar_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "stt"


@pytest.mark.parametrize("args, message", [
    (["--distill", "--epochs", "0"], "--distill fine-tunes"),
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
