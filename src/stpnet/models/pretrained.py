"""Trained reference networks shipped inside the package, loaded by name with :func:`pretrained`.

Each network is two files in ``stpnet/models/weights/``: ``<name>.pt``, a plain float32
``state_dict`` (read with ``torch.load(weights_only=True)``, so loading runs no pickled code), and
``<name>.json``, its :class:`ModelCard`. The card records the SHA-256 of the weights file, which is
checked before every load. Nothing is downloaded: the files are package data. ``bench/reference.py``
retrains each network from scratch and writes both files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_path, atomic_write_text
from ..compress import compress
from .zoo import build_model

__all__ = ["ModelCard", "PretrainedError", "pretrained", "pretrained_names", "model_card", "file_sha256"]

_WEIGHTS_PACKAGE = "stpnet.models.weights"


class PretrainedError(ValueError):
    """A shipped weight file is missing, corrupted (SHA-256 mismatch) or does not fit its model."""


@dataclass(frozen=True)
class ModelCard:
    """What a shipped network is, how it was made and how well it does.

    Attributes
    ----------
    name : str
        The name :func:`pretrained` takes, e.g. ``'resnet20-cifar10'``.
    architecture : str
        The :func:`stpnet.models.build_model` name, e.g. ``'resnet20'``.
    in_channels, num_classes : int
    input_size : tuple of int
        ``(H, W)`` of one input image.
    classes : tuple of str
        Class names in label order.
    data : str
        The training and test data.
    mean, std : tuple of float
        Per-channel preprocessing in [0, 1] scale: the input is ``(x / 255 - mean) / std``.
    test_accuracy : float
        Top-1 accuracy on the full test set named in ``data``.
    test_samples : int
    params : int
        Parameter count.
    sha256 : str
        Hex SHA-256 of the weights file.
    training : dict
        How it was trained: the command, the settings, epochs, CPU seconds and hardware.
    compression : dict, optional
        For a compressed network: how its layers are factorized (``format``, ``t``, ``layout``
        and per-layer ``ranks``, as :class:`stpnet.model_spec.ModelSpec` records them), from which
        :func:`pretrained` rebuilds it before loading the weights. None for a dense network.
    latency : dict, optional
        Measured inference latency against the dense network (after :func:`stpnet.fuse`), with
        the command and hardware that measured it.
    """

    name: str
    architecture: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    classes: tuple[str, ...]
    data: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_accuracy: float
    test_samples: int
    params: int
    sha256: str
    training: dict
    compression: dict | None = None
    latency: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        names = {f.name for f in fields(cls)}
        optional = {"compression", "latency"}
        missing = sorted(names - optional - set(d))
        if missing:
            raise PretrainedError(f"model card is missing {missing}")
        kwargs = {k: d[k] for k in names if k in d}
        for key in ("input_size", "classes", "mean", "std"):
            kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_dir() -> Path:
    return Path(str(resources.files(_WEIGHTS_PACKAGE)))


def pretrained_names() -> tuple[str, ...]:
    """The names of the shipped networks, sorted (for example ``('resnet20-cifar10', ...)``)."""
    return tuple(sorted(p.stem for p in _weights_dir().glob("*.json")))


def model_card(name: str) -> ModelCard:
    """The :class:`ModelCard` of a shipped network, without loading its weights.

    Raises
    ------
    ValueError
        If ``name`` is not shipped; the message lists the shipped names.
    """
    names = pretrained_names()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"no pretrained network named {name!r}; available: {', '.join(names) or 'none'}")
    return ModelCard.from_dict(json.loads((_weights_dir() / f"{name}.json").read_text()))


def pretrained(name: str, *, device: str | torch.device = "cpu", path: str | Path | None = None
               ) -> tuple[nn.Module, ModelCard]:
    """Load a shipped trained network by name, in eval mode, with its card.

    Parameters
    ----------
    name : str
        One of :func:`pretrained_names`, e.g. ``'resnet20-cifar10'`` or ``'resnet32-cifar10'``.
    device : str or torch.device
        Where the model's parameters go.
    path : path, optional
        Read the weights from this file instead of the packaged one (for example a copy kept
        elsewhere); it must pass the card's SHA-256 check all the same.

    Returns
    -------
    (model, card)
        The :func:`stpnet.models.build_model` network with the trained weights, in eval mode,
        and its :class:`ModelCard`. Preprocess inputs with ``card.mean`` and ``card.std``.

    Raises
    ------
    ValueError
        If ``name`` is unknown (the message lists the available names), or ``device`` is not one
        this machine has.
    PretrainedError
        If the weights file is missing, its SHA-256 differs from the card's (a corrupted or
        altered file is never loaded), or it does not fit the architecture.

    Examples
    --------
    >>> model, card = pretrained("resnet20-cifar10")          # doctest: +SKIP
    >>> card.test_accuracy, card.mean, card.std               # doctest: +SKIP
    """
    card = model_card(name)
    device = _check_device(device)
    file = Path(path) if path is not None else _weights_dir() / f"{name}.pt"
    if file.is_dir():
        raise PretrainedError(f"path {file} is a folder; give the weights file itself (a copy of {name}.pt)")
    if not file.is_file():
        raise PretrainedError(f"the weights of {name!r} are missing: {file} does not exist")
    digest = file_sha256(file)
    if digest != card.sha256:
        remedy = (f"use the packaged file (leave path= out) or a fresh copy of {name}.pt" if path is not None
                  else "reinstall stpnet")
        raise PretrainedError(f"SHA-256 check failed for {file}: expected {card.sha256}, got {digest}; the file "
                              f"is corrupted or altered, so it was not loaded ({remedy})")
    state = torch.load(file, map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):  # the fresh weights, overwritten below, leave the caller's stream alone
        model = build_model(card.architecture, in_channels=card.in_channels, num_classes=card.num_classes)
        if card.compression is not None:
            model = _factorized_like(model, card.compression)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PretrainedError(f"{file} does not fit {card.architecture}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), card


def _factorized_like(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """``model`` with its layers factorized as a card's ``compression`` records (fresh factors)."""
    ranks = {name: tuple(r) for name, r in plan["ranks"].items()}
    model, _ = compress(model, plan["format"], rank=ranks, t=plan.get("t"), layout=plan.get("layout"),
                        init="random", inplace=True)
    return model


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has, or a ValueError saying what is valid."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device {device!r} is not supported; valid: 'cpu', 'cuda', 'cuda:N'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here; use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available here; use device='cpu'")
    elif resolved.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"device {device!r}: XPU is not available here; use device='cpu'")
    return resolved


def write_pretrained(model: nn.Module, card_fields: dict[str, Any], directory: str | Path) -> ModelCard:
    """Write ``model``'s weights and card as ``<name>.pt`` / ``<name>.json`` in ``directory``.

    ``card_fields`` holds every :class:`ModelCard` field except ``sha256`` and ``params``, which are
    computed here from the written file and the model. Used by ``bench/reference.py``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = card_fields["name"]
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights = directory / f"{name}.pt"
    with atomic_path(weights, "weights") as partial:
        torch.save(state, partial)
    card = ModelCard.from_dict({**card_fields, "sha256": file_sha256(weights),
                                "params": sum(p.numel() for p in model.parameters())})
    atomic_write_text(directory / f"{name}.json", json.dumps(card.to_dict(), indent=1) + "\n", "model card")
    return card
