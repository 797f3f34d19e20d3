"""Native CPU kernels for inference, compiled on first use (:mod:`stpnet.deploy.native.build`).

Optional: without a C compiler everything runs on PyTorch ops, and ``STPNET_NATIVE=0`` turns them
off. :class:`OnepassConv2d` runs a factorized convolution's plain chain in one pass per image; a
fused layer (:func:`stpnet.fuse`) offers it as its ``'onepass'`` form where it applies.
"""

from .build import cache_dir, load_library, native_enabled
from .onepass import OnepassConv2d, onepass_available

__all__ = ["OnepassConv2d", "onepass_available", "load_library", "native_enabled", "cache_dir"]
