"""stpnet: neural-network compression with semi-tensor product tensor decompositions.

The semi-tensor formats STTu, STT and STR link their factors with the semi-tensor product (STP);
with t = 1 they are Tucker, TT and TR.

Index convention: row-major; a dimension of size P*t splits as ``p*t + u`` (u fastest), the order
``B ⊗ I_t`` produces. The left STP of A (m x n) and B (p x q) is
``A ⋉ B = (A ⊗ I_{l/n})(B ⊗ I_{l/p})``, l = lcm(n, p); it is never built as a Kronecker product.

References
----------
Zhao, Liu, Huang, Zhu (2021), "Semi-tensor Product-based Tensor Decomposition for Neural Network
Compression" (the semi-tensor formats, cited below as Zhao et al. 2021). Oseledets (2011),
"Tensor-train decomposition". Zhao, Zhou, Xie, Zhang, Cichocki (2016), "Tensor ring
decomposition". De Lathauwer, De Moor, Vandewalle (2000), "A multilinear singular value
decomposition" and "On the best rank-1 and rank-(R1, ..., RN) approximation of higher-order tensors".
"""

from .compress import CompressionReport, compress, decompress, model_report
from .decomposition import InsufficientMemoryError, decompose, relative_error
from .formats import FORMATS, CPTensor, FactorizedTensor, TRTensor, TTTensor, TuckerTensor
from .stp import mode_product, rstp, stp, swap_matrix
from . import nn
from .deploy.fold import fold_batchnorm
from .deploy.fused import fuse
from .recovery import RecoveryReport, recover
from .saving import load, save

__version__ = "0.1.0"

__all__ = [
    "stp",
    "rstp",
    "mode_product",
    "swap_matrix",
    "decompose",
    "compress",
    "decompress",
    "recover",
    "RecoveryReport",
    "save",
    "load",
    "fuse",
    "fold_batchnorm",
    "model_report",
    "CompressionReport",
    "relative_error",
    "InsufficientMemoryError",
    "FactorizedTensor",
    "TuckerTensor",
    "TTTensor",
    "TRTensor",
    "CPTensor",
    "FORMATS",
    "nn",
]
