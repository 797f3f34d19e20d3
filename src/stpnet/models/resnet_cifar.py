"""CIFAR ResNets of He et al. (2016), depth 6n + 2 (ResNet-20/32/56/110)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_positive_int

__all__ = ["resnet_cifar", "resnet20", "resnet32", "resnet56", "SHORTCUTS"]

#: Valid shortcut options: 'A' (parameter-free subsample + zero-pad), 'B' (1x1 conv + BN).
SHORTCUTS = ("A", "B")


class _PadShortcut(nn.Module):
    """Option-A shortcut: stride subsampling plus zero channels on both sides (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet: conv1 (16) -> three stages of n basic blocks (16/32/64) -> pool -> fc (other
    stage widths through ``widths``).

    Submodules are registered in forward order, so ``conv1`` is the first ``nn.Conv2d`` and
    ``fc`` the last ``nn.Linear`` in ``modules()``. Build it with :func:`resnet_cifar`.
    """

    def __init__(self, n: int, in_channels: int, num_classes: int, shortcut: str,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        width = widths[0]
        for out_channels, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(width, out_channels, stride if i == 0 else 1, shortcut))
                width = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet_cifar(
    depth: int, in_channels: int = 3, num_classes: int = 10, shortcut: str = "A",
    widths: tuple[int, int, int] = (16, 32, 64),
) -> ResNetCIFAR:
    """CIFAR ResNet of He et al. (2016) with ``depth = 6n + 2`` layers.

    Parameters
    ----------
    depth : int
        Number of weighted layers, ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110, ...).
    in_channels : int, default 3
        Channels of the input image.
    num_classes : int, default 10
        Outputs of the final linear classifier ``fc``.
    shortcut : {'A', 'B'}, default 'A'
        Shortcut where the shape changes: 'A' subsamples with stride 2 and zero-pads the channels
        (no parameters); 'B' is a 1x1 convolution plus BatchNorm projection.
    widths : tuple of three int, default (16, 32, 64)
        Channels of the three stages (the first convolution has the first stage's). Narrower
        widths give a thin network, for example one with as many parameters as a compressed one.

    Returns
    -------
    ResNetCIFAR
        With 3 input channels and 10 classes, option A: ResNet-20 has 269,722 parameters,
        ResNet-32 464,154, ResNet-56 853,018; option B adds 2,752 (the two projections):
        272,474, 466,906 and 855,770.

    Raises
    ------
    ValueError
        If ``depth`` is not ``6n + 2`` with ``n >= 1``, a count is not a positive integer,
        ``shortcut`` is not 'A' or 'B', or ``widths`` is not three positive integers.
    """
    depth = check_positive_int(depth, "depth")
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    in_channels = check_positive_int(in_channels, "in_channels")
    num_classes = check_positive_int(num_classes, "num_classes")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    if isinstance(widths, (str, bytes)) or len(tuple(widths)) != 3:
        raise ValueError(f"widths must be three stage widths such as (16, 32, 64), got {widths!r}")
    widths = tuple(check_positive_int(w, "each of widths") for w in widths)
    return ResNetCIFAR((depth - 2) // 6, in_channels, num_classes, shortcut, widths)


def resnet20(in_channels: int = 3, num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    """ResNet-20 (n = 3); see :func:`resnet_cifar` for the parameters."""
    return resnet_cifar(20, in_channels, num_classes, shortcut)


def resnet32(in_channels: int = 3, num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    """ResNet-32 (n = 5); see :func:`resnet_cifar` for the parameters."""
    return resnet_cifar(32, in_channels, num_classes, shortcut)


def resnet56(in_channels: int = 3, num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    """ResNet-56 (n = 9); see :func:`resnet_cifar` for the parameters."""
    return resnet_cifar(56, in_channels, num_classes, shortcut)
