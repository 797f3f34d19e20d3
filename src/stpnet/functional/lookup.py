"""Row lookup in a factorized matrix: ``W[:, i]`` for a batch of column indices ``i``, without the matrix.

A factorized embedding table (Hrinchuk et al. 2020, "Tensorized Embedding Layers") is the
matrix ``W`` (C_out x C_in) of a factorized Linear with C_in = the vocabulary and C_out = the
embedding dimension, so a lookup of token ``i`` is ``W e_i``. Applying ``W`` to one-hot vectors
would cost C_in per token; these kernels instead select, in every input-side factor, the slice of
the token's digit (``i = i_1 I_2..I_d + ... + i_d``, row-major over the input modes) and contract
only those slices, so a batch of N tokens costs N times a chain of small products, and neither
the table nor an N x C_in one-hot is ever formed. The output-side factors are merged once (a
(C_out/t) x (r a) matrix), as in the contraction paths of :mod:`stpnet.functional.contract`.

The layouts are those of the factorized Linear: sequential / ring
(TT/STT, TR/STR), paired (TT-matrix), Tucker-2 (Tucker/STTu). With t > 1 the copy index ``u`` of
the semi-tensor product is the fastest part of the input index (first input mode) and of the
output index (last output mode), exactly as in the Linear's contraction.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .reconstruct import _chain
from .retensorize import first_core_to_classic

__all__ = ["digits", "sequential_output_factor", "sequential_lookup", "paired_lookup", "tucker2_lookup", "cp_lookup"]


def digits(indices: torch.Tensor, modes: Sequence[int]) -> list[torch.Tensor]:
    """The mixed-radix digits of flat ``indices`` over ``modes`` (row-major: the first mode varies
    slowest), one tensor per mode."""
    out = []
    rest = indices
    for m in reversed(modes):
        out.append(rest % m)
        rest = torch.div(rest, m, rounding_mode="floor")
    return out[::-1]


def sequential_output_factor(cores: Sequence[torch.Tensor], n_in: int) -> torch.Tensor:
    """The output-side cores of a sequential / ring Linear merged into B: (C_out/t, r * a)."""
    Q = _chain(list(cores[n_in:]))  # (r, C_out/t, a)
    return Q.permute(1, 0, 2).reshape(Q.shape[1], Q.shape[0] * Q.shape[2])


def sequential_lookup(indices: torch.Tensor, cores: Sequence[torch.Tensor], t: int, in_modes: Sequence[int],
                      B: torch.Tensor) -> torch.Tensor:
    """Columns ``indices`` (N,) of a sequential / ring factorized matrix, as rows (N, C_out).

    ``cores`` are the semi-tensor cores of modes [I_1..I_d, O_1..O_e]; ``B`` is
    :func:`sequential_output_factor` of them.
    """
    n = indices.shape[0]
    d = len(in_modes)
    parts = digits(indices, in_modes)
    H0 = first_core_to_classic(cores[0], t)  # (a, I_1 * t, r_1), mode index (i_1, u)
    a, r = H0.shape[0], H0.shape[-1]
    M = H0.reshape(a, in_modes[0], t, r)[:, parts[0]]  # (a, N, t, r_1)
    M = M.permute(1, 0, 2, 3).reshape(n, a * t, r)
    for k in range(1, d):
        G = cores[k][:, parts[k]].transpose(0, 1)  # (N, r_{k-1}, r_k)
        M = torch.bmm(M, G)
    r = M.shape[-1]
    z = M.reshape(n, a, t, r).permute(0, 3, 1, 2).reshape(n, r * a, t)  # rows (b, a), u last
    return (B @ z).reshape(n, -1)


def paired_lookup(indices: torch.Tensor, cores: Sequence[torch.Tensor], in_modes: Sequence[int],
                  out_modes: Sequence[int], t: int) -> torch.Tensor:
    """Columns ``indices`` (N,) of a paired (TT-matrix) factorized matrix of modes
    [I_1 O_1, ..., I_d O_d], as rows (N, C_out)."""
    n = indices.shape[0]
    d = len(in_modes)
    parts = digits(indices, in_modes)
    o0 = out_modes[0] // t if d == 1 else out_modes[0]
    state = cores[0].reshape(in_modes[0], o0, -1, t)[parts[0]]  # (N, O, b, u)
    for k in range(1, d):
        G = cores[k]
        o = out_modes[k] // t if k == d - 1 else out_modes[k]
        Gk = G.reshape(G.shape[0], in_modes[k], o, G.shape[-1])[:, parts[k]].transpose(0, 1)  # (N, b, o, b')
        state = torch.einsum("nObu,nbov->nOovu", state, Gk).reshape(n, -1, G.shape[-1], t)
    return state.reshape(n, -1)


def tucker2_lookup(indices: torch.Tensor, core: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor,
                   t: int) -> torch.Tensor:
    """Columns ``indices`` (N,) of a Tucker-2 / STTu matrix ``(U_out ⊗ I_t) core (U_in ⊗ I_t)^T``,
    as rows (N, C_out)."""
    n = indices.shape[0]
    p = torch.div(indices, t, rounding_mode="floor")
    u = indices % t
    z = U_in.new_zeros(n, U_in.shape[1], t)
    z[torch.arange(n, device=indices.device), :, u] = U_in[p]  # (U_in ⊗ I_t)^T e_i
    z = z.reshape(n, -1) @ core.transpose(-1, -2)  # (n, R_o)
    return (U_out @ z.reshape(n, U_out.shape[1], -1)).reshape(n, -1)


def cp_lookup(indices: torch.Tensor, factors: Sequence[torch.Tensor], in_modes: Sequence[int],
              B: torch.Tensor) -> torch.Tensor:
    """Columns ``indices`` (N,) of a CP matrix of modes [I_1..I_d, O_1..O_e], as rows (N, C_out):
    the Hadamard product of the input factors' rows picked by the index digits, times ``B^T``
    (``B`` the Khatri-Rao product of the output factors)."""
    parts = digits(indices, in_modes)
    z = factors[0][parts[0]]
    for k in range(1, len(in_modes)):
        z = z * factors[k][parts[k]]
    return z @ B.transpose(0, 1)
