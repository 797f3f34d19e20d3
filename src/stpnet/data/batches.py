"""Deterministic minibatches from in-memory tensors, resumable and shardable across ranks."""

from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch

__all__ = ["epoch_indices", "iterate_batches", "batches_per_epoch"]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def epoch_indices(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The sample indices one rank visits in one epoch, in order.

    The permutation is ``torch.randperm(n)`` from a generator seeded with ``seed + epoch`` (or
    ``arange(n)`` without shuffling); it is padded by wrapping around to a multiple of
    ``world_size`` and rank ``r`` takes every ``world_size``-th index from position ``r``, exactly
    as ``torch.utils.data.DistributedSampler(drop_last=False)`` does.

    Returns
    -------
    torch.Tensor
        int64 indices, length ``ceil(n / world_size)``.
    """
    _check_int(n, "n", 1)
    _check_int(seed, "seed", 0)
    _check_int(epoch, "epoch", 0)
    _check_int(world_size, "world_size", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size - 1}] for world_size={world_size}, got {rank!r}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        order = order.repeat(math.ceil(total / n))[:total]
    return order[rank:total:world_size]


def batches_per_epoch(n: int, batch_size: int, *, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches :func:`iterate_batches` yields per epoch on each rank."""
    per_rank = math.ceil(_check_int(n, "n", 1) / _check_int(world_size, "world_size", 1))
    batch_size = _check_int(batch_size, "batch_size", 1)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x[idx], y[idx])`` minibatches for one epoch.

    Parameters
    ----------
    x, y : torch.Tensor
        Samples and targets with the same first dimension ``N``, on any device.
    batch_size : int
        Samples per batch (per rank).
    shuffle : bool
        Visit a random permutation (else the stored order).
    seed, epoch : int
        The permutation depends only on these (see :func:`epoch_indices`), so a run resumed at
        ``epoch`` sees the same order as the uninterrupted run.
    drop_last : bool
        Skip the final batch if it is smaller than ``batch_size``.
    rank, world_size : int
        This process's shard of the epoch: disjoint across ranks except for the wrap-around
        padding that makes every shard ``ceil(N / world_size)`` long.

    Returns
    -------
    iterator of tuple of torch.Tensor
        ``(x_batch, y_batch)`` pairs. Arguments are checked when this is called, not when the
        iterator is first advanced.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.ndim == 0 or y.ndim == 0:
        raise ValueError("x and y must be tensors with a leading sample dimension")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} samples but y holds {y.shape[0]}; they must match")
    _check_int(batch_size, "batch_size", 1)
    if x.shape[0] == 0:
        raise ValueError("x and y are empty; there is nothing to iterate over")
    order = epoch_indices(x.shape[0], shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    # Checked above, eagerly; the generator below only slices.
    return _slices(x, y, order, batch_size, stop)


def _slices(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, stop: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    x_order, y_order = order.to(x.device), order.to(y.device)
    for start in range(0, stop, batch_size):
        yield x[x_order[start : start + batch_size]], y[y_order[start : start + batch_size]]
