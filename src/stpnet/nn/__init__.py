"""Factorized layers: each owns a factorized tensor (``stpnet.formats``) as its weight.

Their deployment forms (fusing, folding BatchNorm) live in :mod:`stpnet.deploy`.
"""

import importlib
import warnings

from .attention import UnpackedMultiheadAttention
from .base import FORWARD_PATHS, FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .convert import dense_counterpart, from_dense, to_dense, why_not_factorizable
from .cost import PathCost
from .embedding import FactorizedEmbedding
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
    "Layout",
    "LAYOUTS",
    "layout_named",
    "LayerType",
    "LAYER_TYPES",
    "layer_type",
    "factorized_layer_type",
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

# Names that moved to stpnet.deploy, where the deployment forms live: still served here for one
# release, with a DeprecationWarning (loaded on first use, so stpnet.nn never imports stpnet.deploy).
_MOVED_TO_DEPLOY = {
    **dict.fromkeys(("FUSED_FORMS", "FusedLayer", "FusedSequential", "FusedTucker2", "FusedPaired", "FusedCP", "fuse",
                     "fuse_layer", "fused_forms"), "stpnet.deploy.fused"),
    "fold_batchnorm": "stpnet.deploy.fold",
}


def __getattr__(name: str):
    if name in _MOVED_TO_DEPLOY:
        module = _MOVED_TO_DEPLOY[name]
        warnings.warn(f"stpnet.nn.{name} is deprecated and will be removed in the next release; import it from "
                      f"{module}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'stpnet.nn' has no attribute {name!r}")
