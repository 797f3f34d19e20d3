"""Wide ResNets of Zagoruyko & Komodakis (2016), depth 6n + 4, pre-activation basic blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_positive_int

__all__ = ["wide_resnet", "wrn_28_10", "wrn_16", "WideResNet"]


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut (1x1 conv where the shape changes).

    As in the reference implementation, a projection shortcut takes the pre-activated input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-d-k: conv1 (16) -> stages of 16k/32k/64k channels -> BN-ReLU -> pool -> fc.

    Submodules are registered in forward order, so ``conv1`` is the first ``nn.Conv2d`` and
    ``fc`` the last ``nn.Linear`` in ``modules()``. Build it with :func:`wide_resnet`.
    """

    def __init__(
        self, n: int, widen_factor: int, in_channels: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        stages = []
        width = 16
        for base, stride in ((16, 1), (32, 2), (64, 2)):
            out_channels = base * widen_factor
            blocks = []
            for i in range(n):
                blocks.append(_PreActBlock(width, out_channels, stride if i == 0 else 1, dropout))
                width = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wide_resnet(
    depth: int,
    widen_factor: int,
    in_channels: int = 3,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, 2016).

    Parameters
    ----------
    depth : int
        ``6n + 4`` with ``n >= 1`` (10, 16, 22, 28, 40, ...); ``n`` blocks per stage.
    widen_factor : int
        ``k``: the stages have 16k, 32k and 64k channels (the first convolution has 16).
    in_channels : int, default 3
        Channels of the input image.
    num_classes : int, default 10
        Outputs of the final linear classifier ``fc``.
    dropout : float, default 0.0
        Dropout probability between the two convolutions of each block, in ``[0, 1)``.

    Returns
    -------
    WideResNet
        WRN-28-10 with 3 input channels and 10 classes has 36,479,194 parameters.

    Raises
    ------
    ValueError
        If ``depth`` is not ``6n + 4`` with ``n >= 1``, a count is not a positive integer, or
        ``dropout`` is outside ``[0, 1)``.
    """
    depth = check_positive_int(depth, "depth")
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    widen_factor = check_positive_int(widen_factor, "widen_factor")
    in_channels = check_positive_int(in_channels, "in_channels")
    num_classes = check_positive_int(num_classes, "num_classes")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return WideResNet((depth - 4) // 6, widen_factor, in_channels, num_classes, float(dropout))


def wrn_28_10(in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10; see :func:`wide_resnet` for the parameters."""
    return wide_resnet(28, 10, in_channels, num_classes, dropout)


def wrn_16(
    widen_factor: int, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0
) -> WideResNet:
    """WRN-16-``widen_factor`` (e.g. WRN-16-4, WRN-16-8); see :func:`wide_resnet`."""
    return wide_resnet(16, widen_factor, in_channels, num_classes, dropout)
