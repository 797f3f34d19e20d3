"""LeNet-5 (LeCun et al., 1998, in its common modern form with ReLU and max pooling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_positive_int

__all__ = ["lenet5", "LeNet5", "INPUT_SIZES"]

#: Supported input sizes -> padding of the first convolution (both give 16x5x5 features).
INPUT_SIZES = {28: 2, 32: 0}


class LeNet5(nn.Module):
    """conv 6@5x5 -> ReLU -> maxpool 2 -> conv 16@5x5 -> ReLU -> maxpool 2 -> fc1 120 -> fc2 84 -> fc.

    ``conv1`` is the first ``nn.Conv2d`` and ``fc`` (the classifier) the last ``nn.Linear`` in
    ``modules()``. Build it with :func:`lenet5`.
    """

    def __init__(self, in_channels: int, num_classes: int, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=INPUT_SIZES[input_size])
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.relu(self.fc1(out.flatten(1)))
        out = F.relu(self.fc2(out))
        return self.fc(out)


def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> LeNet5:
    """LeNet-5 for square ``input_size`` x ``input_size`` images.

    Parameters
    ----------
    in_channels : int, default 1
        Channels of the input image (1 for MNIST, 3 for CIFAR).
    num_classes : int, default 10
        Outputs of the final linear classifier ``fc``.
    input_size : {28, 32}, default 28
        Height and width of the input. For 28 (MNIST) the first convolution pads by 2, for 32
        (CIFAR, padded MNIST) it does not pad; either way the features entering ``fc1`` are
        16 x 5 x 5. Other sizes are refused, because ``fc1`` is sized for 16 x 5 x 5.

    Returns
    -------
    LeNet5
        With 1 input channel and 10 classes it has 61,706 parameters (62,006 with 3 channels).

    Raises
    ------
    ValueError
        If a count is not a positive integer or ``input_size`` is not 28 or 32.
    """
    in_channels = check_positive_int(in_channels, "in_channels")
    num_classes = check_positive_int(num_classes, "num_classes")
    if isinstance(input_size, bool) or input_size not in INPUT_SIZES:
        raise ValueError(f"input_size must be one of {sorted(INPUT_SIZES)}, got {input_size!r}")
    return LeNet5(in_channels, num_classes, int(input_size))
