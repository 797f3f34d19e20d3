"""stpnet: neural-network compression with semi-tensor product tensor decompositions.

The semi-tensor formats STTu, STT and STR link their factors with the semi-tensor product (STP);
with t = 1 they are Tucker, TT and TR.
"""

from .compress import CompressionReport, compress, decompress, model_report
from .decomposition import InsufficientMemoryError, decompose, relative_error
from .formats import FORMATS, FactorizedTensor, TRTensor, TTTensor, TuckerTensor
from .stp import mode_product, rstp, stp, swap_matrix
from . import nn
from .nn.fused import fuse

__version__ = "0.1.0"

__all__ = [
    "stp",
    "rstp",
    "mode_product",
    "swap_matrix",
    "decompose",
    "compress",
    "decompress",
    "fuse",
    "model_report",
    "CompressionReport",
    "relative_error",
    "InsufficientMemoryError",
    "FactorizedTensor",
    "TuckerTensor",
    "TTTensor",
    "TRTensor",
    "FORMATS",
    "nn",
]
