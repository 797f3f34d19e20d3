"""Recovery, fusing, training and pretrained loading check their inputs: non-finite BatchNorm
statistics, mismatched layer pairs, wrong dtypes, devices and class counts give a clear error
(and leave the model as it was); frozen layers stay frozen; training on a CPU keeps the contiguous
layout unless channels_last is asked for."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

import stpnet
from stpnet.data import ImageDataset
from stpnet.models import pretrained
from stpnet.models.pretrained import PretrainedError, _weights_dir
from stpnet.deploy.fused import fuse
from stpnet.nn import FactorizedLayer
from stpnet.recovery import allocate_ranks, fit_to_activations, recalibrate_batchnorm
from stpnet.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def _compress(model: nn.Module, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stpnet.compress(model, "tt", rank=2, keep_first_conv=False, **kw)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- BatchNorm recalibration
def test_compress_refuses_non_finite_batchnorm_statistics():
    with pytest.raises(ValueError, match="non-finite statistics"):
        _compress(_dense(), calibration=torch.full((8, 3, 16, 16), 1e20), recalibrate_bn=True)


@pytest.mark.parametrize("keep_function", [False, True])
def test_a_failed_recalibration_keeps_the_previous_statistics(keep_function):
    model, _ = _compress(_dense())
    before = _bn_state(model)
    with pytest.raises(ValueError, match="previous statistics are kept"):
        recalibrate_batchnorm(model, torch.full((8, 3, 16, 16), 1e30), keep_function=keep_function)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    recalibrate_batchnorm(model, torch.randn(8, 3, 16, 16), keep_function=keep_function)  # fine inputs: no error


# ---------------------------------------------------------------------------- fitting pairs
def test_fit_to_activations_checks_the_type_and_shape_of_each_paired_layer():
    dense = _dense()
    small, _ = _compress(dense)
    x = torch.randn(8, 3, 16, 16)
    wrong_type = _dense()
    wrong_type[3] = nn.ReLU()  # the factorized layer '3' would be fitted to a ReLU's output
    with pytest.raises(ValueError, match=r"layer '3': the factorized layer stands for a Conv2d, but the dense "
                                         r"network's '3' is a ReLU"):
        fit_to_activations(small, wrong_type, x, steps=1)
    wrong_shape = _dense()
    wrong_shape[3] = nn.Conv2d(8, 16, 1)
    with pytest.raises(ValueError, match=r"\(8, 16, \(3, 3\)\), the dense network's Conv2d \(8, 16, \(1, 1\)\)"):
        fit_to_activations(small, wrong_shape, x, steps=1)
    missing = nn.Sequential(*list(_dense())[:3])
    with pytest.raises(ValueError, match="has no module '3'"):
        fit_to_activations(small, missing, x, steps=1)
    report = fit_to_activations(small, dense, x, steps=1)  # the real pair works
    assert [f.name for f in report.layers]


# ---------------------------------------------------------------------------- dtypes and devices
def test_calibration_inputs_are_checked_against_the_model():
    with pytest.raises(ValueError, match="int64, integer token indices, but the model has no embedding"):
        _compress(_dense(), calibration=torch.randint(0, 255, (8, 3, 16, 16)), recalibrate_bn=True)
    with pytest.raises(ValueError, match="meta device"):
        _compress(_dense(), calibration=torch.empty(8, 3, 16, 16, device="meta"), fit_steps=1)
    small, _ = _compress(_dense())
    with pytest.raises(ValueError, match="no embedding"):
        fit_to_activations(small, _dense(), torch.randint(0, 3, (4, 3, 8, 8)))


def test_compressing_a_half_precision_model_says_what_to_do():
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=r"float32 or float64 weights.*model.float\(\)"):
            _compress(_dense().to(dtype))


@pytest.mark.parametrize("example,match", [
    (torch.randn(2, 3, 8, 8, dtype=torch.float64), "example is torch.float64, the model's parameters torch.float32"),
    (torch.randint(0, 3, (2, 3, 8, 8)), "no embedding"),
    (torch.randn(0, 3, 8, 8), "no elements"),
])
def test_fuse_checks_its_example(example, match):
    small, _ = _compress(_dense())
    with pytest.raises(ValueError, match=match):
        fuse(small, example=example)


def test_allocate_ranks_checks_its_arguments():
    with pytest.raises(ValueError, match=r"modules the model does not have: \['nope'\]"):
        allocate_ranks(_dense(), "tt", 2.0, layers=["nope"])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        allocate_ranks(_dense(), "tt", 2.0, criterion="activation", images=torch.randn(4, 3, 8, 8), batch_size=0)


def _data(classes: int = 10) -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(24) % classes
    return ImageDataset(x[:16], y[:16], x[16:], y[16:], tuple(f"c{i}" for i in range(classes)), "tiny")


def test_a_teacher_over_other_classes_is_refused_clearly():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    config = TrainConfig(epochs=1, batch_size=8, distill_alpha=0.5, augment=False)
    with pytest.raises(ValueError, match=r"teacher returns outputs of shape \(8, 7\) and the model \(8, 10\)"):
        Trainer(_dense(), _data(), config, device="cpu", teacher=teacher).fit()


# ---------------------------------------------------------------------------- frozen layers
def test_frozen_layers_stay_frozen_after_compression():
    dense = _dense()
    dense[0].requires_grad_(False)  # a frozen layer
    dense[3].weight.requires_grad_(False)  # frozen weight, trainable bias
    small, _ = _compress(dense)
    assert isinstance(small[0], FactorizedLayer) and isinstance(small[3], FactorizedLayer)
    assert not any(p.requires_grad for p in small[0].parameters())
    assert not any(p.requires_grad for p in small[3].weight_tensor.parameters()) and small[3].bias.requires_grad
    assert all(p.requires_grad for p in small[8].parameters())  # the classifier: untouched, trainable
    before = [p.clone() for p in small[0].parameters()]
    fit_to_activations(small, dense, torch.randn(8, 3, 16, 16), steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, small[0].parameters()))  # frozen: not fitted


# ---------------------------------------------------------------------------- training layout
def test_training_on_a_cpu_keeps_the_contiguous_layout_by_default():
    model = _dense()
    trainer = Trainer(model, _data(), TrainConfig(epochs=1, batch_size=8, augment=False), device="cpu")
    assert TrainConfig().channels_last is None and trainer.channels_last is False
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    trainer.fit()
    assert seen and all(seen)
    assert all(p.is_contiguous() for p in model.parameters())
    asked = Trainer(_dense(), _data(), TrainConfig(epochs=1, batch_size=8, augment=False, channels_last=True),
                    device="cpu")
    assert asked.channels_last is True  # an explicit request still means NHWC
    layouts = []
    asked.model[0].register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    asked.fit()
    assert layouts and all(layouts)
    with pytest.raises(ValueError, match="channels_last must be True, False or None"):
        TrainConfig(channels_last="yes")


# ---------------------------------------------------------------------------- pretrained
def test_pretrained_checks_its_device_and_path(tmp_path):
    name = "resnet20-cifar10"
    with pytest.raises(ValueError, match="device 'tpu' is not supported"):
        pretrained(name, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            pretrained(name, device="cuda")
    with pytest.raises(PretrainedError, match="is a folder; give the weights file itself"):
        pretrained(name, path=tmp_path)
    copy = tmp_path / f"{name}.pt"
    shutil.copyfile(_weights_dir() / f"{name}.pt", copy)
    with open(copy, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(PretrainedError, match="leave path= out") as error:
        pretrained(name, path=copy)
    assert "reinstall" not in str(error.value)
