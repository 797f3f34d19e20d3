"""Timing a call for the measured path choices (``forward_path='measure'``, ``fuse(example=...)``)."""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["best_time", "interleaved_best_times"]


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


def interleaved_best_times(runs: dict, device: torch.device, rounds: int = 3, repeats: int = 2) -> dict:
    """Best seconds of each of ``runs`` (name -> callable), timed in ``rounds`` alternating rounds
    (in each, every callable gets a warm-up call and ``repeats`` timed ones): a slow spell of a
    shared machine then hits every candidate instead of the one being timed at that moment."""
    times = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] = min(times[name], best_time(run, device, repeats))
    return times
