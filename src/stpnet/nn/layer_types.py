"""Layer types: what stpnet knows about each kind of torch layer it compresses, in one place.

A layer type is one object that says, for one kind of layer (``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.Embedding``, a linear-like layer such as HuggingFace's ``Conv1D``, ``nn.MultiheadAttention``):

* which torch modules it is (:meth:`LayerType.matches`) and which of them cannot be factorized
  (:meth:`LayerType.why_not`);
* its factorized counterpart, and how to turn that back into the torch layer (:meth:`LayerType.to_dense`);
* its geometry ``(inputs, outputs, kernel)`` and its weight as a matrix ``(outputs, inputs, *kernel)``;
* its dense multiply-adds on an input shape, and the Gram matrix of its inputs (rank allocation);
* its role in a network (``'conv'``, ``'linear'``, ``'embedding'``, ``'attention'``), whether its
  factorized layer has a fused form, whether it takes token indices, and its output channel axis.

A layer type registers itself when its class is defined (as layouts do, :mod:`stpnet.nn.layouts`);
:func:`layer_type` finds the one of a torch module and :func:`factorized_layer_type` the one of a
factorized layer. Everything else (``compress``, the rank allocation, the fit, ``fuse``, the
conversions) asks them rather than testing types.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import UnpackedMultiheadAttention
from .base import FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .cost import dense_layer_macs
from .embedding import FactorizedEmbedding
from .linear import FactorizedLinear
from .linear_like import linear_view

__all__ = ["LayerType", "LAYER_TYPES", "layer_type", "layer_type_named", "factorized_layer_type", "takes_indices",
           "ROLES"]

#: What a layer is to the network: ``compress`` keeps the first ``'conv'`` and the last
#: ``'linear'`` dense by default; an ``'attention'`` is compressed through its projections.
ROLES = ("conv", "linear", "embedding", "attention")

_REGISTRY: dict[str, "LayerType"] = {}

#: Every layer type by name, in registration order.
LAYER_TYPES = MappingProxyType(_REGISTRY)


class LayerType:
    """One kind of torch layer (see the module docstring). Subclasses set ``name``, ``role``,
    ``dense`` (the torch class, or None for a type recognised by :meth:`matches` alone) and
    ``factorized`` (the factorized layer class, or None), and override what differs."""

    name: ClassVar[str]
    role: ClassVar[str]
    dense: ClassVar[type[nn.Module] | None] = None
    factorized: ClassVar[type[FactorizedLayer] | None] = None
    #: Whether :func:`stpnet.fuse` has a fused form for the factorized layer.
    fusable: ClassVar[bool] = True
    #: Whether the layer takes integer token indices rather than floating inputs.
    takes_indices: ClassVar[bool] = False
    #: The axis of the output's channels (per-channel weights of the activation fit).
    channel_dim: ClassVar[int] = -1
    #: Whether ``compress`` first rewrites the layer as the ``nn.Linear`` it computes
    #: (:func:`stpnet.nn.linear_like.as_linear`).
    linearized: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise TypeError(f"layer type {cls.name!r} is taken by {type(_REGISTRY[cls.name]).__name__}")
            if cls.role not in ROLES:
                raise TypeError(f"layer type {cls.name!r}: role must be one of {ROLES}, got {cls.role!r}")
            _REGISTRY[cls.name] = cls()

    def __repr__(self) -> str:
        return f"<layer type {self.name!r}>"

    def __reduce__(self):  # copies and pickles stay the registered object
        return (layer_type_named, (self.name,))

    # ------------------------------------------------------------------ recognition
    @property
    def counterpart(self) -> type[nn.Module] | None:
        """The torch layer type whose factorized layer replaces layers of this type (None: none does)."""
        return self.dense if self.factorized is not None else None

    def family(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind at all (a subclass that changes the forward too)."""
        return self.dense is not None and isinstance(module, self.dense)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` computes what this layer type describes: an instance of ``dense``
        whose class keeps ``dense``'s forward."""
        return self.family(module) and type(module).forward is self.dense.forward

    def why_not(self, module: nn.Module) -> str | None:
        """None if ``module`` (one this type matches) can be factorized, else why not."""
        return None

    # ------------------------------------------------------------------ the dense layer
    def geometry(self, module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
        """``(inputs, outputs, kernel)`` as the factorized counterpart tensorizes the layer."""
        raise NotImplementedError

    def matrix(self, module: nn.Module) -> torch.Tensor:
        """The weight shaped ``(outputs, inputs, *kernel)``, detached."""
        return module.weight.detach()

    def dense_macs(self, module: nn.Module, input_shape) -> int:
        """Multiply-adds of the layer's dense op on one input of ``input_shape``."""
        return dense_layer_macs(module, input_shape)

    def input_gram(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``sum over samples and positions of u u^T`` for the layer's input vectors ``u`` in the
        batch ``x`` (float64; a vector for a diagonal Gram matrix)."""
        raise NotImplementedError(f"{self.name}: no input Gram matrix (the activation criterion of the allocation)")

    # ------------------------------------------------------------------ the factorized layer
    def constructor_args(self, layer: FactorizedLayer) -> tuple:
        """The positional constructor arguments of ``layer``'s class that give its geometry (what
        ``dense_layer_args`` gives for the torch layer it replaces)."""
        raise NotImplementedError(f"{self.name}: no factorized layer")

    def to_dense(self, layer: FactorizedLayer) -> nn.Module:
        """The torch layer computing what the factorized ``layer`` computes (weight rebuilt once)."""
        raise NotImplementedError(f"{self.name}: no dense form")


def layer_type_named(name: str) -> LayerType:
    """The registered layer type of a name; ValueError listing the valid names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown layer type {name!r}; valid layer types: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def layer_type(module: nn.Module, *, keep_forward: bool = True) -> LayerType | None:
    """The layer type of a torch module, or None.

    With ``keep_forward=False``, also the type of a module of that kind whose class overrides its
    forward (which therefore cannot be replaced): the type it would be."""
    for kind in _REGISTRY.values():
        if kind.matches(module) or (not keep_forward and kind.family(module)):
            return kind
    return None


def factorized_layer_type(layer: nn.Module) -> LayerType | None:
    """The layer type whose factorized counterpart ``layer`` is (by its class), or None."""
    for cls in type(layer).__mro__:
        for kind in _REGISTRY.values():
            if kind.factorized is cls:
                return kind
    return None


def takes_indices(module: nn.Module) -> bool:
    """Whether ``module``, a torch layer or a factorized one, looks up integer token indices."""
    kind = factorized_layer_type(module) if isinstance(module, FactorizedLayer) else layer_type(module)
    return kind is not None and kind.takes_indices


class LinearType(LayerType):
    """``nn.Linear`` (and subclasses keeping its forward, such as ``NonDynamicallyQuantizableLinear``)."""

    name = "linear"
    role = "linear"
    dense = nn.Linear
    factorized = FactorizedLinear

    def geometry(self, module):
        return module.in_features, module.out_features, ()

    def input_gram(self, module, x):
        flat = x.double().reshape(-1, x.shape[-1])
        return flat.T @ flat

    def constructor_args(self, layer):
        return layer.in_features, layer.out_features, layer.bias is not None

    def to_dense(self, layer):
        weight = layer.weight_tensor
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                          dtype=weight.dtype)
        return _filled(dense, layer)


class _ConvType(LayerType):
    """``nn.Conv1d/2d/3d`` with ``groups=1``."""

    role = "conv"
    channel_dim = 1

    def why_not(self, module):
        return f"groups={module.groups} (grouped or depthwise convolution)" if module.groups != 1 else None

    def geometry(self, module):
        return module.in_channels, module.out_channels, tuple(module.kernel_size)

    def input_gram(self, module, x):
        x = x.double()
        dims = len(module.kernel_size)
        if dims == 3:
            raise NotImplementedError("activation-criterion allocation supports Linear, Conv1d and Conv2d")
        kernel, stride, dilation, padding = module.kernel_size, module.stride, module.dilation, module.padding
        if dims == 1:  # each position's patch through the equivalent 2-D view
            x = x.unsqueeze(-1)
            kernel, stride, dilation = (kernel[0], 1), (stride[0], 1), (dilation[0], 1)
            padding = (padding[0], 0) if not isinstance(padding, str) else padding
        if isinstance(padding, str):
            padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # N, C*K, L
        return torch.einsum("nal,nbl->ab", cols, cols)

    def constructor_args(self, layer):
        return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation, 1,
                layer.bias is not None, layer.padding_mode)

    def to_dense(self, layer):
        weight = layer.weight_tensor
        dense = self.dense(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                           padding_mode=layer.padding_mode, device=weight.device, dtype=weight.dtype)
        return _filled(dense, layer)


class Conv1dType(_ConvType):
    name = "conv1d"
    dense = nn.Conv1d
    factorized = FactorizedConv1d


class Conv2dType(_ConvType):
    name = "conv2d"
    dense = nn.Conv2d
    factorized = FactorizedConv2d


class Conv3dType(_ConvType):
    name = "conv3d"
    dense = nn.Conv3d
    factorized = FactorizedConv3d


class EmbeddingType(LayerType):
    """``nn.Embedding``: the table as a map from one-hot tokens; no fused form (it is a lookup)."""

    name = "embedding"
    role = "embedding"
    dense = nn.Embedding
    factorized = FactorizedEmbedding
    fusable = False
    takes_indices = True

    def why_not(self, module):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return "an Embedding with max_norm, scale_grad_by_freq or sparse (not supported by a factorized table)"
        return None

    def geometry(self, module):
        return module.num_embeddings, module.embedding_dim, ()

    def matrix(self, module):
        return module.weight.detach().transpose(0, 1)

    def input_gram(self, module, x):  # one-hot inputs: a diagonal Gram matrix, the token counts
        return torch.bincount(x.reshape(-1).long(), minlength=module.num_embeddings).double()

    def constructor_args(self, layer):
        return layer.num_embeddings, layer.embedding_dim, layer.padding_idx

    def to_dense(self, layer):
        weight = layer.weight_tensor
        dense = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, device=weight.device,
                             dtype=weight.dtype)
        return _filled(dense, layer)


class LinearLikeType(LinearType):
    """A layer computing a Linear with its weight stored another way (HuggingFace's ``Conv1D``, or
    a type given to :func:`stpnet.nn.register_linear_like`): read through
    :func:`stpnet.nn.linear_view`, replaced by a :class:`stpnet.nn.FactorizedLinear`."""

    name = "linear_like"
    dense = None
    linearized = True

    @property
    def counterpart(self):
        return nn.Linear

    def family(self, module):
        return linear_view(module) is not None

    def matches(self, module):
        return self.family(module)

    def geometry(self, module):
        view = linear_view(module)
        return view.in_features, view.out_features, ()

    def matrix(self, module):
        return linear_view(module).weight

    def dense_macs(self, module, input_shape):
        view = linear_view(module)
        return math.prod(tuple(input_shape)[:-1]) * view.in_features * view.out_features


class MultiheadAttentionType(LayerType):
    """``nn.MultiheadAttention``: compressed through its projections, once rewritten as the same
    function with Linear children (:class:`stpnet.nn.UnpackedMultiheadAttention`, :meth:`unpack`);
    it has no factorized layer of its own."""

    name = "multihead_attention"
    role = "attention"
    dense = nn.MultiheadAttention
    fusable = False

    def why_not(self, module):
        if module.bias_k is not None or module.add_zero_attn:
            return "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported"
        return None

    def geometry(self, module):
        return module.embed_dim, 3 * module.embed_dim, ()

    def unpack(self, module: nn.MultiheadAttention, packed: bool = True) -> UnpackedMultiheadAttention:
        """The same attention with its projections as Linear children: one packed query/key/value
        Linear (``packed``, when its key and value sizes allow it) or three."""
        return UnpackedMultiheadAttention.from_torch(module, packed=packed and module._qkv_same_embed_dim)


def _filled(dense: nn.Module, layer: FactorizedLayer) -> nn.Module:
    """``dense`` holding ``layer``'s rebuilt weight and its bias, in ``layer``'s training mode."""
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight().reshape(dense.weight.shape))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense.train(layer.training)
