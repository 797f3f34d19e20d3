"""Decompositions: pure functions from a dense tensor to a factorized one."""

from .api import decompose, relative_error
from .cp import cp_als, mttkrp
from .memory import InsufficientMemoryError
from .ranks import ranks_for_budget
from .svd import truncated_svd
from .tr import str_svd, tr_als, tr_svd
from .tt import stt_svd, tt_svd
from .tucker import hooi, st_hosvd

__all__ = [
    "decompose",
    "relative_error",
    "InsufficientMemoryError",
    "ranks_for_budget",
    "truncated_svd",
    "st_hosvd",
    "hooi",
    "tt_svd",
    "stt_svd",
    "tr_svd",
    "str_svd",
    "tr_als",
    "cp_als",
    "mttkrp",
]
