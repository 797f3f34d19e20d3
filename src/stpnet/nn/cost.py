"""Cost model of the two forward paths: multiply-adds and activation memory, and the choice.

``rebuild`` reconstructs the dense weight once per call and runs the dense op; ``contract``
applies the factors to the input in sequence. Each is scored as multiply-adds plus a weight on
the activation elements it writes (memory traffic), and the cheaper one runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PathCost", "MEMORY_WEIGHT", "choose", "dense_layer_macs"]

#: Multiply-adds that one written activation element is worth, per device type. Small-rank
#: contractions are memory-bound, so their intermediate tensors matter as much as their FLOPs.
MEMORY_WEIGHT = {"cpu": 16.0, "cuda": 64.0}

#: Below this many channels a convolution or matrix product runs at a fraction of peak
#: throughput (measured on CPU: a 10 -> 10 channel 3x3 convolution ran about 4.6x slower per
#: multiply-add than a 64 -> 64 one), so its multiply-adds are weighted up by WIDE / channels.
WIDE = 32


def narrow_penalty(channels: int) -> float:
    """Weight of one multiply-add of an op whose narrowest channel dimension is ``channels``."""
    return max(1.0, WIDE / max(channels, 1))


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
    """

    macs: int
    activations: int
    peak: int
    work: float | None = None

    def score(self, device_type: str) -> float:
        """Estimated cost: ``work`` (multiply-adds weighted by :func:`narrow_penalty`, default
        ``macs``) plus the memory weight times the activations written."""
        work = self.macs if self.work is None else self.work
        return work + MEMORY_WEIGHT.get(device_type, 16.0) * self.activations


def choose(costs: dict[str, PathCost], device_type: str) -> str:
    """The path with the lowest score (ties go to 'rebuild', the simpler one)."""
    return min(sorted(costs), key=lambda p: (costs[p].score(device_type), p != "rebuild"))


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
