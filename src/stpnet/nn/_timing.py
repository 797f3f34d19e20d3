"""Timing a call for the measured path choices (``forward_path='measure'``, ``fuse(example=...)``)."""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["best_time"]


def best_time(run: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Best seconds of ``repeats`` calls of ``run`` after one warm-up call (synchronised on CUDA)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
