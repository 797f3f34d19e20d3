"""Model zoo: CIFAR ResNets, Wide ResNets, LeNet-5 and a small Vision Transformer, built by name with :func:`build_model`, and
trained reference networks shipped with the package, loaded by name with :func:`pretrained`."""

from __future__ import annotations

from .lenet import LeNet5, lenet5
from .pretrained import ModelCard, PretrainedError, model_card, pretrained, pretrained_names
from .resnet_cifar import ResNetCIFAR, resnet20, resnet32, resnet56, resnet_cifar
from .vit import VisionTransformer, vit_tiny
from .wide_resnet import WideResNet, wide_resnet, wrn_16, wrn_28_10
from .zoo import MODELS, build_model

__all__ = [
    "MODELS",
    "build_model",
    "resnet_cifar",
    "resnet20",
    "resnet32",
    "resnet56",
    "wide_resnet",
    "wrn_28_10",
    "wrn_16",
    "lenet5",
    "vit_tiny",
    "ResNetCIFAR",
    "VisionTransformer",
    "WideResNet",
    "LeNet5",
    "pretrained",
    "pretrained_names",
    "model_card",
    "ModelCard",
    "PretrainedError",
]
