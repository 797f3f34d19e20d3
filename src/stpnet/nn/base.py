"""The shared machinery of factorized layers: the owned tensor, ranks, paths and reporting."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from .._validate import check_positive_int
from ..decomposition import decompose
from ..decomposition.memory import check_memory
from ..decomposition.ranks import ranks_for_budget
from ..formats import FactorizedTensor, format_class
from ._cache import InferenceCache, recording
from ._timing import interleaved_best_times
from .cost import PathCost, choose, dense_layer_macs
from .init import kaiming_std, rescale_to_std
from .layouts import Layout, layout_named, layouts_of
from .tensorize import Tensorization

__all__ = ["FactorizedLayer", "FORWARD_PATHS"]

FORWARD_PATHS = ("auto", "rebuild", "contract", "measure")

#: The key under which a fused layer's form (and a layer kept factorized, ``'rebuild'``) is
#: recorded in its entry of a state dict's ``_metadata``: :func:`stpnet.deploy.fused.fused_forms` reads it back.
FORM_METADATA_KEY = "stpnet_form"


def layer_tensorization(format: str, t: int | None, layout: str | Layout | None, c_in: int, c_out: int,
                        kernel_size: tuple[int, ...], in_modes, out_modes, n_modes: int):
    """Resolve a layer's format class, t and tensorization from its constructor arguments."""
    cls, semi = format_class(format)
    t = cls.t_for(semi, t)
    valid = layouts_of(cls)
    layout = valid[0] if layout is None else layout_named(layout)
    if layout not in valid:
        raise ValueError(f"layout {layout!r} is not available for {format!r}; valid: {', '.join(map(str, valid))}")
    ins, outs = layout.modes(c_in, c_out, bool(kernel_size), t, in_modes, out_modes, n_modes)
    return cls, t, Tensorization(layout, ins, outs, tuple(kernel_size))


def tensor_t(tz: Tensorization, t: int) -> int | tuple[int, ...]:
    """The factorized tensor's t: one int, or per mode for Tucker-2 (the spatial mode has t = 1)."""
    return tz.layout.tensor_t(tz, t)


def uniform_rank(tz: Tensorization, R: int) -> int | tuple[int, ...]:
    """The rank specification for one rank R (Tucker-2 keeps the spatial mode at full rank)."""
    return tz.layout.uniform_rank(tz, R)


def resolve_weight_compression(weight_compression: float | None, compression: float | None) -> float | None:
    """The layer's weight compression from ``weight_compression=`` or its deprecated name
    ``compression=`` (which :func:`stpnet.compress` uses for the whole model's factor)."""
    if compression is None:
        return weight_compression
    if weight_compression is not None:
        raise ValueError("give weight_compression= only (compression= is its deprecated name for a layer)")
    warnings.warn("a layer's compression= is deprecated: name it weight_compression= (the factor of this layer's "
                  "weight; stpnet.compress(..., compression=) is the whole model's factor)", DeprecationWarning,
                  stacklevel=3)
    return compression


def ranks_for_compression(cls, tz: Tensorization, t, compression: float, clip: bool = True) -> tuple[int, ...]:
    """The largest uniform ranks whose weight is at least ``compression`` times smaller than dense."""
    if not compression > 0:
        raise ValueError(f"compression must be > 0, got {compression}")
    budget = max(1, int(math.prod(tz.tensor_shape) / compression))
    return ranks_for_budget(cls, tz.tensor_shape, t, budget, rank_of=lambda R: uniform_rank(tz, R), clip=clip)


class FactorizedLayer(InferenceCache):
    """Base of FactorizedLinear and FactorizedConv: owns a factorized weight and a bias.

    Subclasses implement ``_dense_forward(x, weight)``, ``_contract_forward(x)`` and
    ``_path_costs(input_shape)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, ...],
        *,
        format: str,
        rank: int | Sequence[int] | None,
        t: int | None,
        weight_compression: float | None,
        layout: str | None,
        in_modes: Sequence[int] | None,
        out_modes: Sequence[int] | None,
        n_modes: int,
        bias: bool,
        forward_path: str,
        clip_ranks: bool = False,
        device=None,
        dtype=None,
        weight: FactorizedTensor | None = None,
    ):
        super().__init__()
        if forward_path not in FORWARD_PATHS:
            raise ValueError(f"forward_path must be one of {FORWARD_PATHS}, got {forward_path!r}")
        in_features = check_positive_int(in_features, "in_features")
        out_features = check_positive_int(out_features, "out_features")
        cls, t, tz = layer_tensorization(format, t, layout, in_features, out_features, kernel_size,
                                         in_modes, out_modes, n_modes)
        self.tensorization = tz
        self.forward_path = forward_path
        if weight is None:
            shape = tz.tensor_shape
            tt = tensor_t(tz, t)
            ranks = self._ranks(cls, shape, tt, rank, weight_compression, clip_ranks)
            fan_in = in_features * tz.kernel_numel
            # the random init orthonormalises (QR), which half precision lacks on CPU: build in
            # float32, then cast
            init_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            itemsize = torch.empty((), dtype=init_dtype).element_size()
            # factors, and the largest temporary of the init (an orthonormalised core), twice over
            check_memory(3 * itemsize * cls.param_count(shape, ranks, tt), torch.device(device or "cpu"), None,
                         f"a {cls.name_for_t(tt)} weight of shape {shape} with ranks {ranks}",
                         advice="lower the rank or ask for a weight_compression factor instead")
            weight = cls.random(shape, ranks, tt, std=kaiming_std(fan_in), dtype=init_dtype, device=device,
                                clip=clip_ranks)
            rescale_to_std(weight, kaiming_std(fan_in))
            if init_dtype != dtype:
                weight = weight.to(dtype)
        elif tuple(weight.shape) != tz.tensor_shape:
            raise ValueError(f"weight has shape {weight.shape}, the tensorization needs {tz.tensor_shape}")
        self.weight_tensor = weight
        if bias:
            bound = 1.0 / math.sqrt(in_features * tz.kernel_numel)
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------ construction helpers
    def _ranks(self, cls, shape, t, rank, weight_compression, clip: bool) -> tuple[int, ...]:
        if (rank is None) == (weight_compression is None):
            raise ValueError("give exactly one of rank=... or weight_compression=...")
        if weight_compression is not None:
            return ranks_for_compression(cls, self.tensorization, t, weight_compression, clip)
        if isinstance(rank, int) or hasattr(rank, "__index__"):
            rank = uniform_rank(self.tensorization, check_positive_int(rank, "rank"))
        return cls.validate_rank(shape, rank, t, clip=clip)

    # ------------------------------------------------------------------- reporting
    @property
    def format(self) -> str:
        """The format name, as the factorized tensor reports it ('stt' for TT with t > 1, ...)."""
        return self.weight_tensor.format

    @property
    def format_name(self) -> str:
        """Deprecated alias of :attr:`format`."""
        warnings.warn("FactorizedLayer.format_name is deprecated: use .format (the name its weight_tensor uses)",
                      DeprecationWarning, stacklevel=2)
        return self.format

    @property
    def rank(self) -> tuple[int, ...]:
        return self.weight_tensor.rank

    @property
    def t(self):
        return self.weight_tensor.t

    @property
    def num_params(self) -> int:
        """Parameters of the layer (factors and bias)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layer it replaces (weight and bias)."""
        return math.prod(self.tensorization.weight_shape) + (0 if self.bias is None else self.bias.numel())

    @property
    def compression_ratio(self) -> float:
        """Dense parameters divided by this layer's parameters."""
        return self.dense_params / self.num_params

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``(C_out, C_in, *kernel)`` (``(out, in)`` for Linear), rebuilt from the
        factors on every call (differentiable)."""
        return self.tensorization.tensor_to_weight(self.weight_tensor.to_tensor())

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, shaped as the replaced torch layer's ``weight``: read-only, so code that
        reads ``layer.weight`` (PyTorch's own modules included) keeps working. Rebuilt from the
        factors (differentiable) in training; in inference (eval mode, gradients off) rebuilt once
        and reused while the factors are unchanged. To change the layer, change its factors
        (``weight_tensor``), or convert it back with :func:`stpnet.nn.to_dense`."""
        return self._cached("weight", lambda: self.dense_weight().contiguous())  # a permuted view would
        # be copied by the convolution on every call

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(f"{type(self).__name__}.weight is rebuilt from the factorized weight_tensor and cannot "
                             "be assigned; set the factors (weight_tensor), or use stpnet.nn.to_dense(layer) for a "
                             "dense layer with a settable weight")

    def path_costs(self, input_shape: Sequence[int]) -> dict[str, PathCost]:
        """Estimated multiply-adds and activation memory of each forward path for an input shape."""
        return self._path_costs(tuple(int(s) for s in input_shape))

    def macs(self, input_shape: Sequence[int], path: str | None = None) -> int:
        """Forward multiply-adds for ``input_shape`` on ``path`` (default: the one that would run)."""
        costs = self.path_costs(input_shape)
        return costs[path or self.choose_path(input_shape)].macs

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """Forward multiply-adds of the dense layer on ``input_shape``."""
        return dense_layer_macs(self, input_shape)

    def flops(self, input_shape: Sequence[int], path: str | None = None) -> int:
        """Deprecated alias of :meth:`macs` (it always returned multiply-adds)."""
        warnings.warn("FactorizedLayer.flops() is deprecated: it counts multiply-adds; use macs()", DeprecationWarning,
                      stacklevel=2)
        return self.macs(input_shape, path)

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        """Deprecated alias of :meth:`dense_macs`."""
        warnings.warn("FactorizedLayer.dense_flops() is deprecated: use dense_macs()", DeprecationWarning, stacklevel=2)
        return self.dense_macs(input_shape)

    def choose_path(self, input_shape: Sequence[int], device_type: str | None = None, inference: bool = False) -> str:
        """'rebuild' or 'contract': the forced path, the measured one (``forward_path='measure'``,
        once an input of this shape has run), or the cost model's choice. ``inference``: for a
        call in eval mode without gradients, where the rebuilt weight and merged cores are cached
        (the cost model then leaves out their once-per-call work). Choices are remembered per
        (input shape, device, dtype, ranks, inference), so the cost model runs once per shape."""
        if self.forward_path in ("rebuild", "contract"):
            return self.forward_path
        device_type = device_type or self.weight_tensor.device.type
        key = self._choice_key(input_shape, device_type, inference)
        choices = self.__dict__.setdefault("_path_choices", {})
        if key not in choices:
            analytic = choose(self.path_costs(input_shape), device_type, cached=inference)
            if self.forward_path == "measure":
                return analytic  # not measured yet (forward measures on the first real input)
            choices[key] = analytic
        return choices[key]

    def _choice_key(self, input_shape: Sequence[int], device_type: str, inference: bool) -> tuple:
        return (tuple(int(s) for s in input_shape), device_type, self.weight_tensor.dtype, tuple(self.rank), inference)

    def _measure_paths(self, x: torch.Tensor, inference: bool = False, repeats: int = 3) -> str:
        """Time both paths on ``x`` (in alternating rounds, each a warm-up call and the best of
        ``repeats``) and remember the faster. ``inference``: as eval mode runs them, with the
        rebuilt weight and merged cores cached. A training call (gradients enabled) times what a
        training step pays: the forward pass and the backward pass to the factors (and to ``x``
        where it requires a gradient), through ``torch.autograd.grad``, so no ``.grad`` changes."""
        if inference or not torch.is_grad_enabled():
            with torch.no_grad():
                timings = self._path_timings(x, inference, repeats, lambda out: None)
        else:
            probe = x.detach().requires_grad_(x.requires_grad)
            wanted = [p for p in self.parameters() if p.requires_grad] + ([probe] if probe.requires_grad else [])

            def backward(out: torch.Tensor) -> None:
                if out.requires_grad and wanted:
                    torch.autograd.grad(out, wanted, torch.ones_like(out), allow_unused=True)

            timings = self._path_timings(probe, inference, repeats, backward)
        choice = min(timings, key=timings.get)
        self.__dict__.setdefault("_path_choices", {})[self._choice_key(x.shape, x.device.type, inference)] = choice
        return choice

    def _path_timings(self, x: torch.Tensor, inference: bool, repeats: int, backward) -> dict[str, float]:
        """Best seconds of each path on ``x``, each call followed by ``backward(output)``."""
        weight = (lambda: self.weight) if inference else self.dense_weight
        paths = {"rebuild": lambda: self._dense_forward(x, weight()), "contract": lambda: self._contract_forward(x)}
        runs = {name: (lambda forward=forward: backward(forward())) for name, forward in paths.items()}
        return interleaved_best_times(runs, x.device, rounds=repeats, repeats=1)

    def path_for(self, x: torch.Tensor) -> str:
        """The path a forward call on ``x`` takes: measured now if ``forward_path='measure'`` and
        this shape has not been timed yet (never while tracing or compiling), else
        :meth:`choose_path`. Inference calls (eval mode, no gradients) are chosen apart from
        training ones: their factor work is cached."""
        inference = not self.training and not torch.is_grad_enabled()
        if recording():
            inference = False
        elif (self.forward_path == "measure"
              and self._choice_key(x.shape, x.device.type, inference) not in self.__dict__.get("_path_choices", {})):
            return self._measure_paths(x, inference)
        return self.choose_path(x.shape, x.device.type, inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._planned(x, self.forward_path)
        if run is not None:  # an inference call like the last one, parameters unchanged
            return run(x)
        if x.numel() == 0:  # empty input: as torch does
            return self._dense_forward(x, self.weight)
        if self.path_for(x) == "rebuild":
            weight = self.weight
            self._remember_plan(x, self.forward_path, self._rebuild_plan(weight))
            return self._dense_forward(x, weight)
        self._remember_plan(x, self.forward_path, self._contract_forward)
        return self._contract_forward(x)

    def _rebuild_plan(self, weight: torch.Tensor):
        """The rebuild path on a fixed (cached) weight, for inputs already checked once."""
        return lambda x: self._dense_forward(x, weight)

    def _cache_owner(self) -> nn.Module:
        return self.weight_tensor

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and self.forward_path == "rebuild":  # a layer stpnet.fuse kept factorized
            metadata.setdefault(prefix[:-1], {})[FORM_METADATA_KEY] = "rebuild"

    # ------------------------------------------------------------- from a dense layer
    @classmethod
    def dense_layer_args(cls, dense: nn.Module) -> tuple:
        """The positional constructor arguments that give this class the geometry of the torch
        layer ``dense`` (in/out sizes, kernel, stride, ..., bias)."""
        raise NotImplementedError

    @classmethod
    def _from_trained(cls, dense: nn.Module, matrix: torch.Tensor, format: str, *, rank, tol, weight_compression,
                      t, layout, in_modes, out_modes, n_modes: int, n_iter: int, **options) -> "FactorizedLayer":
        """A layer with ``dense``'s geometry whose weight is the decomposition of ``matrix``
        ``(outputs, inputs, *kernel)`` by one rank rule; the bias is copied."""
        weight, tz = cls._decompose_weight(matrix, format, t, layout, in_modes, out_modes, n_modes, rank, tol,
                                           weight_compression, n_iter)
        out = cls(*cls.dense_layer_args(dense), format=format, t=t, layout=tz.layout, in_modes=tz.in_modes,
                  out_modes=tz.out_modes, weight=weight, dtype=matrix.dtype, device=matrix.device, **options)
        if getattr(dense, "bias", None) is not None:
            out.bias.data.copy_(dense.bias.detach())
        return out

    @staticmethod
    def _decompose_weight(W: torch.Tensor, format: str, t: int | None, layout: str | None, in_modes, out_modes,
                          n_modes: int, rank, tol, weight_compression,
                          n_iter: int) -> tuple[FactorizedTensor, Tensorization]:
        """Tensorize a trained weight and decompose it with one rank rule."""
        if sum(v is not None for v in (rank, tol, weight_compression)) != 1:
            raise ValueError("give exactly one of rank=..., tol=... or weight_compression=...")
        c_out, c_in, *kernel = W.shape
        fcls, t, tz = layer_tensorization(format, t, layout, c_in, c_out, tuple(kernel), in_modes, out_modes,
                                          n_modes)
        X = tz.weight_to_tensor(W.detach())
        tt = tensor_t(tz, t)
        if weight_compression is not None:
            rank = ranks_for_compression(fcls, tz, tt, weight_compression)
        elif rank is not None and (isinstance(rank, int) or hasattr(rank, "__index__")):
            rank = uniform_rank(tz, check_positive_int(rank, "rank"))
        elif tol is not None:
            rank = tz.layout.tol_rank(tz)  # Tucker-2: tol truncates the channel modes only
        return decompose(X, fcls.name_for_t(tt), rank=rank, t=tt, tol=tol, n_iter=n_iter), tz
