"""Cost model of the two forward paths: multiply-adds and activation memory, and the choice.

``rebuild`` reconstructs the dense weight once per call and runs the dense op; ``contract``
applies the factors to the input in sequence. Each is scored as multiply-adds (weighted up for
narrow and grouped ops) plus a weight on the activation elements it writes (memory traffic) plus
a fixed cost per op launched, and the cheaper one runs.

The CPU constants were fitted to measured times (``bench/cost_model.py``, BENCHMARKS.md): the
rebuild and contract paths of every 3x3 and 1x1 convolution of ResNet-20 and WRN-16-8 compressed
9x and 20x in all seven formats, at batch 1 and 32, in inference. The analytic choice is a
guide, not a guarantee; ``forward_path='measure'`` and ``stpnet.fuse(model, example=x)`` time
the paths instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["PathCost", "Stage", "MEMORY_WEIGHT", "OP_COST", "GROUP_PENALTY", "choose", "dense_layer_macs"]

#: Multiply-adds that one written activation element is worth, per device type. Small-rank
#: contractions are memory-bound, so their intermediate tensors matter as much as their FLOPs.
MEMORY_WEIGHT = {"cpu": 32.0, "cuda": 64.0}

#: Multiply-adds that launching one op is worth, per device type: at batch 1 a chain of three
#: small ops loses to one dense convolution of more multiply-adds (on CPU a launch costs about
#: what 1e6 multiply-adds of a dense 3x3 convolution do; ``bench/cost_model.py`` fits it). Not
#: measured on CUDA (0 there).
OP_COST = {"cpu": 1e6}

#: Below this many channels a convolution or matrix product runs at a fraction of peak
#: throughput (measured on CPU: a 3 -> 3 channel 3x3 convolution ran several times slower per
#: multiply-add than a 64 -> 64 one), so its multiply-adds are weighted up by WIDE / channels.
WIDE = 8

#: Extra weight per additional group of the shared-kernel k x k stage of the sequential and ring
#: layouts (``1 + GROUP_PENALTY * (groups - 1)``): a kernel shared by g groups runs as one
#: (d+1)-D convolution, slower per multiply-add than a plain one.
GROUP_PENALTY = 0.3


def narrow_penalty(channels: int) -> float:
    """Weight of one multiply-add of an op whose narrowest channel dimension is ``channels``."""
    return max(1.0, WIDE / max(channels, 1))


class Stage(NamedTuple):
    """One op of a contraction path, per sample: its multiply-adds, its narrowest channel count,
    and a slowdown factor for its form (grouped, shared kernels), 1 for a plain op."""

    macs: int
    channels: int
    slowdown: float = 1.0

    def work(self) -> float:
        """Multiply-adds weighted for the op's width (:func:`narrow_penalty`) and form."""
        return self.macs * narrow_penalty(self.channels) * self.slowdown


@dataclass(frozen=True)
class PathCost:
    """Estimated cost of one forward call.

    Attributes
    ----------
    macs : int
        Multiply-adds for the whole batch, including the once-per-call work on the factors.
    activations : int
        Elements of the intermediate and output activations written.
    peak : int
        Largest single activation tensor, in elements.
    work : float, optional
        Multiply-adds weighted for narrow (inefficient) operations; used only for the choice.
    once : int, optional
        The part of ``macs`` (and ``work``) spent on the factors themselves (rebuilding the
        weight, merging cores), which inference caches: paid on every training call, once in
        eval mode.
    once_activations : int, optional
        The part of ``activations`` that this work writes (the rebuilt weight), also cached.
    ops : int, optional
        Ops launched per call (the dense op: 1; a contraction: one per stage).
    """

    macs: int
    activations: int
    peak: int
    work: float | None = None
    once: int = 0
    once_activations: int = 0
    ops: int = 1

    def score(self, device_type: str, cached: bool = False) -> float:
        """Estimated cost: ``work`` (multiply-adds weighted by :func:`narrow_penalty`, default
        ``macs``) plus the memory weight times the activations written plus the op cost times
        ``ops``; with ``cached`` (an inference call, the factor work reused), without ``once``."""
        work = self.macs if self.work is None else self.work
        activations = self.activations
        if cached:
            work -= self.once
            activations -= self.once_activations
        return work + MEMORY_WEIGHT.get(device_type, 16.0) * activations + OP_COST.get(device_type, 0.0) * self.ops


def choose(costs: dict[str, PathCost], device_type: str, cached: bool = False) -> str:
    """The path with the lowest score (ties go to 'rebuild', the simpler one); ``cached``: for an
    inference call, where the work on the factors is cached (:attr:`PathCost.once`)."""
    return min(sorted(costs), key=lambda p: (costs[p].score(device_type, cached), p != "rebuild"))


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def prod(values) -> int:
    return math.prod(int(v) for v in values)


def dense_layer_macs(layer, input_shape) -> int:
    """Multiply-adds of the dense op of a layer on ``input_shape``: ``nn.Linear``, ``nn.ConvNd``
    (groups counted), ``nn.Embedding`` (0: a gather), or their factorized counterparts, which carry
    the same attributes. The one count for the layers' ``dense_macs`` and the model report."""
    shape = tuple(int(s) for s in input_shape)
    if hasattr(layer, "num_embeddings"):
        return 0
    if not hasattr(layer, "kernel_size"):  # a Linear: (..., in_features)
        return prod(shape[:-1]) * layer.in_features * layer.out_features
    kernel = tuple(layer.kernel_size)
    if layer.padding == "same":
        out = prod(shape[2:])
    else:
        pad = (0,) * len(kernel) if layer.padding == "valid" else tuple(layer.padding)
        out = prod(conv_output_size(s, k, st, p, d)
                   for s, k, st, p, d in zip(shape[2:], kernel, layer.stride, pad, layer.dilation))
    return shape[0] * layer.out_channels * (layer.in_channels // layer.groups) * prod(kernel) * out
