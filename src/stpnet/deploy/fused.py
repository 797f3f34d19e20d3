"""The deployment form of factorized layers: a fixed chain of standard ops on pre-merged factors.

A factorized layer (:class:`FactorizedLayer`) keeps its cores as trained and decides per call,
through a cost model, whether to rebuild the dense weight or to contract; in inference it caches
the merged cores. :func:`fuse` turns each one into a small module that holds the merged
operators once and always runs the contraction chain:

* sequential / ring (TT/STT, TR/STR): 1x1 (``A``) -> k x k in the rank space, its kernel shared by
  the ``a * t`` groups (``S``) -> 1x1 (``B``); for a Linear, ``A`` then ``B``
  (:func:`stpnet.functional.contract.sequential_factors`);
* Tucker-2 (Tucker/STTu): 1x1 (``U_in ⊗ I_t``) -> k x k with the core and spatial factor merged
  -> 1x1 (``U_out ⊗ I_t``), the Kronecker factors applied as reshapes;
* paired (TT-matrix): the cores contracted one at a time, as in the layer;
* cp (CP): 1x1 (Khatri-Rao of the input factors) -> depthwise k x k -> 1x1.

The fused model computes the same function (to float rounding), exports through ``torch.jit.trace``
and ONNX, and stays compressed: its parameter count is that of the merged operators, close to the
factorized one (reported by :func:`fuse`), never the dense one. It has no Python cost model and no
cache checks per call. To train again, keep the factorized model; fusing is the last step.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.contract import (GROUPED_STAGES, CPFactors, SequentialFactors, _mix, cp_conv, cp_factors,
                                   cp_linear, paired_conv, paired_linear, sequential_conv, sequential_factors,
                                   sequential_linear, tucker2_conv_merged, tucker2_kernel, tucker2_linear)
from .native.onepass import OnepassConv2d, onepass_available
from ..functional.plain import (PLAIN_FORMS, PlainChain, PlainForm, cp_plain, plain_conv, plain_form_weights,
                                sequential_plain, tucker2_plain)
from ..nn._cache import WATCH_MODES, InferenceCache, recording
from ..nn._timing import best_time, interleaved_best_times
from ..nn.base import FORM_METADATA_KEY, FactorizedLayer
from .fold import BatchNormFoldable
from .fold import fold_batchnorm as _fold_batchnorm
from ..nn.layouts import register_fused_form
from ..nn.conv import prepare_conv_input
from ..nn._replace import replace_modules
from ..nn.attention import UnpackedMultiheadAttention, WeightsOnceEncoderLayer
from ..nn.layer_types import factorized_layer_type, takes_indices

__all__ = ["FUSED_FORMS", "FusedLayer", "FusedSequential", "FusedTucker2", "FusedPaired", "FusedCP", "fuse",
           "fuse_layer", "fused_forms"]

#: How a fused layer runs: ``'chain'``, its contraction chain on the merged factors (nothing
#: larger than the factors is built; the form to export); a convolution's plain-convolution forms
#: (:mod:`stpnet.functional.plain`: ``'plain'``, ``'merged_in'``, ``'merged_out'``) on weights
#: derived once in inference (faster at batch 1 on CPU); a Linear's ``'plain'`` form, two
#: ``F.linear`` on weights derived once in inference (sequential/ring and Tucker-2 layouts; a
#: last factor ``B ⊗ I_t`` applied as ``B`` on ``t`` times the rows, never built); or
#: ``'dense'``, the dense op on the
#: weight the chain computes, rebuilt once in inference; or ``'onepass'``, the plain chain of a 2-D
#: convolution (dilation 1) in one native pass per image (:class:`stpnet.deploy.native.OnepassConv2d`),
#: offered where the native kernel builds; its inference calls on contiguous float32 CPU inputs run
#: it, any other call (gradients, another dtype or device, channels_last, tracing) runs ``'plain'``.
#: ``fuse(example=x)`` measures them.
FUSED_FORMS = ("chain", *PLAIN_FORMS, "dense", "onepass")


def _groups_first(W: torch.Tensor, groups: int) -> torch.Tensor:
    """``W`` with its rows ``(k, u)`` (``u`` of ``groups``, last) reordered to ``(u, k)``: the first
    weight of a Linear's grouped ``'plain'`` form (:meth:`FusedLayer._plain_linear`)."""
    rows, columns = W.shape
    return W.reshape(rows // groups, groups, columns).transpose(0, 1).reshape(rows, columns)


def _channels_last(x: torch.Tensor) -> bool:
    """A 4-D input stored channels_last (and not also plain contiguous)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class FusedLayer(InferenceCache, BatchNormFoldable):
    """Base of the fused layers: the geometry of the replaced Conv/Linear, its bias, and the forward
    pass in the layer's :attr:`form` around the subclass's chain (:meth:`_chain_conv` for a
    convolution, :meth:`_linear` for a Linear) or its plain weights (:meth:`_plain_chain`).

    ``kernel_size`` is empty for a Linear. Convolutions keep ``stride``, ``padding``,
    ``dilation`` and ``padding_mode`` as the torch layer has them. ``weight`` is the dense weight
    the chain computes, read-only, for code that reads it (``nn.TransformerEncoderLayer``'s fast
    path reads its attention's and feed-forward weights); it is rebuilt once in inference.
    """

    #: How the 1x1 stages apply a factor: a batched product with the factor broadcast (faster in
    #: PyTorch at batch 32), or :func:`stpnet.functional.contract.conv1x1_mix`, a 1x1 conv1d, which
    #: :func:`stpnet.deploy.export.export` sets for ONNX (faster under ONNX Runtime; BENCHMARKS.md,
    #: "Inference latency of whole networks").
    mix = staticmethod(_mix)

    def __init__(self, layer: FactorizedLayer):
        super().__init__()
        self.in_features, self.out_features = layer.tensorization.in_features, layer.tensorization.out_features
        self.kernel_size: tuple[int, ...] = tuple(layer.tensorization.kernel_size)
        self.format = layer.format
        if self.kernel_size:
            self.in_channels, self.out_channels = self.in_features, self.out_features
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.padding_mode = layer.padding_mode
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        #: per-output-channel factor applied before the bias (None: none): a BatchNorm folded in by
        #: :func:`stpnet.fold_batchnorm`; part of :meth:`dense_weight` and of the derived forms
        self.register_buffer("output_scale", None)
        #: the form the layer runs in (one of :attr:`forms`); ``fuse(example=x)`` measures and sets it
        self.form = "chain"

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, format={self.format!r}, "
                f"form={self.form!r}")

    # ------------------------------------------------------------------ recorded form
    @property
    def form_spec(self) -> str:
        """The form as :func:`fused_forms` records it: :attr:`form`, or for a sequential/ring
        chain with a chosen grouped stage ``'chain:<stage>'``."""
        stage = getattr(self, "spatial_stage", None)
        return f"{self.form}:{stage}" if self.form == "chain" and stage is not None else self.form

    def set_form_spec(self, spec: str) -> None:
        """Run in the form ``spec`` (as :attr:`form_spec` writes it). ``'onepass'`` where the native
        kernel is not available here runs ``'plain'``, the same weights in library convolutions,
        with a warning."""
        form, _, stage = str(spec).partition(":")
        if form == "onepass" and form not in self.forms and "plain" in self.forms:
            warnings.warn("the 'onepass' form needs the native kernel, which is not available here (see "
                          "stpnet.deploy.native); the layer runs the same weights as library convolutions ('plain')",
                          stacklevel=3)
            form = "plain"
        if form not in self.forms:
            raise ValueError(f"form {spec!r} is not available for this layer; valid: {', '.join(self.forms)}")
        if stage and (form != "chain" or not isinstance(self, FusedSequential) or stage not in GROUPED_STAGES):
            raise ValueError(f"form {spec!r}: only the chain of a sequential/ring layer takes a grouped stage "
                             f"({', '.join(f'chain:{g}' for g in GROUPED_STAGES)})")
        self.form = form
        if isinstance(self, FusedSequential):
            self.spatial_stage = stage or None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:  # this module's entry, made by Module.state_dict just before
            metadata.setdefault(prefix[:-1], {})[FORM_METADATA_KEY] = self.form_spec

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        spec = (local_metadata or {}).get(FORM_METADATA_KEY)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if spec is not None and spec != self.form_spec:
            try:
                self.set_form_spec(spec)
            except ValueError:
                pass  # a form this layer lacks (another layout): it keeps its own

    def _chain_conv(self, x: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
        """The contraction chain on an already padded (N, C_in, *spatial) input, without the bias."""
        raise NotImplementedError

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        """The chain on a (N, in_features) input, without the bias."""
        raise NotImplementedError

    def _plain_chain(self) -> PlainChain | None:
        """The convolution as ``1x1 -> k x k -> 1x1`` plain weights, or None where the layout has
        no such form (paired)."""
        return None

    def _plain_linear(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """A Linear as two plain products ``(W_in (g r, in), W_out (out / g, r), g)``: ``h = x W_in^T``
        read as ``(..., g, r)``, then ``W_out`` applied to each of the ``g`` groups and the result
        read with output channel ``p g + u`` (group ``u``). ``g`` is the ``t`` of the chain's last
        factor ``B ⊗ I_t`` (1 without one), applied as one product on ``g`` times the rows instead
        of built; None where the layout has no such form. ``output_scale`` is not applied."""
        return None

    def _plain_linear_weights(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        W_in, W_out, groups = self._plain_linear()
        if self.output_scale is not None and groups == 1:
            W_out = self._scale_rows(W_out)
        return W_in.contiguous(), W_out.contiguous(), groups

    def _plain_linear_apply(self, x: torch.Tensor, W_in: torch.Tensor, W_out: torch.Tensor,
                            groups: int) -> torch.Tensor:
        """The ``'plain'`` form on ``x`` (..., in) with the weights of :meth:`_plain_linear_weights`."""
        if groups == 1:
            return F.linear(F.linear(x, W_in), W_out, self.bias)
        lead = x.shape[:-1]
        h = F.linear(x.reshape(-1, self.in_features), W_in)  # (n, g r), groups first
        y = F.linear(h.reshape(h.shape[0] * groups, -1), W_out)  # (n g, out / g)
        y = y.reshape(h.shape[0], groups, -1).transpose(1, 2).reshape(h.shape[0], self.out_features)
        return self._output_affine(y).reshape(*lead, self.out_features)

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms this layer can run in: ``FUSED_FORMS`` for a convolution with a plain chain
        (``'onepass'`` only for a 2-D one with dilation 1, where the native kernel is available);
        for a Linear with two plain weights (:meth:`_plain_linear`) ``('chain', 'plain', 'dense')``;
        else ``('chain', 'dense')``."""
        if not self.kernel_size and type(self)._plain_linear is not FusedLayer._plain_linear:
            return ("chain", "plain", "dense")
        if not self.kernel_size or type(self)._plain_chain is FusedLayer._plain_chain:
            return ("chain", "dense")
        if len(self.kernel_size) == 2 and tuple(self.dilation) == (1, 1) and onepass_available():
            return FUSED_FORMS
        return tuple(form for form in FUSED_FORMS if form != "onepass")

    def _form_weights(self, channels_last: bool, form: str | None = None) -> PlainForm:
        """The convolution weights of ``form`` (default: the layer's; not the chain) in the input's
        memory format (a channels_last input with NCHW weights makes oneDNN reorder the weights on
        every call), cached in inference."""
        form = self.form if form is None else form
        return self._cached((form, channels_last), lambda: self._build_form(form, channels_last))

    def _onepass_applies(self, x: torch.Tensor) -> bool:
        """Whether this call (on the padded input ``x``) can run the native kernel: an inference
        call (no gradient recorded, not traced or compiled) on a contiguous float32 CPU tensor."""
        return (not (torch.is_grad_enabled() or recording()) and x.dtype == torch.float32
                and x.device.type == "cpu" and x.is_contiguous())

    def _onepass(self, padding: tuple[int, ...]) -> OnepassConv2d:
        """The native one-pass operator on the plain form's weights (``output_scale`` folded into
        the last), cached in inference."""
        def build() -> OnepassConv2d:
            weights = self._build_form("plain", False).weights
            return OnepassConv2d(*weights, self.stride, padding, self.bias)
        return self._cached(("onepass", padding), build)

    def _build_form(self, form: str, channels_last: bool) -> PlainForm:
        if form not in self.forms:
            raise ValueError(f"form {form!r} is not available for this layer; valid: {self.forms}")
        if form == "dense":
            weights = PlainForm((self.dense_weight().contiguous(),), 0)
        else:
            weights = plain_form_weights(self._plain_chain(), form)
            if self.output_scale is not None:
                *first, last = weights.weights
                weights = weights._replace(weights=(*first, self._scale_rows(last)))
        if channels_last:
            weights = weights._replace(weights=tuple(w.contiguous(memory_format=torch.channels_last)
                                                     for w in weights.weights))
        return weights

    def _cache_sources(self) -> list[tuple[dict, str, torch.Tensor]]:
        """The factors, and ``output_scale`` (the derived weights are scaled by it). The bias only
        in the ``'onepass'`` form, whose native operator holds it: every other form reads
        ``self.bias`` at call time, so its derived weights do not depend on it."""
        sources = [s for s in super()._cache_sources() if s[2] is not self.bias or self.form == "onepass"]
        if self.output_scale is None:
            return sources
        return [*sources, (self._buffers, "output_scale", self.output_scale)]

    def _scale_rows(self, W: torch.Tensor) -> torch.Tensor:
        """``W`` (output channels first) with each row times ``output_scale``."""
        return W * self.output_scale.to(W.dtype).reshape(-1, *([1] * (W.ndim - 1)))

    def _output_affine(self, y: torch.Tensor) -> torch.Tensor:
        """The chain's output ``y`` (N, C_out, *spatial), a tensor of its own, times
        ``output_scale``, plus the bias. In inference both apply in place, ``mul_`` then ``add_``,
        which ``bench/conv_floor.py --passes`` times faster than an eval BatchNorm and than a
        broadcast ``addcmul``."""
        shape = (1, -1, *([1] * (y.ndim - 2)))
        inplace = not (torch.is_grad_enabled() or recording())
        if self.output_scale is not None:
            scale = self.output_scale.to(y.dtype).reshape(shape)
            y = y.mul_(scale) if inplace else y * scale
        if self.bias is not None:
            bias = self.bias.to(y.dtype).reshape(shape)
            y = y.add_(bias) if inplace else y + bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = _channels_last(x)
        if self.form != "chain":  # a form on cached weights: an inference call like the last skips the checks
            config = (self.form, channels_last)
            run = self._planned(x, config)
            if run is not None:
                return run(x)
        if not self.kernel_size:
            return self._linear_forward(x)
        x, padding = prepare_conv_input(x, self.in_channels, self.padding, self.kernel_size, self.dilation,
                                        self.padding_mode)
        if self.form == "chain":
            return self._output_affine(self._chain_conv(x, self.stride, padding, self.dilation))
        remember = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if self.form == "onepass":
            if self._onepass_applies(x):
                run = self._onepass(tuple(padding))
                if remember:
                    self._remember_plan(x, config, run)
                return run(x)
            remember = False  # another call runs the plain form: not a plan for the native kernel
        weights = self._form_weights(channels_last, "plain" if self.form == "onepass" else None)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = plain_conv(x, weights, self.stride, padding, self.dilation, bias)
        if remember:
            self._remember_plan(x, config, self._plain_plan(weights))
        return y

    def _plain_plan(self, weights: PlainForm):
        """``weights`` run on an input already checked once (zero padding), read at call time: the
        geometry attributes and the bias."""
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        if len(weights.weights) == 1:
            (W,) = weights.weights
            return lambda x: conv(x, W, self.bias, self.stride, self.padding, self.dilation)
        return lambda x: plain_conv(x, weights, self.stride, self.padding, self.dilation, self.bias)

    def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim < 1 or x.shape[-1] != self.in_features):
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if self.form == "dense":
            weight = self.weight
            self._remember_plan(x, (self.form, False), lambda x: F.linear(x, weight, self.bias))
            return F.linear(x, weight, self.bias)
        if self.form == "plain":
            W_in, W_out, groups = self._cached("plain_linear", self._plain_linear_weights)
            self._remember_plan(x, (self.form, False), lambda x: self._plain_linear_apply(x, W_in, W_out, groups))
            return self._plain_linear_apply(x, W_in, W_out, groups)
        lead = x.shape[:-1]
        y = self._output_affine(self._linear(x.reshape(-1, self.in_features)))
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``(C_out, C_in, *kernel)`` (``(out, in)`` for a Linear) that the chain
        applies (rows times ``output_scale`` where a BatchNorm is folded in), computed by running
        it on the identity (every input entry once)."""
        reference = next(p for name, p in self.named_parameters() if name != "bias")
        if not self.kernel_size:
            eye = torch.eye(self.in_features, dtype=reference.dtype, device=reference.device)
            W = self._linear(eye).t()
            return W if self.output_scale is None else self._scale_rows(W)
        taps = math.prod(self.kernel_size)
        n = self.in_channels * taps
        probes = torch.eye(n, dtype=reference.dtype, device=reference.device).reshape(n, self.in_channels,
                                                                                     *self.kernel_size)
        ones, zeros = (1,) * len(self.kernel_size), (0,) * len(self.kernel_size)
        y = self._chain_conv(probes, ones, zeros, ones)  # (n, C_out, 1, ..., 1): y[(i, taps), o] = W[o, i, taps]
        y = y.reshape(self.in_channels, *self.kernel_size, self.out_channels)
        W = y.permute(y.ndim - 1, *range(y.ndim - 1))  # non-negative axes: ONNX rejects movedim(-1, 0)
        return W if self.output_scale is None else self._scale_rows(W)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (see :meth:`dense_weight`): read-only; rebuilt once in inference."""
        return self._cached("weight", lambda: self.dense_weight().contiguous())


@register_fused_form("sequential")
class FusedSequential(FusedLayer):
    """A sequential / ring (TT/STT, TR/STR) layer as ``A`` -> (shared k x k ``S``) -> ``B``."""

    def __init__(self, layer: FactorizedLayer):
        super().__init__(layer)
        w = layer.weight_tensor
        with torch.no_grad():
            f = sequential_factors(w.factors, w.t, len(layer.tensorization.in_modes), has_kernel=bool(self.kernel_size))
        self.A = nn.Parameter(f.A.detach().clone())
        self.S = None if f.S is None else nn.Parameter(f.S.detach().clone())
        self.B = nn.Parameter(f.B.detach().clone())
        self.rank_in, self.ring, self.t = f.rank_in, f.ring, f.t
        #: form of the grouped k x k stage (``stpnet.functional.contract.GROUPED_STAGES``); None:
        #: by ``grouped_stage``'s rule; ``fuse(example=x)`` measures and sets it
        self.spatial_stage: str | None = None

    def _factors(self) -> SequentialFactors:
        return SequentialFactors(self.A, self.S, self.B, self.rank_in, self.ring, self.t)

    def _chain_conv(self, x, stride, padding, dilation):
        return sequential_conv(x, self._factors(), self.kernel_size, stride, padding, dilation, mix=self.mix,
                               stage=self.spatial_stage)

    def _plain_chain(self) -> PlainChain:
        return sequential_plain(self.A, self.S, self.B, self.rank_in, self.ring, self.t, self.kernel_size)

    def _linear(self, x):
        return sequential_linear(x, self._factors())

    def _plain_linear(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        # z = x A has columns (k, u), u last; W_in takes them in (u, k) order, so that h reads as
        # (n, t, k) and B applies to each of the t groups: (B ⊗ I_t) without building it
        return _groups_first(self.A.transpose(0, 1), self.t), self.B, self.t


@register_fused_form("tucker2")
class FusedTucker2(FusedLayer):
    """A Tucker-2 / STTu layer as ``U_in`` -> merged k x k core -> ``U_out``."""

    def __init__(self, layer: FactorizedLayer):
        super().__init__(layer)
        w = layer.weight_tensor
        with torch.no_grad():
            core = tucker2_kernel(w.core, w.factors[2], self.kernel_size) if self.kernel_size else w.core
        self.core = nn.Parameter(core.detach().clone())
        self.U_out = nn.Parameter(w.factors[0].detach().clone())
        self.U_in = nn.Parameter(w.factors[1].detach().clone())

    def _chain_conv(self, x, stride, padding, dilation):
        return tucker2_conv_merged(x, self.core, self.U_out, self.U_in, stride, padding, dilation, mix=self.mix)

    def _plain_chain(self) -> PlainChain:
        return tucker2_plain(self.core, self.U_out, self.U_in, self.out_features // self.U_out.shape[0],
                             self.in_features // self.U_in.shape[0])

    def _linear(self, x):
        return tucker2_linear(x, self.core, self.U_out, self.U_in)

    def _plain_linear(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        # x -> (U_in ⊗ I_t_in)^T x -> core -> (U_out ⊗ I_t_out): the input side merged into the core,
        # W_in[o, q t_in + w] = sum_k core[o, k t_in + w] U_in[q, k]; its rows (k, u) reordered to
        # (u, k), so that U_out applies to each of the t_out groups
        t_in, t_out = self.in_features // self.U_in.shape[0], self.out_features // self.U_out.shape[0]
        rows = self.core.shape[0]
        W_in = torch.einsum("okw,qk->oqw", self.core.reshape(rows, -1, t_in), self.U_in).reshape(rows, -1)
        return _groups_first(W_in, t_out), self.U_out, t_out


@register_fused_form("paired")
class FusedPaired(FusedLayer):
    """A paired (TT-matrix) layer: its cores, contracted one at a time."""

    def __init__(self, layer: FactorizedLayer):
        super().__init__(layer)
        w = layer.weight_tensor
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone()) for c in w.factors])
        self.in_modes = tuple(layer.tensorization.in_modes)
        self.out_modes = tuple(layer.tensorization.out_modes)
        self.t = w.t

    def _chain_conv(self, x, stride, padding, dilation):
        return paired_conv(x, list(self.cores), self.in_modes, self.out_modes, self.t, self.kernel_size, stride,
                           padding, dilation)

    def _linear(self, x):
        return paired_linear(x, list(self.cores), self.in_modes, self.out_modes, self.t)


@register_fused_form("cp")
class FusedCP(FusedLayer):
    """A CP layer as ``A`` (Khatri-Rao of the input factors) -> depthwise k x k ``S`` -> ``B``."""

    def __init__(self, layer: FactorizedLayer):
        super().__init__(layer)
        w = layer.weight_tensor
        with torch.no_grad():
            f = cp_factors(w.factors, len(layer.tensorization.in_modes), has_kernel=bool(self.kernel_size))
        self.A = nn.Parameter(f.A.detach().clone())
        self.S = None if f.S is None else nn.Parameter(f.S.detach().clone())
        self.B = nn.Parameter(f.B.detach().clone())

    def _chain_conv(self, x, stride, padding, dilation):
        return cp_conv(x, CPFactors(self.A, self.S, self.B), self.kernel_size, stride, padding, dilation, mix=self.mix)

    def _plain_chain(self) -> PlainChain:
        return cp_plain(self.A, self.S, self.B, self.kernel_size)

    def _linear(self, x):
        return cp_linear(x, CPFactors(self.A, self.S, self.B))


def fuse_layer(layer: FactorizedLayer) -> nn.Module:
    """The fused form of one factorized Conv/Linear (an embedding is returned as it is: its lookup
    already has a single path)."""
    if not isinstance(layer, FactorizedLayer):
        raise ValueError(f"fuse_layer expects a factorized layer, got {type(layer).__name__}")
    if not _fusable(layer):
        return layer
    return layer.tensorization.layout.fuse(layer).to(device=layer.weight_tensor.device).train(layer.training)


def fuse(model: nn.Module, *, example: torch.Tensor | None = None, decide: str = "measure",
         fold_batchnorm: bool = False, inplace: bool = False,
         forms: Mapping[str, str] | Mapping[str, torch.Tensor] | None = None, watch: str = "bits") -> nn.Module:
    """Replace every factorized Conv/Linear of ``model`` by its fused deployment form.

    A fused model is for inference: save and share the unfused compressed model (its state dict,
    or a checkpoint), which is the portable form, and fuse after loading, on the machine that
    serves. The forms chosen with ``example`` depend on timings, so two calls can keep different
    layers factorized and give state dicts with different keys; each fused layer records its form
    in the state dict's metadata (:func:`fused_forms`), and ``fuse(model, forms=...)`` rebuilds
    exactly that structure, into which the fused state dict then loads.

    Parameters
    ----------
    model : nn.Module
        A model with factorized layers (for example from :func:`stpnet.compress`).
    example : torch.Tensor, optional
        An input batch of the size the model will serve. With it, each layer takes the fastest
        of its forms at that size: its fused contraction chain (for a sequential/ring
        convolution, with each form of its grouped k x k stage, ``FusedSequential.spatial_stage``),
        its other forms (``FusedLayer.form``: plain convolutions on weights derived from the merged
        factors once in inference, a few times the factors' size, faster at batch 1; those
        three stages in one native pass per image, ``'onepass'``, where :mod:`stpnet.deploy.native`
        builds; for a Linear, two plain products on derived weights, ``'plain'``; or the dense op
        on the rebuilt weight), or, for a convolution, the factorized layer forced to
        ``'rebuild'`` (in eval mode it rebuilds the dense weight once and reuses it, so it runs
        like a dense layer while storing only its factors; its runtime memory holds the dense
        weight; for a Linear the fused ``'dense'`` form is that op). Parameters stay the
        merged factors in every form.
        Without it, every layer becomes a contraction chain (the form to export: nothing dense
        is ever built).
        With ``decide='measure'`` the whole model is then timed on ``example`` against itself
        with every fused layer in the ``'dense'`` form, and the faster is kept: per-layer
        timings do not add up exactly inside a network (caches, the layers around), and this
        keeps the result from being slower than the network on its rebuilt dense weights.
    decide : {'measure', 'cost'}, default 'measure'
        With ``example``: ``'measure'`` times the forms on the layer's own input (in three
        alternating rounds, each a warm-up and the best of two calls) and keeps the fastest;
        ``'cost'`` follows the layer's path choice (its cost model, or its measurement with
        ``forward_path='measure'``) without timing.
    fold_batchnorm : bool, default False
        Also fold each eval-mode BatchNorm that directly follows a convolution into it
        (:func:`stpnet.fold_batchnorm`: dense convolutions too), before the whole-model check.
        The result computes the eval-mode function only; folded BatchNorm layers become
        ``nn.Identity``. A layer kept factorized (``'rebuild'``) keeps the BatchNorm after it.
    inplace : bool, default False
        Modify ``model`` itself instead of a deep copy.
    forms : mapping, optional
        The forms to take instead of choosing them: :func:`fused_forms` of a fused model or of its
        state dict, or that state dict itself (its recorded forms are read). Every factorized
        layer must be named; not with ``example``. A fused state dict of a model folded with
        ``fold_batchnorm=True`` loads into one fused with ``forms=`` and ``fold_batchnorm=True``.
    watch : {'bits', 'versions'}, default 'bits'
        How each inference call checks that the weights derived from the factors (and cached) are
        still current. ``'bits'`` compares the factors' bits with a copy, so any edit is seen,
        ``p.data`` writes included; that reads every factor on every call, which at batch 1 costs
        a small transformer about a tenth of its time. ``'versions'`` checks each parameter's
        identity, version counter and storage only: every change made through PyTorch
        operations is seen (optimizer steps, ``load_state_dict``, in-place ops), writes through
        ``p.data``, NumPy or raw memory are not; the choice for serving fixed weights.

    Notes
    -----
    To run under ``torch.compile``, compile the chain form (``fuse(model)``, no ``example``):
    the forms on derived weights (plain, dense, a kept ``'rebuild'`` layer) cache those weights
    only in eager inference, so compiled code derives them again on every call (BENCHMARKS.md,
    "Inference latency of whole networks").

    Each ``nn.TransformerEncoderLayer`` around a packed attention becomes a
    :class:`stpnet.nn.attention.WeightsOnceEncoderLayer`, the same module computing the same
    function: in inference it runs PyTorch's fused encoder kernel, each checked weight read once,
    where every projection is on its dense weight, and its modules (the forms chosen here)
    otherwise; the whole-model check above then compares the two.

    Returns
    -------
    nn.Module
        The same function (see the module docstring); shared layers stay shared. Compare
        ``sum(p.numel() for p in fused.parameters())`` with the factorized count: the merged
        operators hold about as many parameters as the cores.
    """
    if decide not in ("measure", "cost"):
        raise ValueError(f"decide must be 'measure' or 'cost', got {decide!r}")
    if watch not in WATCH_MODES:
        raise ValueError(f"watch must be one of {WATCH_MODES}, got {watch!r}")
    if forms is not None:
        if example is not None:
            raise ValueError("give example= (to choose the forms by timing) or forms= (the forms recorded by "
                             "fused_forms), not both")
        forms = _recorded_forms(forms)
    if example is not None:
        _check_example(model, example)
    if isinstance(model, FactorizedLayer):
        if forms is not None:
            raise ValueError("forms= names the layers of a model; for one layer, fuse_layer(layer) and "
                             "set_form_spec(form)")
        return _watch(fuse_layer(model), watch)
    if not inplace:
        model = copy.deepcopy(model)
    if forms is not None:
        forms = _forms_from_names(model, forms)
    else:
        forms = _forms_for_example(model, example, decide == "measure") if example is not None else {}

    def build(layer: FactorizedLayer) -> nn.Module:
        form = forms.get(id(layer))
        if form == "rebuild":
            layer.forward_path = "rebuild"
            return layer
        if form is not None:
            return form.train(layer.training)
        return fuse_layer(layer)

    fused = replace_modules(model, _fusable, build)
    _read_encoder_weights_once(fused)
    if fold_batchnorm:
        fused = _fold_batchnorm(fused, inplace=True)
    _watch(fused, watch)
    if example is not None and decide == "measure":
        _keep_faster_than_dense(fused, example)
    return fused


def _watch(model: nn.Module, watch: str) -> nn.Module:
    """Set ``watch`` on every inference cache of ``model`` (``fuse(watch=)``)."""
    for m in model.modules():
        if isinstance(m, InferenceCache):
            m.watch = watch
    return model


def _check_example(model: nn.Module, example: object) -> None:
    """``fuse(example=)``: a real tensor of the dtype and on the device of the model's parameters
    (the forms are timed on it, so it must be what the model will serve)."""
    if not isinstance(example, torch.Tensor):
        raise ValueError(f"example must be an input batch (a tensor), got {type(example).__name__}")
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    if example.device.type == "meta" or (reference is not None and reference.device.type == "meta"):
        raise ValueError("fuse(example=) times the forms on real data: the example and the model must not be on "
                         "the meta device")
    if example.numel() == 0:
        raise ValueError(f"example has shape {tuple(example.shape)}, with no elements: give a batch of the size "
                         "the model will serve")
    if reference is None:
        return
    if example.is_floating_point() and example.dtype != reference.dtype:
        raise ValueError(f"example is {example.dtype}, the model's parameters {reference.dtype}: the forms are "
                         f"timed on the example, so give one of the dtype the model serves (example.to("
                         f"{reference.dtype})), or convert the model first")
    if not example.is_floating_point() and not any(takes_indices(m) for m in model.modules()):
        raise ValueError(f"example is {example.dtype}, but the model has no embedding to look integer inputs up: "
                         f"give a floating batch ({reference.dtype}) of the size the model will serve")
    if example.device != reference.device:
        raise ValueError(f"example is on {example.device}, the model on {reference.device}: give it on the "
                         "device the model serves on")


def fused_forms(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The form of every fused layer of a fused model, or recorded in its state dict.

    Parameters
    ----------
    source : nn.Module or state dict
        A model returned by :func:`fuse`, or its ``state_dict()`` (also after ``torch.save`` and
        ``torch.load``: the forms travel in the state dict's ``_metadata``).

    Returns
    -------
    dict
        ``{layer name: form}``: one of :data:`FUSED_FORMS` (``'chain:<stage>'`` for a
        sequential/ring chain with a chosen grouped stage), or ``'rebuild'`` for a layer kept
        factorized. Give it to ``fuse(model, forms=...)`` to rebuild the same structure.

    Raises
    ------
    ValueError
        If ``source`` records no form (not a fused model, or a state dict that lost its metadata,
        for example through ``dict(state_dict)``).
    """
    if isinstance(source, nn.Module):
        out = {}
        for name, module in source.named_modules(remove_duplicate=False):
            if isinstance(module, FusedLayer):
                out[name] = module.form_spec
            elif _fusable(module) and module.forward_path == "rebuild":
                out[name] = "rebuild"
    elif isinstance(source, Mapping):
        metadata = getattr(source, "_metadata", None) or {}
        out = {name: entry[FORM_METADATA_KEY] for name, entry in metadata.items()
               if isinstance(entry, Mapping) and FORM_METADATA_KEY in entry}
    else:
        raise ValueError(f"fused_forms reads a fused model or its state dict, got {type(source).__name__}")
    if not out:
        raise ValueError("no fused layer's form is recorded here: give a model returned by stpnet.fuse, or its "
                         "state_dict() as saved (a plain dict copy loses the metadata the forms travel in)")
    return out


def _recorded_forms(forms: Mapping) -> dict[str, str]:
    """``forms=`` as ``{name: form}``: given so, or read from a fused state dict."""
    if not isinstance(forms, Mapping):
        raise ValueError(f"forms must be a mapping of layer names to forms (stpnet.deploy.fused.fused_forms), got "
                         f"{type(forms).__name__}")
    if forms and all(isinstance(v, str) for v in forms.values()) and all(isinstance(k, str) for k in forms):
        return dict(forms)
    return fused_forms(forms)


def _forms_from_names(model: nn.Module, forms: Mapping[str, str]) -> dict[int, nn.Module | str]:
    """For each factorized layer of ``model`` (by id): ``'rebuild'`` or its fused module in the form
    ``forms`` names for it."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and _fusable(module):
            names.setdefault(id(module), []).append(name)
    known = {n for aliases in names.values() for n in aliases}
    unknown = sorted(set(forms) - known)
    if unknown:
        raise ValueError(f"forms names layers the model has no factorized layer at: {unknown[:5]}; its factorized "
                         f"layers: {sorted(known)[:5]}{' ...' if len(known) > 5 else ''}")
    missing = [aliases[0] for aliases in names.values() if not any(n in forms for n in aliases)]
    if missing:
        raise ValueError(f"forms names no form for the factorized layers {missing[:5]}; give every layer's form "
                         "(stpnet.deploy.fused.fused_forms of the fused model or of its state dict)")
    out: dict[int, nn.Module | str] = {}
    for name, module in model.named_modules():
        if not (name and _fusable(module)):
            continue
        spec = next(forms[n] for n in names[id(module)] if n in forms)
        if spec == "rebuild":
            out[id(module)] = "rebuild"
            continue
        fused = fuse_layer(module)
        try:
            fused.set_form_spec(spec)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        out[id(module)] = fused
    return out


def _model_time(model: nn.Module, x: torch.Tensor) -> float:
    """Best seconds of a few calls of ``model`` on ``x`` (after a warm-up)."""
    return best_time(lambda: model(x), x.device, 3)


@torch.no_grad()
def _keep_faster_than_dense(model: nn.Module, example: torch.Tensor, rounds: int = 3) -> None:
    """Time ``model`` on ``example`` with its fused layers in their chosen forms and with every
    one in the ``'dense'`` form, alternating for ``rounds`` rounds; leave it in the faster (best
    time of each)."""
    layers = [m for m in model.modules() if isinstance(m, FusedLayer)]
    if not layers:
        return
    chosen = [m.form for m in layers]

    def set_forms(dense: bool) -> None:
        for layer, form in zip(layers, chosen):
            layer.form = "dense" if dense else form

    was_training = model.training
    model.eval()
    try:
        times: dict[bool, float] = {False: float("inf"), True: float("inf")}
        for _ in range(rounds):
            for dense in (False, True):
                set_forms(dense)
                times[dense] = min(times[dense], _model_time(model, example))
        set_forms(times[True] < times[False])
    finally:
        model.train(was_training)  # drops every layer's cache: the kept form's weights are built on the first call


def _fastest_form(layer: FactorizedLayer, fused: FusedLayer, x: torch.Tensor) -> FusedLayer | str:
    """Time ``fused`` on ``x`` in each of its forms (each conv form, and for a sequential/ring
    chain each grouped-stage form) and ``layer`` rebuilt, in alternating rounds
    (:func:`interleaved_best_times`); return ``'rebuild'`` or ``fused`` set
    to its fastest form. For a Linear the fused ``'dense'`` form is the rebuilt dense op itself
    (``F.linear`` on the weight rebuilt once), with fewer tensors to check per call than the
    factorized layer's cores and no child modules, so it stands for ``'rebuild'``."""
    candidates: list[tuple[str, str | None]] = []
    for form in fused.forms:
        if form == "chain" and isinstance(fused, FusedSequential) and fused.kernel_size and fused.ring * fused.t > 1:
            candidates += [(form, stage) for stage in GROUPED_STAGES]
        else:
            candidates.append((form, None))

    def timed(form: str, stage: str | None):
        def run():
            fused.form = form
            if isinstance(fused, FusedSequential):
                fused.spatial_stage = stage
            return fused(x)
        return run

    runs = {candidate: timed(*candidate) for candidate in candidates}
    if fused.kernel_size or "dense" not in fused.forms:
        rebuilt = copy.copy(layer)  # shares the factors and the eval cache
        rebuilt.forward_path = "rebuild"
        runs["rebuild"] = lambda: rebuilt(x)
    times = interleaved_best_times(runs, x.device)
    rebuild_time = times.pop("rebuild", float("inf"))
    (form, stage), fused_time = min(times.items(), key=lambda item: item[1])
    fused._drop_cache()  # only the chosen form's weights are kept (rebuilt on the first call)
    if rebuild_time < fused_time:
        return "rebuild"
    fused.form = form
    if isinstance(fused, FusedSequential):
        fused.spatial_stage = stage
    return fused


def _read_encoder_weights_once(model: nn.Module) -> None:
    """Make each ``nn.TransformerEncoderLayer`` of ``model`` around a packed
    :class:`UnpackedMultiheadAttention` a :class:`WeightsOnceEncoderLayer` (the same module and
    function: its fast path reads each checked weight once, and it runs its modules where a
    projection is in a form other than its dense weight)."""
    for module in model.modules():
        if (type(module) is nn.TransformerEncoderLayer and isinstance(module.self_attn, UnpackedMultiheadAttention)
                and module.self_attn.packed):
            module.__class__ = WeightsOnceEncoderLayer


def _fusable(module: nn.Module) -> bool:
    """A factorized layer whose type has a fused form (:attr:`stpnet.nn.layer_types.LayerType.fusable`;
    one of no registered type goes through its layout's)."""
    if not isinstance(module, FactorizedLayer):
        return False
    kind = factorized_layer_type(module)
    return kind is None or kind.fusable


@torch.no_grad()
def _forms_for_example(model: nn.Module, example: torch.Tensor, measure: bool) -> dict[int, nn.Module | str]:
    """For each factorized layer (by id) that ``example`` reaches: ``'rebuild'`` if it should stay
    factorized and rebuild, else its fused module. With ``measure``, each layer's own input times
    the rebuilt dense op against the fused layer in each of its forms (:func:`_fastest_form`; the
    fastest is kept); without, the layer's own path choice decides."""
    inputs: dict[int, tuple[FactorizedLayer, torch.Tensor]] = {}

    def hook(layer, args, output):
        inputs.setdefault(id(layer), (layer, args[0]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _fusable(m)]
    was_training = model.training
    try:
        model.eval()
        model(example)
        for h in handles:
            h.remove()
        forms: dict[int, nn.Module | str] = {}
        for key, (layer, x) in inputs.items():
            if not measure:
                forms[key] = "rebuild" if layer.path_for(x) == "rebuild" else fuse_layer(layer)
                continue
            fused = fuse_layer(layer).eval()
            forms[key] = _fastest_form(layer, fused, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return forms
