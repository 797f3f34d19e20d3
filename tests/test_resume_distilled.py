"""A distilled, bf16-autocast training run stopped between epochs resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stpnet
from stpnet.data import ImageDataset
from stpnet.train import TrainConfig, Trainer


def _data() -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (56, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(56) % 4
    return ImageDataset(x[:40], y[:40], x[40:], y[40:], ("a", "b", "c", "d"), "tiny")


def _dense() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()


def _student() -> nn.Module:
    torch.manual_seed(4)
    small, _ = stpnet.compress(_dense(), "stt", rank=4, t=2, include=["3"])
    return small


class _Stop(Exception):
    pass


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_a_distilled_run_stopped_after_an_epoch_resumes_exactly(tmp_path, amp):
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, weight_decay=5e-5, seed=2, amp=amp,
                         distill_alpha=0.9, distill_temperature=4.0, grad_clip=5.0)
    uninterrupted = _student()
    Trainer(uninterrupted, _data(), config, tmp_path / "a", device="cpu", teacher=_dense()).fit()

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(_student(), _data(), config, tmp_path / "b", device="cpu", teacher=_dense(),
                on_epoch=stop_after_first).fit()
    resumed = _student()  # a fresh process would rebuild the network the same way
    history = Trainer(resumed, _data(), config, tmp_path / "b", device="cpu", teacher=_dense()).fit()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
