"""Factorized convolutions as chains of plain convolutions, for deployment at small batch.

The contraction kernels of :mod:`stpnet.functional.contract` apply a semi-tensor link as a
reshape and share one spatial kernel across groups through strided views: no operator is ever
larger than its factors. At batch 1 on CPU, though, the fixed cost of each extra op call is
comparable to a small convolution's arithmetic, and grouped or batched forms of the shared kernel
run slower than one plain convolution on a block-diagonal copy of it (``bench/latency.py``,
BENCHMARKS.md). The functions here build, from the factors, the weights
of three plain convolutions that compute the same function:

``1x1 (W_in) -> k x k (W_mid) -> 1x1 (W_out)``

and of the two-op forms that merge the k x k stage with one side. They deliberately spend zeros
(the identity blocks of ``U ⊗ I_t`` and of a kernel shared by ``g`` groups) to run as the ops the
backend executes fastest; they are inference-time operators derived from the factors (for
:class:`stpnet.deploy.fused.FusedLayer`), chosen by measurement, never stored as parameters.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = ["PLAIN_FORMS", "PlainChain", "kron_identity", "sequential_plain", "tucker2_plain", "cp_plain",
           "PlainForm", "plain_form_weights", "plain_conv"]

#: The plain-convolution forms of a factorized convolution: ``'plain'`` (1x1 -> k x k -> 1x1),
#: ``'merged_in'`` (k x k with the input 1x1 merged in -> 1x1), ``'merged_out'`` (1x1 -> k x k
#: with the output 1x1 merged in).
PLAIN_FORMS = ("plain", "merged_in", "merged_out")


class PlainChain(NamedTuple):
    """Weights of ``1x1 -> k x k -> 1x1`` as matrices and a kernel.

    W_in : (m1, C_in)
    W_mid : (m2, m1, *kernel)
    W_out : (C_out, m2)
    """

    W_in: torch.Tensor
    W_mid: torch.Tensor
    W_out: torch.Tensor


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _block_diagonal(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """``I_groups ⊗ kernel`` over the channel dimensions of a (m2, m1, *k) kernel: (g m2, g m1, *k)."""
    m2, m1 = kernel.shape[:2]
    k = kernel.shape[2:]
    eye = _eye(groups, kernel).reshape(groups, 1, groups, 1, *([1] * len(k)))
    return (eye * kernel.reshape(1, m2, 1, m1, *k)).reshape(groups * m2, groups * m1, *k)


def kron_identity(U: torch.Tensor, t: int) -> torch.Tensor:
    """``U ⊗ I_t`` over the first two dimensions of a (m, c, *k) matrix or kernel:
    ``[(i, u), (j, v), ...] = U[i, j, ...] δ(u, v)``, shape (m t, c t, *k). Differentiable."""
    m, c = U.shape[:2]
    k = U.shape[2:]
    eye = _eye(t, U).reshape(1, t, 1, t, *([1] * len(k)))
    return (U.reshape(m, 1, c, 1, *k) * eye).reshape(m * t, c * t, *k)


def sequential_plain(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, rank_in: int, ring: int, t: int,
                     kernel_size: Sequence[int]) -> PlainChain:
    """The plain chain of a sequential / ring convolution (see
    :class:`stpnet.functional.contract.SequentialFactors`).

    The ``g = ring * t`` groups of the rank space become channel blocks: ``W_in`` is ``A`` with its
    columns reordered to (group, rank), ``W_mid`` the shared kernel repeated on the diagonal, and
    ``W_out`` maps (a, u, r') to the output channels (o, u), ``B ⊗ I_t`` in that order.
    """
    r, a = rank_in, ring
    g = a * t
    c_in = A.shape[0]
    W_in = A.reshape(c_in, r, g).permute(2, 1, 0).reshape(g * r, c_in)  # rows (g, b)
    r_out = S.shape[0]
    W_mid = _block_diagonal(S.reshape(r_out, r, *kernel_size), g)  # rows (g, b'), columns (g, b)
    Bm = B.reshape(B.shape[0], r_out, a)  # (o, b', a)
    # W_out[(o, u), (a, v, b')] = B[o, (b', a)] δ(u, v)
    W_out = (Bm.permute(0, 2, 1).reshape(B.shape[0], 1, a, 1, r_out)
             * _eye(t, B).reshape(1, t, 1, t, 1)).reshape(B.shape[0] * t, g * r_out)
    return PlainChain(W_in, W_mid, W_out)


def tucker2_plain(core: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor, t_out: int, t_in: int) -> PlainChain:
    """The plain chain of a Tucker-2 / STTu convolution: ``U_in^T ⊗ I_t`` -> the merged rank-space
    kernel ``core`` (R_o, R_i, *k) -> ``U_out ⊗ I_t``."""
    return PlainChain(kron_identity(U_in.transpose(0, 1), t_in), core, kron_identity(U_out, t_out))


def cp_plain(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, kernel_size: Sequence[int]) -> PlainChain:
    """The plain chain of a CP convolution: ``A^T`` -> the R depthwise filters on the diagonal of a
    full k x k kernel -> ``B``."""
    R = A.shape[1]
    kernel = S.reshape(R, *kernel_size)
    diagonal = _eye(R, S).reshape(R, R, *([1] * len(kernel_size))) * kernel.unsqueeze(1)
    return PlainChain(A.transpose(0, 1), diagonal, B)


def _as_kernel(W: torch.Tensor, dims: int) -> torch.Tensor:
    return W.reshape(*W.shape, *([1] * dims)).contiguous()


def _last_to_second(W: torch.Tensor) -> torch.Tensor:
    """(m, *k, c) -> (m, c, *k), with non-negative axes (the ONNX export of ``movedim(-1, 1)``
    writes a negative permutation that ONNX Runtime rejects)."""
    return W.permute(0, W.ndim - 1, *range(1, W.ndim - 1))


class PlainForm(NamedTuple):
    """Convolution weights (contiguous, ``(out, in, *kernel)``) in the order they apply, and the
    index of the one that carries the stride, padding and dilation (the k x k stage)."""

    weights: tuple[torch.Tensor, ...]
    spatial: int


def plain_form_weights(chain: PlainChain, form: str) -> PlainForm:
    """The convolutions of one of ``PLAIN_FORMS`` built from ``chain``."""
    dims = chain.W_mid.ndim - 2
    if form == "plain":
        return PlainForm((_as_kernel(chain.W_in, dims), chain.W_mid.contiguous(), _as_kernel(chain.W_out, dims)), 1)
    if form == "merged_in":
        merged = _last_to_second(torch.tensordot(chain.W_mid, chain.W_in, dims=([1], [0])))  # (m2, C_in, *k)
        return PlainForm((merged.contiguous(), _as_kernel(chain.W_out, dims)), 0)
    if form == "merged_out":
        merged = torch.tensordot(chain.W_out, chain.W_mid, dims=([1], [0]))  # (C_out, m1, *k)
        return PlainForm((_as_kernel(chain.W_in, dims), merged.contiguous()), 1)
    raise ValueError(f"form must be one of {PLAIN_FORMS}, got {form!r}")


def plain_conv(x: torch.Tensor, form: PlainForm, stride: Sequence[int], padding: Sequence[int] | str,
               dilation: Sequence[int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Run the convolutions of ``form`` (from :func:`plain_form_weights`) on ``x``, an already
    padded (N, C_in, *spatial) input; the spatial stage gets ``stride``, ``padding`` and
    ``dilation``, the last op adds ``bias``."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.ndim - 3]
    last = len(form.weights) - 1
    for i, W in enumerate(form.weights):
        b = bias if i == last else None
        x = conv(x, W, b, stride, padding, dilation) if i == form.spatial else conv(x, W, b)
    return x
