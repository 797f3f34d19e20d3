"""Conversion between dense and factorized layers: ``from_dense`` and its inverse ``to_dense``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .embedding import FactorizedEmbedding
from .linear import FactorizedLinear
from .linear_like import linear_view

__all__ = ["from_dense", "to_dense", "FACTORIZED_COUNTERPARTS", "DENSE_TYPES", "dense_counterpart",
           "why_not_factorizable", "dense_geometry", "dense_matrix"]

#: Dense layer type -> factorized layer type.
FACTORIZED_COUNTERPARTS = {
    nn.Linear: FactorizedLinear,
    nn.Conv1d: FactorizedConv1d,
    nn.Conv2d: FactorizedConv2d,
    nn.Conv3d: FactorizedConv3d,
    nn.Embedding: FactorizedEmbedding,
}

#: The dense layer types a factorized layer can replace (for ``isinstance``).
DENSE_TYPES = tuple(FACTORIZED_COUNTERPARTS)


def dense_geometry(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """``(inputs, outputs, kernel)`` of a dense layer as its factorized counterpart tensorizes it:
    Linear ``(in_features, out_features, ())``, ConvNd ``(in_channels, out_channels, kernel_size)``,
    Embedding ``(num_embeddings, embedding_dim, ())`` (the table is a map from one-hot tokens); a
    linear-like layer (:mod:`stpnet.nn.linear_like`) as the Linear it computes."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, ()
    view = linear_view(module)
    if view is not None:
        return view.in_features, view.out_features, ()
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim, ()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels, tuple(module.kernel_size)
    raise ValueError(f"{type(module).__name__} is not a Linear, ConvNd or Embedding")


def dense_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a dense layer shaped ``(outputs, inputs, *kernel)`` (an Embedding's table
    transposed; a linear-like layer's as ``(out, in)``), detached."""
    view = linear_view(module) if not isinstance(module, DENSE_TYPES) else None
    if view is not None:
        return view.weight
    weight = module.weight.detach()
    return weight.transpose(0, 1) if isinstance(module, nn.Embedding) else weight


def dense_counterpart(module: nn.Module) -> type | None:
    """The torch layer type of ``module`` that a factorized layer replaces, or None.

    An exact ``nn.Linear`` / ``nn.Conv1d/2d/3d``, or a subclass that keeps its base's ``forward``
    (``NonDynamicallyQuantizableLinear``, the ``out_proj`` of ``nn.MultiheadAttention``, is one). A
    subclass that overrides ``forward`` computes something else and is not replaced. A linear-like
    layer (a Linear storing its weight another way, such as HuggingFace's ``Conv1D``:
    :func:`stpnet.nn.linear_view`) has ``nn.Linear`` as its counterpart.
    """
    for base in type(module).__mro__:
        if base in FACTORIZED_COUNTERPARTS:
            return base if type(module).forward is base.forward else None
    return nn.Linear if linear_view(module) is not None else None


def why_not_factorizable(module: nn.Module) -> str | None:
    """None if ``module`` can be replaced by a factorized layer, else the reason it cannot."""
    base = next((b for b in type(module).__mro__ if b in FACTORIZED_COUNTERPARTS), None)
    if base is None:
        if linear_view(module) is not None:
            return None
        return f"{type(module).__name__} has no factorized counterpart"
    if dense_counterpart(module) is None:
        return f"{type(module).__name__} overrides the forward of nn.{base.__name__}"
    if getattr(module, "groups", 1) != 1:
        return f"groups={module.groups} (grouped or depthwise convolution)"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                             or module.sparse):
        return "an Embedding with max_norm, scale_grad_by_freq or sparse (not supported by a factorized table)"
    return None


def from_dense(layer: nn.Module, format: str = "tt", **kwargs: Any) -> FactorizedLayer:
    """Factorize a trained ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.Embedding`` through the decompositions.

    Parameters
    ----------
    layer : nn.Linear, nn.Conv1d/2d/3d or nn.Embedding (or a subclass keeping its forward), or a linear-like layer
        (:func:`stpnet.nn.linear_view`: HuggingFace's ``Conv1D``, or a registered type), which
        becomes a :class:`FactorizedLinear`
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str'}
    **kwargs
        ``rank``, ``tol`` or ``compression`` (exactly one), and optionally ``t``, ``layout``,
        ``in_modes``, ``out_modes``, ``n_modes``, ``n_iter``, ``forward_path``; see
        :meth:`FactorizedConv2d.from_dense`.

    Returns
    -------
    FactorizedLayer
    """
    base = dense_counterpart(layer)
    target = FACTORIZED_COUNTERPARTS.get(base) if base is not None else None
    if target is None:
        valid = ", ".join(f"nn.{cls.__name__}" for cls in FACTORIZED_COUNTERPARTS)
        raise ValueError(f"cannot factorize a {type(layer).__name__}; supported layers: {valid}")
    return target.from_dense(layer, format, **kwargs)


def to_dense(layer: FactorizedLayer) -> nn.Module:
    """The plain ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.Embedding`` that computes what ``layer`` computes.

    The weight is rebuilt from the factors once. Use it to deploy a trained factorized model where
    the download or storage size is what had to shrink but inference should run at dense speed:
    a factorized layer pays a fixed overhead per call that the dense layer does not (see
    BENCHMARKS.md, "The paper's comparison on CIFAR-10"). The result holds the dense parameter count.

    Parameters
    ----------
    layer : FactorizedLinear, FactorizedConv1d/2d/3d or FactorizedEmbedding

    Returns
    -------
    nn.Linear, nn.Conv1d/2d/3d or nn.Embedding
        On the layer's device and dtype, in the layer's training mode, with ``requires_grad``
        set on its parameters.
    """
    dense_type = {factorized: dense for dense, factorized in FACTORIZED_COUNTERPARTS.items()}.get(type(layer))
    if dense_type is None:
        valid = ", ".join(cls.__name__ for cls in FACTORIZED_COUNTERPARTS.values())
        raise ValueError(f"cannot convert a {type(layer).__name__} to a dense layer; supported layers: {valid}")
    weight = layer.weight_tensor
    factory = {"device": weight.device, "dtype": weight.dtype}
    if dense_type is nn.Embedding:
        dense = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, **factory)
    elif dense_type is nn.Linear:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **factory)
    else:
        dense = dense_type(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                           padding_mode=layer.padding_mode, **factory)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight().reshape(dense.weight.shape))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense.train(layer.training)
