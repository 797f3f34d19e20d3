"""Layer layouts: how a layer's weight becomes a factorized tensor, and how that tensor is applied.

A layout is one object that owns, for one way of laying a weight (C_out, C_in, *kernel) out as a
tensor:

* its tensorization: the channel modes, the tensor shape, and the maps weight <-> tensor;
* its rank shape: the tensor's t per mode and what one uniform rank R means;
* its contraction kernels: the Linear and convolution forward without rebuilding the weight, and
  the embedding lookup;
* its cost function: multiply-adds and activations of that forward, for the path choice;
* its fused (deployment) form.

The layouts:

* ``sequential`` (TT/STT): modes [I_1..I_d, (K,) O_1..O_e];
* ``ring`` (TR/STR): the same modes closed into a ring;
* ``paired`` (TT/STT): [(K,) I_1 O_1, ..., I_d O_d], the TT-matrix of Novikov et al. (2015) and
  Garipov et al. (2016);
* ``tucker2`` (Tucker/STTu): (C_out, C_in, (K)), the spatial mode at full rank;
* ``cp`` (CP): the sequential modes, as a sum of rank-one terms (Lebedev et al. 2015).

Each format class lists the layouts it supports (``FactorizedTensor.layouts``). A layout
registers itself when its class is defined; :func:`layout_named` looks one up and raises a
ValueError listing the valid names.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from .._validate import divisors
from ..functional.contract import (cp_conv, cp_factors, cp_linear, paired_conv, paired_linear, sequential_conv,
                                   sequential_factors, sequential_linear, tucker2_conv_merged, tucker2_kernel,
                                   tucker2_linear)
from ..functional.lookup import cp_lookup, paired_lookup, sequential_lookup, sequential_output_factor, tucker2_lookup
from .cost import GROUP_PENALTY, Stage
from .modes import channel_modes

if TYPE_CHECKING:  # pragma: no cover
    from .base import FactorizedLayer

__all__ = ["Layout", "LAYOUTS", "layout_named", "layouts_of", "default_layout", "register_fused_form"]

_REGISTRY: dict[str, "Layout"] = {}

#: Every layout by name.
LAYOUTS = MappingProxyType(_REGISTRY)

# Layout name -> the fused module class its layers deploy as. Filled by stpnet.deploy.fused
# (register_fused_form), which builds on the factorized layers and so is imported after this module.
_FUSED_FORMS: dict[str, type] = {}


def register_fused_form(*layout_names: str):
    """Class decorator: the decorated fused module class (:mod:`stpnet.deploy.fused`) is the deployment
    form of the layers of these layouts, and of layouts derived from them that register none of
    their own; :meth:`Layout.fuse` builds it from a factorized layer."""
    def register(cls: type) -> type:
        for name in layout_names:
            _FUSED_FORMS[name] = cls
        return cls
    return register


def layout_named(name: "str | Layout") -> "Layout":
    """The layout object of a name (or the object itself); ValueError listing the valid names."""
    if isinstance(name, Layout):
        return name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown layout {name!r}; valid layouts: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def layouts_of(format_class) -> tuple["Layout", ...]:
    """The layouts a format class supports, its default first."""
    return tuple(layout_named(name) for name in format_class.layouts)


def default_layout(format_class) -> "Layout":
    """The layout a format's layers use unless told otherwise."""
    return layouts_of(format_class)[0]


class Layout:
    """One layer layout (see the module docstring). Subclasses set ``name`` and override what
    differs; the base implements the sequential mode order [I_1..I_d, (K,) O_1..O_e]."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise TypeError(f"layout name {cls.name!r} is taken by {type(_REGISTRY[cls.name]).__name__}")
            _REGISTRY[cls.name] = cls()

    def __repr__(self) -> str:
        return repr(self.name)

    def __str__(self) -> str:
        return self.name

    def __reduce__(self):  # copies and pickles stay the registered object
        return (layout_named, (self.name,))

    # ------------------------------------------------------------------ tensorization
    def modes(self, c_in: int, c_out: int, has_kernel: bool, t: int, in_modes: Sequence[int] | None,
              out_modes: Sequence[int] | None, n_modes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The input and output channel modes (given ones checked, else balanced factorizations
        with a multiple of ``t`` last on the output side, where the copy index is emitted)."""
        ins = tuple(in_modes) if in_modes is not None else channel_modes(c_in, n_modes)
        outs = tuple(out_modes) if out_modes is not None else channel_modes(c_out, n_modes, t, True)
        if math.prod(ins) != c_in or math.prod(outs) != c_out:
            raise ValueError(f"in_modes {ins} and out_modes {outs} must multiply to the channel counts "
                             f"{c_in} and {c_out}")
        if outs[-1] % t:
            raise ValueError(f"t={t} must divide the last output mode ({outs[-1]} of {outs}); "
                             "reorder out_modes so a multiple of t comes last")
        return ins, outs

    def tensor_shape(self, tz) -> tuple[int, ...]:
        """Shape of the factorized tensor."""
        k = (tz.kernel_numel,) if tz.has_kernel else ()
        return (*tz.in_modes, *k, *tz.out_modes)

    def weight_to_tensor(self, tz, W: torch.Tensor) -> torch.Tensor:
        """Dense weight (C_out, C_in, *kernel) -> the tensor."""
        Wk = W.reshape(tz.out_features, tz.in_features, -1)
        X = Wk.permute(1, 2, 0) if tz.has_kernel else Wk[..., 0].T
        return X.reshape(self.tensor_shape(tz))

    def tensor_to_weight(self, tz, X: torch.Tensor) -> torch.Tensor:
        """The tensor -> dense weight (C_out, C_in, *kernel)."""
        X = X.reshape(tz.in_features, tz.kernel_numel, tz.out_features)
        return X.permute(2, 0, 1).reshape(tz.weight_shape)

    def tensor_t(self, tz, t: int) -> int | tuple[int, ...]:
        """The factorized tensor's STP factor for the layer's ``t``."""
        return t

    def uniform_rank(self, tz, R: int) -> int | tuple[int, ...]:
        """The rank specification that one uniform rank R stands for."""
        return R

    def tol_rank(self, tz) -> tuple[int, ...] | None:
        """Rank caps for a fit by tolerance (None: the tolerance alone decides)."""
        return None

    def bond_ranks(self, w) -> list[int]:
        """The ranks of the classic cores (R / t)."""
        return [R // w.t for R in w.rank]

    # ------------------------------------------------------------------ kernels
    def linear(self, layer: "FactorizedLayer", x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` for ``x`` (N, C_in), without the bias."""
        raise NotImplementedError

    def conv(self, layer: "FactorizedLayer", x: torch.Tensor, padding) -> torch.Tensor:
        """The convolution of ``x`` (already padded for non-zero padding modes), without the bias."""
        raise NotImplementedError

    def lookup(self, layer: "FactorizedLayer", indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (N,) of the (C_in, C_out) table ``W^T``, without forming it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ costs
    def linear_cost(self, layer: "FactorizedLayer") -> tuple[int, int, int]:
        """``(multiply-adds per input row, activations per row, multiply-adds per call)`` of :meth:`linear`."""
        raise NotImplementedError

    def conv_cost(self, layer: "FactorizedLayer", p_in: int, p_out: int) -> tuple[list[Stage], int, int]:
        """``(stages, activations, per_call)`` of :meth:`conv` per sample: each stage is a
        :class:`~stpnet.nn.cost.Stage` (multiply-adds, narrowest channel count, slowdown of its
        form); ``per_call`` is the work on the factors."""
        raise NotImplementedError

    # ------------------------------------------------------------------ deployment
    def fuse(self, layer: "FactorizedLayer"):
        """The fused module (:mod:`stpnet.deploy.fused`) computing the layer with merged factors: the
        class registered for this layout (:func:`register_fused_form`), or for the nearest layout
        it derives from."""
        for klass in type(self).__mro__:
            form = _FUSED_FORMS.get(klass.__dict__.get("name"))
            if form is not None:
                return form(layer)
        raise NotImplementedError(f"layout {self.name!r} has no fused form; register one with "
                                  "stpnet.nn.layouts.register_fused_form")


class SequentialLayout(Layout):
    """TT/STT cores over [I_1..I_d, (K,) O_1..O_e]: 1x1 -> k x k in the rank space -> 1x1."""

    name = "sequential"

    def _factors(self, layer):
        w, tz = layer.weight_tensor, layer.tensorization
        return layer._cached("sequential", lambda: sequential_factors(w.factors, w.t, len(tz.in_modes),
                                                                       has_kernel=tz.has_kernel))

    def _ring(self, ranks: list[int]) -> int:
        return 1

    def _bonds(self, ranks: list[int], d: int) -> tuple[int, int]:
        """(bond into the spatial core, bond out of it)."""
        return ranks[d - 1], ranks[d] if d < len(ranks) else 1

    def linear(self, layer, x):
        return sequential_linear(x, self._factors(layer))

    def conv(self, layer, x, padding):
        return sequential_conv(x, self._factors(layer), layer.kernel_size, layer.stride, padding, layer.dilation)

    def lookup(self, layer, indices):
        w, tz = layer.weight_tensor, layer.tensorization
        B = layer._cached("output_factor", lambda: sequential_output_factor(w.factors, len(tz.in_modes)))
        return sequential_lookup(indices, w.factors, w.t, tz.in_modes, B)

    def linear_cost(self, layer):
        tz, w = layer.tensorization, layer.weight_tensor
        t, ranks = w.t, self.bond_ranks(w)
        a, r = self._ring(ranks), self._bonds(ranks, len(tz.in_modes))[0]
        c_in, c_out = tz.in_features, tz.out_features
        return (c_in * r * a * t + c_out * r * a, r * a * t + c_out, (c_in * t + c_out) * r * a * max(ranks))

    def conv_cost(self, layer, p_in, p_out):
        tz, w = layer.tensorization, layer.weight_tensor
        t, r = w.t, self.bond_ranks(w)
        c_in, c_out, K = tz.in_features, tz.out_features, tz.kernel_numel
        a = self._ring(r)
        rb, ra = self._bonds(r, len(tz.in_modes))
        groups = a * t
        stages = [Stage(c_in * rb * groups * p_in, min(c_in, rb * groups)),
                  Stage(ra * rb * K * groups * p_out, min(ra, rb), 1.0 + GROUP_PENALTY * (groups - 1)),
                  Stage(c_out * ra * a * p_out, min(c_out, ra * a))]
        acts = rb * a * t * p_in + ra * a * t * p_out + c_out * p_out
        return stages, acts, (c_in * t + c_out) * max(r) * max(r)


class RingLayout(SequentialLayout):
    """TR/STR cores over the sequential modes, closed into a ring of rank R_0 = a: the sequential
    kernels with ``a * t`` groups sharing the spatial kernel."""

    name = "ring"

    def _ring(self, ranks):
        return ranks[0]

    def _bonds(self, ranks, d):
        return ranks[d], ranks[d + 1] if d + 1 < len(ranks) else ranks[0]


class PairedLayout(Layout):
    """TT/STT cores over [(K,) I_1 O_1, ..., I_d O_d]: the spatial core filters every input
    channel, then the channel cores are contracted one at a time."""

    name = "paired"

    def modes(self, c_in, c_out, has_kernel, t, in_modes, out_modes, n_modes):
        ins, outs = super().modes(c_in, c_out, has_kernel, t, in_modes, out_modes, n_modes)
        d = max(len(ins), len(outs), 1 if has_kernel else 2)
        return (1,) * (d - len(ins)) + ins, (1,) * (d - len(outs)) + outs

    def tensor_shape(self, tz):
        k = (tz.kernel_numel,) if tz.has_kernel else ()
        return (*k, *(i * o for i, o in zip(tz.in_modes, tz.out_modes)))

    def weight_to_tensor(self, tz, W):
        d, e = len(tz.in_modes), len(tz.out_modes)
        X = W.reshape(*tz.out_modes, *tz.in_modes, -1)
        # (O_1..O_d, I_1..I_d, K) -> (K, I_1, O_1, ..., I_d, O_d)
        order = [2 * d] if tz.has_kernel else []
        for k in range(d):
            order += [e + k, k]
        X = X.permute(*order) if tz.has_kernel else X[..., 0].permute(*order)
        return X.reshape(self.tensor_shape(tz))

    def tensor_to_weight(self, tz, X):
        d = len(tz.in_modes)
        pairs = [m for io in zip(tz.in_modes, tz.out_modes) for m in io]
        X = X.reshape(tz.kernel_numel, *pairs)
        # (K, I_1, O_1, ..., I_d, O_d) -> (O_1..O_d, I_1..I_d, K)
        order = [2 + 2 * k for k in range(d)] + [1 + 2 * k for k in range(d)] + [0]
        return X.permute(*order).reshape(tz.weight_shape)

    def linear(self, layer, x):
        tz, w = layer.tensorization, layer.weight_tensor
        return paired_linear(x, w.factors, tz.in_modes, tz.out_modes, w.t)

    def conv(self, layer, x, padding):
        tz, w = layer.tensorization, layer.weight_tensor
        return paired_conv(x, w.factors, tz.in_modes, tz.out_modes, w.t, layer.kernel_size, layer.stride, padding,
                           layer.dilation)

    def lookup(self, layer, indices):
        tz, w = layer.tensorization, layer.weight_tensor
        return paired_lookup(indices, w.factors, tz.in_modes, tz.out_modes, w.t)

    def linear_cost(self, layer):
        tz, w = layer.tensorization, layer.weight_tensor
        t, ranks = w.t, self.bond_ranks(w)
        macs, acts, width = 0, 0, tz.in_features
        for k in range(len(tz.in_modes)):
            r_prev = ranks[k - 1] if k else 1
            r_next = ranks[k] if k < len(ranks) else 1
            width = width // tz.in_modes[k] * tz.out_modes[k] * (r_next * t) // max(r_prev * (t if k else 1), 1)
            macs += width * tz.in_modes[k] * r_prev
            acts += width
        return macs, acts, 0

    def conv_cost(self, layer, p_in, p_out):
        tz, w = layer.tensorization, layer.weight_tensor
        t, r = w.t, self.bond_ranks(w)
        c_in, K = tz.in_features, tz.kernel_numel
        state = c_in * r[0] * t * p_out
        stages, acts = [Stage(c_in * r[0] * t * K * p_out, 1)], state
        d = len(tz.in_modes)
        for k in range(d):
            r_prev, r_next = r[k], (r[k + 1] if k + 1 < len(r) else 1)
            o_k = tz.out_modes[k] // (t if k == d - 1 else 1)
            new_state = state // (tz.in_modes[k] * r_prev) * o_k * r_next
            stages.append(Stage(state * o_k * r_next, min(tz.in_modes[k] * r_prev, o_k * r_next)))
            acts += new_state
            state = new_state
        return stages, acts, (c_in * t + tz.out_features) * max(r) * max(r)


class Tucker2Layout(Layout):
    """Tucker-2 / STTu of (C_out, C_in, (K)): 1x1 (U_in ⊗ I_t)^T -> the core as a k x k
    convolution -> 1x1 (U_out ⊗ I_t). The spatial mode keeps full rank and t = 1."""

    name = "tucker2"

    def modes(self, c_in, c_out, has_kernel, t, in_modes, out_modes, n_modes):
        for side, c in (("in", c_in), ("out", c_out)):
            if c % t:
                raise ValueError(f"t={t} must divide the {side} channel count {c} for STTu; valid t: {divisors(c)}")
        return (c_in,), (c_out,)

    def tensor_shape(self, tz):
        k = (tz.kernel_numel,) if tz.has_kernel else ()
        return (tz.out_features, tz.in_features, *k)

    def weight_to_tensor(self, tz, W):
        return W.reshape(self.tensor_shape(tz))

    def tensor_to_weight(self, tz, X):
        return X.reshape(tz.weight_shape)

    def tensor_t(self, tz, t):
        return (t, t) + ((1,) if tz.has_kernel else ())

    def uniform_rank(self, tz, R):
        return (R, R, tz.kernel_numel) if tz.has_kernel else R

    def tol_rank(self, tz):
        shape = self.tensor_shape(tz)
        return (shape[0], shape[1], tz.kernel_numel) if tz.has_kernel else None

    def bond_ranks(self, w):
        return list(w.rank)

    def linear(self, layer, x):
        w = layer.weight_tensor
        return tucker2_linear(x, w.core, w.factors[0], w.factors[1])

    def conv(self, layer, x, padding):
        w = layer.weight_tensor
        # the core merged with the spatial factor: cached in inference like the other layouts' merges
        W = layer._cached("tucker2_kernel", lambda: tucker2_kernel(w.core, w.factors[2], layer.kernel_size))
        return tucker2_conv_merged(x, W, w.factors[0], w.factors[1], layer.stride, padding, layer.dilation)

    def lookup(self, layer, indices):
        w = layer.weight_tensor
        return tucker2_lookup(indices, w.core, w.factors[0], w.factors[1], w.t[0])

    def linear_cost(self, layer):
        tz, w = layer.tensorization, layer.weight_tensor
        t = w.t[0]
        r_o, r_i = w.rank
        return (tz.in_features * r_i // t + r_o * r_i + tz.out_features * r_o // t, r_i + r_o + tz.out_features, 0)

    def conv_cost(self, layer, p_in, p_out):
        tz, w = layer.tensorization, layer.weight_tensor
        t = w.t[0]
        c_in, c_out, K = tz.in_features, tz.out_features, tz.kernel_numel
        r_o, r_i = w.rank[0], w.rank[1]
        stages = [Stage(c_in * r_i // t * p_in, min(c_in, r_i)), Stage(r_o * r_i * K * p_out, min(r_o, r_i)),
                  Stage(c_out * r_o // t * p_out, min(c_out, r_o))]
        return stages, r_i * p_in + r_o * p_out + c_out * p_out, c_in * c_out


class CPLayout(Layout):
    """CP over the sequential modes [I_1..I_d, (K,) O_1..O_e]: 1x1 (Khatri-Rao of the input
    factors) -> depthwise k x k (one filter per rank-one term) -> 1x1 (Khatri-Rao of the output
    factors), the CP convolution of Lebedev et al. (2015)."""

    name = "cp"

    def _factors(self, layer):
        w, tz = layer.weight_tensor, layer.tensorization
        return layer._cached("cp", lambda: cp_factors(w.factors, len(tz.in_modes), tz.has_kernel))

    def linear(self, layer, x):
        return cp_linear(x, self._factors(layer))

    def conv(self, layer, x, padding):
        return cp_conv(x, self._factors(layer), layer.kernel_size, layer.stride, padding, layer.dilation)

    def lookup(self, layer, indices):
        w, tz = layer.weight_tensor, layer.tensorization
        B = self._factors(layer).B
        return cp_lookup(indices, w.factors, tz.in_modes, B)

    def linear_cost(self, layer):
        tz, (R,) = layer.tensorization, layer.weight_tensor.rank
        c_in, c_out = tz.in_features, tz.out_features
        return (c_in + c_out) * R, R + c_out, (c_in + c_out) * R

    def conv_cost(self, layer, p_in, p_out):
        tz, (R,) = layer.tensorization, layer.weight_tensor.rank
        c_in, c_out, K = tz.in_features, tz.out_features, tz.kernel_numel
        stages = [Stage(c_in * R * p_in, min(c_in, R)), Stage(R * K * p_out, 1),
                  Stage(c_out * R * p_out, min(c_out, R))]
        return stages, R * p_in + R * p_out + c_out * p_out, (c_in + c_out) * R
