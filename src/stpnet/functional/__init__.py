"""Pure tensor kernels: reconstruction of each format and the STT/STR <-> TT/TR identity."""

from .reconstruct import tr_to_tensor, tt_to_tensor, tucker_to_tensor
from .retensorize import (
    copy_index_to_first_mode,
    copy_index_to_last_mode,
    first_core_from_classic,
    first_core_to_classic,
)

__all__ = [
    "tucker_to_tensor",
    "tt_to_tensor",
    "tr_to_tensor",
    "copy_index_to_first_mode",
    "copy_index_to_last_mode",
    "first_core_to_classic",
    "first_core_from_classic",
]
