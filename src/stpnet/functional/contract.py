"""Contraction forward paths: apply a factorized weight to an input without rebuilding it.

Every STP link is a reshape: the copy index ``u`` of a semi-tensor format rides along as the
fastest part of a channel dimension, or as the depth dimension of a 5-D view, so no Kronecker
product and no channel permutation of the activations is ever built.

Layouts (index convention: row-major, a dimension of size P*t splits as ``p*t + u``):

* ``sequential`` / ``ring`` (TT/STT, TR/STR): modes [I_1..I_d, K, O_1..O_e]. The input-side
  cores are merged into one C_in x (r_d * a * t) matrix, the spatial core runs as a k x k
  convolution in the rank space (``a * t`` groups sharing one kernel, ``a`` the ring rank), and
  the output-side cores are merged into one (C_out/t) x (r' * a) matrix.
* ``paired`` (TT/STT): modes [K, I_1 O_1, ..., I_d O_d]: the spatial core filters each input
  channel, then the channel cores are contracted one at a time.
* ``tucker2`` (Tucker/STTu): 1x1 (U_in ⊗ I_t)^T, the core as a k x k convolution, 1x1 (U_out ⊗ I_t).
* ``cp`` (CP): modes [I_1..I_d, K, O_1..O_e] as a sum of R rank-one terms: 1x1 (Khatri-Rao of
  the input factors), a depthwise k x k convolution (one filter per rank-one term), 1x1
  (Khatri-Rao of the output factors): the CP convolution of Lebedev et al. (2015).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .conv import conv_nd, recording
from .plain import kron_identity
from .reconstruct import _chain, khatri_rao
from .retensorize import first_core_to_classic

__all__ = [
    "SequentialFactors",
    "sequential_factors",
    "sequential_conv",
    "GROUPED_STAGES",
    "grouped_stage",
    "grouped_shared_conv",
    "sequential_linear",
    "tucker2_conv",
    "tucker2_conv_merged",
    "tucker2_kernel",
    "conv1x1_mix",
    "tucker2_linear",
    "paired_conv",
    "paired_linear",
    "CPFactors",
    "cp_factors",
    "cp_conv",
    "cp_linear",
]


class SequentialFactors(NamedTuple):
    """The three small operators of a sequential or ring layout.

    A : (C_in, r * a * t), columns ordered (b, a, u)
    S : (r', r, K) spatial core, or None for a linear layer
    B : (C_out / t, r' * a), columns ordered (b', a)
    """

    A: torch.Tensor
    S: torch.Tensor | None
    B: torch.Tensor
    rank_in: int
    ring: int
    t: int


def sequential_factors(cores: Sequence[torch.Tensor], t: int, n_in: int, has_kernel: bool) -> SequentialFactors:
    """Merge TT/STT or TR/STR cores of modes [I_1..I_d, (K,) O_1..O_e] into A, S, B.

    ``cores`` are the semi-tensor cores; ``n_in`` is d, the number of input modes.
    """
    H = [first_core_to_classic(cores[0], t), *cores[1:]]  # classic cores of X'
    a = H[0].shape[0]
    P = _chain(H[:n_in])  # (a, I_1*t*I_2..I_d, r)
    r = P.shape[-1]
    c_in = P.shape[1] // t
    first = H[0].shape[1] // t
    A = P.reshape(a, first, t, c_in // first, r).permute(1, 3, 4, 0, 2).reshape(c_in, r * a * t)
    k = n_in
    S = None
    if has_kernel:
        S = H[k].permute(2, 0, 1)  # (r', r, K)
        k += 1
    Q = _chain(H[k:])  # (r', C_out/t, a)
    B = Q.permute(1, 0, 2).reshape(Q.shape[1], Q.shape[0] * a)
    return SequentialFactors(A, S, B, r, a, t)


#: How the grouped k x k stage of :func:`sequential_conv` runs (the ``a * t`` groups share one
#: kernel): ``'depth'``, one (d+1)-D convolution with unit extent along the group index (no copy);
#: ``'fold'``, the groups moved into the batch (a copy in and out, one batched convolution);
#: ``'stacked'``, 2-D only: the groups stacked along the height with their padding rows between
#: them (a copy in), one plain 2-D convolution, a strided view out; ``'block'``, the groups as
#: channel blocks of one plain convolution whose kernel is ``S ⊗ I_g`` (no copy of the
#: activations; ``g`` times the multiply-adds, spent on zeros, for an op of ``g`` times the width,
#: which oneDNN runs faster than the narrow ones when the rank space is a few channels wide).
#: ``bench/spatial_stage.py`` measures them.
GROUPED_STAGES = ("depth", "fold", "stacked", "block")


def grouped_stage(batch: int, spatial: Sequence[int], stride: Sequence[int], device_type: str = "cpu",
                  channels: int | None = None, needs_grad: bool = False) -> str:
    """The default form of the grouped k x k stage.

    On CPU: ``'stacked'`` for one sample of 2-D maps of at least 16x16 positions with height
    stride 1; for batches that need gradients, ``'block'`` when the stage's input is ``channels``
    = r * g <= 8 channels wide, or <= 12 wide on maps of at least 32x32 positions; ``'depth'``
    otherwise (and on other devices, where it has not been measured). The thresholds follow
    ``bench/spatial_stage.py --micro`` (batch 1: the stacked form is faster than the depth form
    from 16x16 maps up, slower at 8x8) and ``--micro-train`` (forward + backward at batch 128: the
    block form is faster up to the widths above). Forward only, the block form is faster alone but
    made a whole network slower, so inference keeps the depth form (BENCHMARKS.md, "Inference
    latency of whole networks")."""
    if device_type != "cpu":
        return "depth"
    if batch == 1:
        return "stacked" if len(spatial) == 2 and stride[0] == 1 and math.prod(spatial) >= 256 else "depth"
    if needs_grad and channels is not None and len(spatial) <= 2 and (
            channels <= 8 or (channels <= 12 and math.prod(spatial) >= 1024)):
        return "block"
    return "depth"


def _mix(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W`` (m, c) applied to every sample of ``x`` (n, c, P): (n, m, P).

    A batched product with ``W`` broadcast by ``expand`` (no copy): faster in forward+backward
    than ``W @ x``, which torch folds into one large product through copies.
    """
    return torch.bmm(W.unsqueeze(0).expand(x.shape[0], -1, -1), x)


def conv1x1_mix(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W`` (m, c) applied to every sample of ``x`` (n, c, P) as a 1x1 ``conv1d``: the same result
    as the batched product, as the op that inference runtimes (oneDNN, ONNX Runtime) optimise best."""
    return F.conv1d(x, W.unsqueeze(-1))


def grouped_shared_conv(z: torch.Tensor, S: torch.Tensor, stride: Sequence[int], padding: Sequence[int] | str,
                        dilation: Sequence[int], stage: str | None = None) -> torch.Tensor:
    """One kernel ``S`` (r', r, *k) applied to every group of ``z`` (n, r, g, *spatial): the grouped
    stage of :func:`sequential_conv`, in the form ``stage`` (see ``GROUPED_STAGES``; None:
    :func:`grouped_stage`). Returns (n, r', g, *spatial_out), possibly a strided view."""
    n, r, g = z.shape[:3]
    spatial = z.shape[3:]
    if stage is None:
        needs_grad = torch.is_grad_enabled() and (z.requires_grad or S.requires_grad)
        stage = "depth" if recording() else grouped_stage(n, spatial, stride, z.device.type, r * g, needs_grad)
    elif stage not in GROUPED_STAGES:
        raise ValueError(f"stage must be one of {GROUPED_STAGES} or None, got {stage!r}")
    if stage == "block":
        y = conv_nd(z.reshape(n, r * g, *spatial), kron_identity(S, g), stride, padding, dilation)
        return y.reshape(n, S.shape[0], g, *y.shape[2:])
    if stage == "stacked" and len(spatial) == 2 and stride[0] == 1 and not isinstance(padding, str):
        return _stacked_conv(z, S, stride, padding, dilation)
    if stage == "fold" or len(spatial) == 3:  # 3-D maps: torch has no 4-D convolution
        y = conv_nd(z.movedim(2, 1).reshape(n * g, r, *spatial), S, stride, padding, dilation)
        return y.reshape(n, g, S.shape[0], *y.shape[2:]).movedim(1, 2)
    # the group index becomes a depth dimension: one (d+1)-D convolution whose kernel has extent
    # 1 along it shares the spatial kernel across all groups, no copy
    pad = padding if isinstance(padding, str) else (0, *padding)
    return conv_nd(z, S.unsqueeze(2), (1, *stride), pad, (1, *dilation))


def _stacked_conv(z: torch.Tensor, S: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """The shared kernel ``S`` (r', r, kh, kw) on every group of ``z`` (n, r, g, H, W), as one 2-D
    convolution over the groups stacked along the height, each with its own padding rows (so no
    window spans two groups). Height stride 1. Returns (n, r', g, H_out, W_out), a strided view."""
    n, r, g, H, W = z.shape
    ph, pw = padding
    Hp = H + 2 * ph
    stacked = F.pad(z, (0, 0, ph, ph)).reshape(n, r, g * Hp, W)
    y = F.conv2d(stacked, S, None, (1, stride[1]), (0, pw), dilation)  # (n, r', g*Hp - dh*(kh-1), W_out)
    H_out = Hp - dilation[0] * (S.shape[2] - 1)
    return y.unfold(2, H_out, Hp).transpose(-1, -2)  # windows of H_out rows every Hp rows: one per group


def sequential_conv(
    x: torch.Tensor,
    f: SequentialFactors,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    mix=_mix,
    stage: str | None = None,
) -> torch.Tensor:
    """Convolution with a sequential / ring factorized kernel: 1x1 -> k x k (grouped) -> 1x1.

    ``x`` is (N, C_in, *spatial) with 1 to 3 spatial dimensions (already padded for non-zero
    padding modes); the output is (N, C_out, *spatial_out). ``stage`` is the form of the grouped
    k x k stage (one of ``GROUPED_STAGES``; default :func:`grouped_stage`); a form that does not
    apply to the input (``'stacked'`` with a height stride, 1-D or 3-D maps) runs as ``'depth'``
    (3-D maps: ``'fold'``). All forms compute the same function.
    """
    n, c_in = x.shape[:2]
    spatial = x.shape[2:]
    r, a, t = f.rank_in, f.ring, f.t
    g = a * t
    z = mix(f.A.transpose(-1, -2), x.reshape(n, c_in, -1))  # (n, r*a*t, P_in), channels (b, a, u)
    r_out = f.S.shape[0]
    S = f.S.reshape(r_out, r, *kernel_size)
    if g == 1:
        if stage is not None and stage not in GROUPED_STAGES:
            raise ValueError(f"stage must be one of {GROUPED_STAGES} or None, got {stage!r}")
        z = conv_nd(z.reshape(n, r, *spatial), S, stride, padding, dilation)
    else:
        z = grouped_shared_conv(z.reshape(n, r, g, *spatial), S, stride, padding, dilation, stage)
    out_spatial = z.shape[-len(spatial):]
    z = z.reshape(n, r_out * a, -1)  # rows (b', a), columns (u, P)
    out = mix(f.B, z)  # (n, C_out/t, t*P)
    return out.reshape(n, -1, *out_spatial)


def _left_apply(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``W`` (m, k) applied to every sample of ``z`` (n, k, t), flattened to (n, m * t).

    As one (n t, k) x (k, m) product: ``W @ z`` would run n products of t columns each, which is
    slower for transformer-sized n (hundreds of tokens) and small t."""
    n, k, t = z.shape
    y = z.transpose(1, 2).reshape(n * t, k) @ W.transpose(0, 1)  # matmul: autocast applies (tensordot: not)
    return y.reshape(n, t, -1).transpose(1, 2).reshape(n, -1)


def sequential_linear(x: torch.Tensor, f: SequentialFactors) -> torch.Tensor:
    """Linear map with a sequential / ring factorized matrix; ``x`` is (N, C_in)."""
    n = x.shape[0]
    z = (x @ f.A).reshape(n, f.rank_in * f.ring, f.t)  # rows (b, a), u last
    return _left_apply(f.B, z)


def tucker2_conv(
    x: torch.Tensor,
    core: torch.Tensor,
    U_out: torch.Tensor,
    U_in: torch.Tensor,
    U_k: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
) -> torch.Tensor:
    """Convolution with a Tucker-2 / STTu kernel (core (R_o, R_i, K), factors per mode).

    ``(U ⊗ I_t)`` acts on channels ``p*t + u`` as a matrix product on the (C/t, t*P) view.
    """
    return tucker2_conv_merged(x, tucker2_kernel(core, U_k, kernel_size), U_out, U_in, stride, padding, dilation)


def tucker2_kernel(core: torch.Tensor, U_k: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """The rank-space kernel (R_o, R_i, *kernel_size) of a Tucker-2 convolution: the core
    (R_o, R_i, K) merged with the spatial factor U_k (kernel taps, K)."""
    return torch.tensordot(core, U_k, dims=([2], [1])).reshape(core.shape[0], core.shape[1], *kernel_size)


def tucker2_conv_merged(x: torch.Tensor, W: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor,
                        stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int],
                        mix=_mix) -> torch.Tensor:
    """:func:`tucker2_conv` with the core and spatial factor already merged into the rank-space
    kernel ``W`` (R_o, R_i, *kernel_size)."""
    n, c_in = x.shape[:2]
    spatial = x.shape[2:]
    z = mix(U_in.transpose(-1, -2), x.reshape(n, U_in.shape[0], -1))  # (n, R_i/t, t*P)
    r_in = W.shape[1]
    z = conv_nd(z.reshape(n, r_in, *spatial), W, stride, padding, dilation)
    out_spatial = z.shape[2:]
    out = mix(U_out, z.reshape(n, U_out.shape[1], -1))  # (n, C_out/t, t*P)
    return out.reshape(n, -1, *out_spatial)


def tucker2_linear(x: torch.Tensor, core: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor) -> torch.Tensor:
    """Linear map with a Tucker-2 / STTu matrix (core (R_o, R_i)); ``x`` is (N, C_in)."""
    n = x.shape[0]
    z = _left_apply(U_in.transpose(-1, -2), x.reshape(n, U_in.shape[0], -1))  # (n, R_i)
    z = z @ core.transpose(-1, -2)  # (n, R_o)
    return _left_apply(U_out, z.reshape(n, U_out.shape[1], -1))


def _paired_cores(
    state: torch.Tensor, cores: Sequence[torch.Tensor], in_modes: Sequence[int], out_modes: Sequence[int], t: int
) -> torch.Tensor:
    """Contract channel cores (b, I_k O_k, b') one at a time.

    ``state`` is (N, I_1..I_d, b, u, P); the result is (N, O_1..O_d, P) with the last output mode
    split as o'*t + u. The last core has shape (b, I_d O_d / t, 1).
    """
    d = len(in_modes)
    for k, G in enumerate(cores):
        last = k == d - 1
        o = out_modes[k] // t if last else out_modes[k]
        Gk = G.reshape(G.shape[0], in_modes[k], o, G.shape[-1])  # (b, i_k, o_k, b')
        # state (N, i_k, rest_in..., O_1..O_{k-1}, b, u, P): contract i_k and b
        state = torch.einsum("nixbup,ibov->nxovup", state.reshape(
            state.shape[0], in_modes[k], -1, G.shape[0], t, state.shape[-1]), Gk.permute(1, 0, 2, 3))
        # move the new output mode behind the previous ones: rest_in first, then O's
        rest_in = math.prod(in_modes[k + 1:])
        state = state.reshape(state.shape[0], rest_in, -1, G.shape[-1], t, state.shape[-1])
    return state  # (N, 1, O_1..o', 1, u, P)


def paired_linear(x: torch.Tensor, cores: Sequence[torch.Tensor], in_modes: Sequence[int],
                  out_modes: Sequence[int], t: int) -> torch.Tensor:
    """Linear map with a paired TT/STT (TT-matrix) of modes [I_1 O_1, ..., I_d O_d]."""
    n = x.shape[0]
    G0 = cores[0]  # (1, I_1 O_1, R_1), R_1 = (b, u)
    o0 = out_modes[0] // t if len(cores) == 1 else out_modes[0]
    G0 = G0.reshape(in_modes[0], o0, -1, t)  # (i_1, o_1, b, u)
    rest = math.prod(in_modes[1:])
    state = torch.einsum("nix,iobu->nxobu", x.reshape(n, in_modes[0], rest), G0)
    state = state.reshape(n, rest, o0, G0.shape[2], t, 1)
    if len(cores) > 1:
        state = _paired_cores(state, cores[1:], in_modes[1:], out_modes[1:], t)
    return state.reshape(n, -1, t).reshape(n, -1)


def paired_conv(x: torch.Tensor, cores: Sequence[torch.Tensor], in_modes: Sequence[int],
                out_modes: Sequence[int], t: int, kernel_size: Sequence[int], stride, padding,
                dilation) -> torch.Tensor:
    """Convolution with a paired TT/STT of modes [K, I_1 O_1, ..., I_d O_d] (Garipov et al.).

    The spatial core filters every input channel with R_1 kernels, then the channel cores
    contract (i_k, b) into (o_k, b') with the copy index riding along.
    """
    n, c_in = x.shape[:2]
    spatial = x.shape[2:]
    G0 = cores[0]  # (1, K, R_1)
    r1 = G0.shape[-1]
    filters = G0[0].transpose(-1, -2).reshape(r1, 1, *kernel_size)
    y = conv_nd(x.reshape(n * c_in, 1, *spatial), filters, stride, padding, dilation)
    out_spatial = y.shape[2:]
    state = y.reshape(n, c_in, r1 // t, t, -1)  # (N, I..., b, u, P)
    state = _paired_cores(state, cores[1:], in_modes, out_modes, t)
    P = state.shape[-1]
    # (N, O_1..o', u, P) -> channels o_1..o' then u fastest
    state = state.reshape(n, -1, t, P)
    return state.reshape(n, -1, *out_spatial)


class CPFactors(NamedTuple):
    """The three small operators of a CP layer.

    A : (C_in, R), the Khatri-Rao product of the input-side factors
    S : (R, K) spatial filters, one per rank-one term, or None for a linear layer
    B : (C_out, R), the Khatri-Rao product of the output-side factors
    """

    A: torch.Tensor
    S: torch.Tensor | None
    B: torch.Tensor


def cp_factors(factors: Sequence[torch.Tensor], n_in: int, has_kernel: bool) -> CPFactors:
    """Merge CP factors of modes [I_1..I_d, (K,) O_1..O_e] into A, S, B."""
    A = khatri_rao(factors[:n_in])
    S = factors[n_in].transpose(0, 1) if has_kernel else None
    B = khatri_rao(factors[n_in + int(has_kernel):])
    return CPFactors(A, S, B)


def cp_linear(x: torch.Tensor, f: CPFactors) -> torch.Tensor:
    """Linear map with a CP matrix ``B A^T``; ``x`` is (N, C_in)."""
    return (x @ f.A) @ f.B.transpose(0, 1)


def cp_conv(x: torch.Tensor, f: CPFactors, kernel_size: Sequence[int], stride, padding, dilation,
            mix=_mix) -> torch.Tensor:
    """Convolution with a CP kernel: 1x1 (A^T) -> depthwise k x k (S) -> 1x1 (B)."""
    n, c_in = x.shape[:2]
    spatial = x.shape[2:]
    R = f.A.shape[1]
    z = mix(f.A.transpose(0, 1), x.reshape(n, c_in, -1)).reshape(n, R, *spatial)
    z = conv_nd(z, f.S.reshape(R, 1, *kernel_size), stride, padding, dilation, R)
    out_spatial = z.shape[2:]
    return mix(f.B, z.reshape(n, R, -1)).reshape(n, -1, *out_spatial)
