"""The zoo's builders by name: :data:`MODELS` and :func:`build_model`."""

from __future__ import annotations

import re
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import nn

from .lenet import lenet5
from .resnet_cifar import resnet20, resnet32, resnet56
from .vit import vit_tiny
from .wide_resnet import wide_resnet, wrn_16, wrn_28_10

__all__ = ["MODELS", "build_model"]


#: Read-only mapping of model name -> builder ``f(in_channels=..., num_classes=..., **kwargs)``.
MODELS: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "resnet20": resnet20,
        "resnet32": resnet32,
        "resnet56": resnet56,
        "wrn-28-10": wrn_28_10,
        "wrn-16-4": partial(wrn_16, 4),
        "wrn-16-8": partial(wrn_16, 8),
        "lenet5": lenet5,
        "vit-tiny": vit_tiny,
    }
)


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name.

    Parameters
    ----------
    name : str
        One of the keys of :data:`MODELS`: 'resnet20', 'resnet32', 'resnet56', 'wrn-28-10',
        'wrn-16-4', 'wrn-16-8', 'lenet5', 'vit-tiny'; or any Wide ResNet as 'wrn-<depth>-<k>' (for example
        'wrn-16-2', 'wrn-40-4'; depth = 6n + 4).
    in_channels : int, default 3
        Channels of the input image.
    num_classes : int, default 10
        Outputs of the classifier.
    **kwargs
        Passed to the builder: ``shortcut`` for the ResNets, ``dropout`` for the Wide ResNets,
        ``input_size`` for LeNet-5.

    Returns
    -------
    nn.Module

    Raises
    ------
    ValueError
        If ``name`` is not a known model (the message lists the valid names), or the builder
        refuses an argument.
    """
    builder = MODELS.get(name) if isinstance(name, str) else None
    wrn = re.fullmatch(r"wrn-(\d+)-(\d+)", name) if isinstance(name, str) else None
    if builder is None and wrn is not None:
        builder = partial(wide_resnet, int(wrn[1]), int(wrn[2]))
    if builder is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}, or 'wrn-<depth>-<k>'")
    return builder(in_channels=in_channels, num_classes=num_classes, **kwargs)
