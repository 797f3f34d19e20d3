"""Linear-like layers: modules that compute ``y = x W^T + b`` but are not ``nn.Linear``.

The best known is the ``Conv1D`` of HuggingFace transformers (GPT-2, GPT, ...): a Linear that
stores its weight transposed, ``weight`` of shape ``(in_features, out_features)``, ``bias`` of shape
``(out_features,)``, ``nf`` = out_features, forward ``x @ weight + bias``. stpnet recognises such a
layer by its structure, without importing the library that defines it: a module with an integer
``nf``, no children, a 2-D ``weight`` ``(nx, nf)`` and a ``bias`` ``(nf,)`` (or none) as its only
parameters, whose forward on a probe input equals ``x @ weight + bias``. Other layer types are
registered with :func:`register_linear_like` and an adapter that reads the layer as a
:class:`LinearView`.

:func:`stpnet.compress` replaces a linear-like layer by a :class:`stpnet.nn.FactorizedLinear`
computing the same function (its ``weight`` is then ``(out, in)``, as ``nn.Linear``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["LinearView", "LINEAR_LIKE_ADAPTERS", "register_linear_like", "linear_view", "is_linear_like",
           "as_linear"]


@dataclass(frozen=True)
class LinearView:
    """A linear-like layer read as ``nn.Linear``: ``y = x weight^T + bias``.

    Attributes
    ----------
    in_features, out_features : int
    weight : torch.Tensor
        ``(out_features, in_features)``, detached (it may be a transposed view of the layer's own).
    bias : torch.Tensor or None
        ``(out_features,)``, detached.
    """

    in_features: int
    out_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None


#: Registered linear-like layer types -> adapter reading one as a :class:`LinearView`
#: (exact types; :func:`register_linear_like` adds to it).
LINEAR_LIKE_ADAPTERS: dict[type, Callable[[nn.Module], LinearView]] = {}


def register_linear_like(module_type: type, adapter: Callable[[nn.Module], LinearView]) -> None:
    """Make ``compress`` treat layers of exactly ``module_type`` as Linear layers.

    Parameters
    ----------
    module_type : type
        An ``nn.Module`` subclass whose forward computes ``x W^T + b`` on the last dimension.
    adapter : callable
        ``adapter(module) -> LinearView`` giving its in/out features, its weight as ``(out, in)``
        and its bias.

    Raises
    ------
    ValueError
        If ``module_type`` is not an ``nn.Module`` subclass or ``adapter`` is not callable.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(adapter):
        raise ValueError(f"adapter must be a callable module -> LinearView, got {adapter!r}")
    LINEAR_LIKE_ADAPTERS[module_type] = adapter


def _transposed_view(module: nn.Module) -> LinearView | None:
    """The view of a transposed-weight layer (``nf``, weight ``(nx, nf)``, ``x @ weight + bias``),
    or None if ``module`` does not have that structure or its forward computes something else."""
    nf = getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if (isinstance(nf, bool) or not isinstance(nf, int) or not isinstance(weight, nn.Parameter) or weight.ndim != 2
            or weight.shape[1] != nf or weight.shape[0] == 0 or nf == 0 or next(module.children(), None) is not None):
        return None
    if bias is not None and not (isinstance(bias, nn.Parameter) and tuple(bias.shape) == (nf,)):
        return None
    own = {id(p) for p in module.parameters(recurse=False)}
    if own != {id(weight)} | ({id(bias)} if bias is not None else set()):
        return None
    if not weight.is_floating_point() or weight.device.type == "meta":
        return None
    # confirm the semantics on a probe input (two rows, a fixed generator): the structure alone
    # does not say that forward is x @ weight + bias. forward itself, not the module call: the
    # module's hooks must not see the probe (a hook that asks for the layer type would recurse)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, weight.shape[0], generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            got = module.forward(probe)
            expected = probe @ weight + (bias if bias is not None else 0)
    except Exception:  # noqa: BLE001 - a module that cannot run on a plain matrix is not linear-like
        return None
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max().clamp_min(1))):
        return None
    return LinearView(int(weight.shape[0]), nf, weight.detach().t(), None if bias is None else bias.detach())


def linear_view(module: nn.Module) -> LinearView | None:
    """``module`` read as a Linear layer if it is linear-like (registered, or a transposed-weight
    layer recognised by its structure), else None. ``nn.Linear`` itself is not linear-like."""
    if isinstance(module, nn.Linear):
        return None
    adapter = LINEAR_LIKE_ADAPTERS.get(type(module))
    if adapter is not None:
        view = adapter(module)
        if not isinstance(view, LinearView):
            raise ValueError(f"the adapter registered for {type(module).__name__} returned "
                             f"{type(view).__name__}, not a LinearView")
        return view
    return _transposed_view(module)


def is_linear_like(module: nn.Module) -> bool:
    """Whether :func:`linear_view` reads ``module`` as a Linear layer."""
    return linear_view(module) is not None


def as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what the linear-like ``module`` computes (weights copied), on its
    device and dtype, in its training mode, with its parameters' ``requires_grad``.

    Raises
    ------
    ValueError
        If ``module`` is not linear-like.
    """
    view = linear_view(module)
    if view is None:
        raise ValueError(f"{type(module).__name__} is not a linear-like layer (nn.Linear semantics with a weight "
                         "stored another way); register it with stpnet.nn.register_linear_like")
    linear = nn.Linear(view.in_features, view.out_features, bias=view.bias is not None, device=view.weight.device,
                       dtype=view.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(view.weight)
        if view.bias is not None:
            linear.bias.copy_(view.bias)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor):  # a frozen layer stays frozen
        linear.weight.requires_grad_(weight.requires_grad)
    if isinstance(bias, torch.Tensor) and linear.bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    return linear.train(module.training)
