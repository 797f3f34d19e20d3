"""Factorized layers: each owns a factorized tensor (``stpnet.formats``) as its weight."""

from .attention import UnpackedMultiheadAttention
from .base import FORWARD_PATHS, FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .convert import dense_counterpart, from_dense, to_dense, why_not_factorizable
from .cost import PathCost
from .embedding import FactorizedEmbedding
from .fold import fold_batchnorm
from .fused import (FUSED_FORMS, FusedCP, FusedLayer, FusedPaired, FusedSequential, FusedTucker2, fuse, fuse_layer,
                    fused_forms)
from .layer_types import LAYER_TYPES, LayerType, factorized_layer_type, layer_type
from .layouts import LAYOUTS, Layout, layout_named
from .linear import FactorizedLinear
from .linear_like import LinearView, linear_view, register_linear_like
from .tensorize import Tensorization, channel_modes, factorize

__all__ = [
    "FactorizedLayer",
    "FactorizedLinear",
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedEmbedding",
    "LinearView",
    "linear_view",
    "register_linear_like",
    "UnpackedMultiheadAttention",
    "FUSED_FORMS",
    "FusedLayer",
    "FusedSequential",
    "FusedTucker2",
    "FusedPaired",
    "FusedCP",
    "Layout",
    "LAYOUTS",
    "layout_named",
    "LayerType",
    "LAYER_TYPES",
    "layer_type",
    "factorized_layer_type",
    "fuse",
    "fuse_layer",
    "fused_forms",
    "fold_batchnorm",
    "from_dense",
    "to_dense",
    "dense_counterpart",
    "why_not_factorizable",
    "FORWARD_PATHS",
    "PathCost",
    "Tensorization",
    "channel_modes",
    "factorize",
]
