"""A factorized 2-D convolution's plain chain ``1x1 -> k x k -> 1x1`` in one native pass per image.

PyTorch runs the plain chain (:func:`stpnet.functional.plain.plain_conv`) as three library
convolutions, each a full pass over the batch's feature maps; on narrow rank spaces each costs
about as much as a convolution several times wider (BENCHMARKS.md, "Inference latency of whole
networks"). The
kernel in ``onepass.c`` runs the three stages image by image on intermediate planes that stay in
cache, and skips the plain form's structural zeros. It is an inference operator: no autograd,
float32 on the CPU, dilation 1, zero padding.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from .build import load_library

__all__ = ["OnepassConv2d", "onepass_available"]


class _Stage(ctypes.Structure):
    _fields_ = [("m", ctypes.c_int), ("ptr", ctypes.c_void_p), ("idx", ctypes.c_void_p), ("w", ctypes.c_void_p)]


class _Plan(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("cin", "cout", "kh", "kw", "sh", "sw", "ph", "pw")] + [
        ("stage_in", _Stage), ("stage_mid", _Stage), ("stage_out", _Stage), ("bias", ctypes.c_void_p)]


def _library() -> ctypes.CDLL | None:
    lib = load_library("onepass")
    if lib is not None and lib.stp_onepass_conv2d.argtypes is None:  # pointers must not pass as C ints
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.stp_onepass_conv2d.argtypes = [p, p, p, i, i, i, i]
        lib.stp_onepass_conv2d.restype = ctypes.c_int
    return lib


def onepass_available() -> bool:
    """Whether the native kernel is built and loaded (see :mod:`stpnet.deploy.native.build`)."""
    return _library() is not None


def _csr(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stage's weight ``(m, c, *k)`` by output channel: offsets (m + 1), the input channel of each
    nonzero (c x k block), and the blocks' weights, flattened."""
    W = W.detach().to(torch.float32).reshape(W.shape[0], W.shape[1], -1)
    nonzero = W.ne(0).any(-1)
    rows, cols = nonzero.nonzero(as_tuple=True)
    ptr = torch.zeros(W.shape[0] + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(nonzero.sum(1), 0)
    return ptr, cols.to(torch.int32).contiguous(), W[rows, cols].contiguous()


class OnepassConv2d:
    """The plain chain ``1x1 (W_in) -> k x k (W_mid) -> 1x1 (W_out) + bias`` as one native call.

    The weights are copied (float32, by output channel without the zero blocks) when the object is
    made: make a new one after they change. Calling it on a float32 CPU tensor ``(N, C_in, H, W)``
    (copied to NCHW if it is stored otherwise) returns ``(N, C_out, H_out, W_out)``; it runs with
    ``torch.get_num_threads()`` threads.

    Parameters
    ----------
    W_in : torch.Tensor
        ``(m1, C_in)`` or ``(m1, C_in, 1, 1)``.
    W_mid : torch.Tensor
        ``(m2, m1, kh, kw)``.
    W_out : torch.Tensor
        ``(C_out, m2)`` or ``(C_out, m2, 1, 1)``.
    stride, padding : pair of int
        Of the k x k stage (zero padding, dilation 1).
    bias : torch.Tensor, optional
        ``(C_out,)``.

    Raises
    ------
    RuntimeError
        If the native kernel is not available (:func:`onepass_available`).
    ValueError
        On weights of inconsistent shapes, or (when called) an input it cannot take.
    """

    def __init__(self, W_in: torch.Tensor, W_mid: torch.Tensor, W_out: torch.Tensor, stride: Sequence[int],
                 padding: Sequence[int], bias: torch.Tensor | None = None):
        lib = _library()
        if lib is None:
            raise RuntimeError("the native onepass kernel is not available (no C compiler, a failed build, or "
                               "STPNET_NATIVE=0; the log says which)")
        if any(W.ndim not in (2, 4) or W.numel() != W.shape[0] * W.shape[1] for W in (W_in, W_out)):
            raise ValueError(f"expected 1x1 weights W_in and W_out ((m, c) or (m, c, 1, 1)), got "
                             f"{tuple(W_in.shape)} and {tuple(W_out.shape)}")
        W_in = W_in.reshape(W_in.shape[0], W_in.shape[1])
        W_out = W_out.reshape(W_out.shape[0], W_out.shape[1])
        if W_mid.ndim != 4 or W_mid.shape[1] != W_in.shape[0] or W_out.shape[1] != W_mid.shape[0]:
            raise ValueError(f"expected W_in (m1, C_in), W_mid (m2, m1, kh, kw), W_out (C_out, m2); got "
                             f"{tuple(W_in.shape)}, {tuple(W_mid.shape)}, {tuple(W_out.shape)}")
        stride, padding = tuple(int(s) for s in stride), tuple(int(p) for p in padding)
        if len(stride) != 2 or len(padding) != 2 or min(stride) < 1 or min(padding) < 0:
            raise ValueError(f"expected stride (>= 1) and padding (>= 0) pairs, got {stride} and {padding}")
        self.in_channels, self.out_channels = int(W_in.shape[1]), int(W_out.shape[0])
        if bias is not None and tuple(bias.shape) != (self.out_channels,):
            raise ValueError(f"expected a bias of shape ({self.out_channels},), got {tuple(bias.shape)}")
        self.kernel_size = (int(W_mid.shape[2]), int(W_mid.shape[3]))
        self.stride, self.padding = stride, padding
        self._function = lib.stp_onepass_conv2d
        stages = [_csr(W) for W in (W_in, W_mid, W_out)]
        self._bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._keep = [t for stage in stages for t in stage]  # the plan points into these
        self._plan = _Plan(self.in_channels, self.out_channels, *self.kernel_size, *stride, *padding,
                           *(_Stage(W.shape[0], *(t.data_ptr() for t in stage)) for W, stage in
                             zip((W_in, W_mid, W_out), stages)),
                           None if self._bias is None else self._bias.data_ptr())
        self._plan_ref = ctypes.byref(self._plan)

    def __deepcopy__(self, memo: dict) -> "OnepassConv2d":
        """The object itself: it never changes after it is made (it holds its own copies of the
        weights), so copies of a module that cached it (``copy.deepcopy`` of a fused model, as
        :func:`stpnet.deploy.export.export` makes) may share it; its ctypes plan cannot be copied."""
        return self

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of ``height`` x ``width``."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a float32 CPU tensor (N, {self.in_channels}, H, W), got "
                             f"{x.dtype} {x.device.type} {tuple(x.shape)}")
        x = x.contiguous()  # NCHW (a channels_last or strided input is copied)
        n, _, h, w = x.shape
        ho, wo = self.output_size(h, w)
        if ho < 1 or wo < 1:
            raise ValueError(f"input {h}x{w} is smaller than the kernel {self.kernel_size} with padding "
                             f"{self.padding}")
        y = torch.empty(n, self.out_channels, ho, wo)
        if self._function(self._plan_ref, x.data_ptr(), y.data_ptr(), n, h, w, torch.get_num_threads()):
            raise MemoryError("the onepass kernel could not allocate its scratch planes")
        return y
