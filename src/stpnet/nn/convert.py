"""Conversion between dense and factorized layers: ``from_dense`` and its inverse ``to_dense``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import FactorizedLayer
from .layer_types import LAYER_TYPES, factorized_layer_type, layer_type

__all__ = ["from_dense", "to_dense", "FACTORIZED_COUNTERPARTS", "DENSE_TYPES", "dense_counterpart",
           "why_not_factorizable", "dense_geometry", "dense_matrix"]

#: Dense layer type -> factorized layer type (of the layer types registered when this module was
#: imported, :data:`stpnet.nn.layer_types.LAYER_TYPES`).
FACTORIZED_COUNTERPARTS = {kind.dense: kind.factorized for kind in LAYER_TYPES.values()
                           if kind.dense is not None and kind.factorized is not None}

#: The dense layer types a factorized layer can replace (for ``isinstance``).
DENSE_TYPES = tuple(FACTORIZED_COUNTERPARTS)


def dense_geometry(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """``(inputs, outputs, kernel)`` of a dense layer as its factorized counterpart tensorizes it:
    Linear ``(in_features, out_features, ())``, ConvNd ``(in_channels, out_channels, kernel_size)``,
    Embedding ``(num_embeddings, embedding_dim, ())`` (the table is a map from one-hot tokens); a
    linear-like layer (:mod:`stpnet.nn.linear_like`) as the Linear it computes
    (:meth:`stpnet.nn.layer_types.LayerType.geometry`)."""
    kind = layer_type(module, keep_forward=False)
    if kind is None or kind.factorized is None:
        raise ValueError(f"{type(module).__name__} is not a Linear, ConvNd or Embedding")
    return kind.geometry(module)


def dense_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a dense layer shaped ``(outputs, inputs, *kernel)`` (an Embedding's table
    transposed; a linear-like layer's as ``(out, in)``), detached."""
    kind = layer_type(module, keep_forward=False)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a Linear, ConvNd or Embedding")
    return kind.matrix(module)


def dense_counterpart(module: nn.Module) -> type | None:
    """The torch layer type of ``module`` that a factorized layer replaces, or None.

    An exact ``nn.Linear`` / ``nn.Conv1d/2d/3d``, or a subclass that keeps its base's ``forward``
    (``NonDynamicallyQuantizableLinear``, the ``out_proj`` of ``nn.MultiheadAttention``, is one). A
    subclass that overrides ``forward`` computes something else and is not replaced. A linear-like
    layer (a Linear storing its weight another way, such as HuggingFace's ``Conv1D``:
    :func:`stpnet.nn.linear_view`) has ``nn.Linear`` as its counterpart.
    """
    kind = layer_type(module)
    return kind.counterpart if kind is not None else None


def why_not_factorizable(module: nn.Module) -> str | None:
    """None if ``module`` can be replaced by a factorized layer, else the reason it cannot."""
    kind = layer_type(module, keep_forward=False)
    if kind is None or kind.counterpart is None:
        return f"{type(module).__name__} has no factorized counterpart"
    if not kind.matches(module):
        return f"{type(module).__name__} overrides the forward of nn.{kind.dense.__name__}"
    return kind.why_not(module)


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
    kind = layer_type(layer)
    target = kind.factorized if kind is not None and kind.counterpart is not None else None
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
    kind = factorized_layer_type(layer)
    if kind is None:
        valid = ", ".join(cls.__name__ for cls in FACTORIZED_COUNTERPARTS.values())
        raise ValueError(f"cannot convert a {type(layer).__name__} to a dense layer; supported layers: {valid}")
    return kind.to_dense(layer)
