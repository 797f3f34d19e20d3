"""Which layers of a model ``compress`` can replace: the modules holding a weight matrix or
kernel, the reasons some stay as they are, and the facts about them the compression and the
recovery steps read (input shapes, tied weights, attention modules)."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn

from .nn.base import FactorizedLayer
from .nn.convert import why_not_factorizable
from .nn.layer_types import layer_type

__all__ = ["eligible_layers", "layer_eligibility", "candidate_layers", "layer_input_shapes", "tied_layers",
           "attention_modules"]


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that hold a weight matrix or kernel: every module of a registered layer type
    (:mod:`stpnet.nn.layer_types`; subclasses that change its forward too), and any other module
    with a parameter of two or more dimensions of its own (so what cannot be compressed is
    reported, not silently passed over). Factorized layers are not candidates."""
    out = []
    for name, m in model.named_modules():
        if not name or isinstance(m, FactorizedLayer):
            continue
        if layer_type(m, keep_forward=False) is not None or any(p.ndim >= 2 for p in m.parameters(recurse=False)):
            out.append((name, m))
    return out


def layer_eligibility(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
) -> dict[str, str | None]:
    """Every module holding a weight matrix or kernel, with None if ``compress`` would replace it or
    the reason it stays as it is (unsupported type, groups > 1, kept on purpose, filtered out)."""
    named = candidate_layers(model)
    roles = {n: kind.role for n, m in named if (kind := layer_type(m, keep_forward=False)) is not None}
    convs = [n for n, _ in named if roles.get(n) == "conv"]
    linears = [n for n, _ in named if roles.get(n) == "linear"]
    protected = {}
    if keep_classifier and linears:
        protected[linears[-1]] = "kept dense on purpose: the classifier (keep_classifier=True)"
    if keep_first_conv and convs:
        protected[convs[0]] = "kept dense on purpose: the first convolution (keep_first_conv=True)"
    out: dict[str, str | None] = {}
    for name, module in named:
        reason = why_not_factorizable(module)
        explicitly = include is not None and any(fnmatch.fnmatch(name, p) for p in include)
        if reason is None and include is not None and not explicitly:
            reason = "not matched by include="
        if reason is None and exclude is not None and any(fnmatch.fnmatch(name, p) for p in exclude):
            reason = "matched by exclude="
        if reason is None and name in protected and not explicitly:
            reason = protected[name]
        out[name] = reason
    return out


def eligible_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
) -> list[str]:
    """Names of the Conv/Linear layers ``compress`` would replace.

    By default the first convolution and the last Linear (the classifier) stay dense. ``include``
    and ``exclude`` are shell-style patterns on module names (``fnmatch``); a layer named by
    ``include`` is eligible even if it is the first conv or the classifier. Subclasses of
    ``nn.Linear`` / ``nn.ConvNd`` that keep their base's forward are eligible
    (:func:`stpnet.nn.dense_counterpart`); :func:`layer_eligibility` says why the others are not.
    """
    return [n for n, reason in layer_eligibility(model, include, exclude, keep_first_conv, keep_classifier).items()
            if reason is None]


def layer_input_shapes(model: nn.Module, input_shape: Sequence[int] | None) -> dict[str, tuple[int, ...]]:
    """Input shape of every Conv/Linear layer for one forward pass on zeros of ``input_shape``."""
    if input_shape is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(name: str):
        def hook(module, args, output) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    for name, module in model.named_modules():
        kind = layer_type(module, keep_forward=False)  # a subclass changing the forward is reported too
        if isinstance(module, FactorizedLayer) or (kind is not None and kind.counterpart is not None):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad():
            model(torch.zeros(*input_shape, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules of ``model`` that ``compress`` rewrites to compress their
    projections (``nn.MultiheadAttention`` keeping its forward: the ``'attention'`` layer types)."""
    return [n for n, m in model.named_modules() if n and (kind := layer_type(m)) is not None
            and kind.role == "attention"]


def tied_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose weight Parameter another module also holds (for example a classifier
    tied to an embedding)."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    out = []
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, nn.Parameter) and len(owners.get(id(weight), ())) > 1:
            out.append(name)
    return out
