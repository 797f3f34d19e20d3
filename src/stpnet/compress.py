"""Whole-model compression: replace the eligible Conv and Linear layers of any ``nn.Module`` with
factorized ones, choose ranks for a target size, and report parameters and FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .discovery import (attention_modules, candidate_layers, eligible_layers, layer_eligibility, layer_input_shapes,
                        tied_layers)
from .formats import format_class
from .nn.base import FactorizedLayer, layer_tensorization, ranks_for_compression, tensor_t, uniform_rank
from .nn._replace import replace_modules, set_submodule
from .nn.convert import dense_geometry, to_dense, why_not_factorizable
from .nn.layer_types import layer_type
from .nn.linear_like import as_linear
from .recovery._calibration import check_images, check_images_for
from .recovery.allocate import CRITERIA, allocate_ranks, check_t_choices
from .recovery.fit import FitReport
from .recovery.recover import RecoveryReport, check_recovery_options, recover

__all__ = ["LayerReport", "LayerNote", "CompressionReport", "compress", "decompress", "eligible_layers",
           "layer_eligibility", "model_report"]

INIT_MODES = ("decompose", "random")


@dataclass(frozen=True)
class LayerReport:
    """One Conv/Linear layer of a model, factorized or kept dense."""

    name: str
    kind: str
    format: str
    rank: tuple[int, ...] | None
    t: int | tuple[int, ...] | None
    dense_params: int
    params: int
    dense_macs: int | None
    macs: int | None

    @property
    def compression(self) -> float:
        """This layer's compression factor, ``dense_params / params``."""
        return self.dense_params / self.params


@dataclass(frozen=True)
class LayerNote:
    """A layer that ``compress`` left as it was, or compressed with a setting other than the one
    asked for, and why."""

    name: str
    kind: str
    reason: str


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer and whole-model parameters, compression and forward multiply-adds.

    ``dense_params`` and ``params`` count every parameter of the model (BatchNorm, kept layers and
    biases included), so ``compression`` is the whole-model factor. MACs count the Conv and Linear
    layers for one input of ``input_shape`` (batch 1), or are None without an input shape.

    Attributes
    ----------
    layers : tuple of LayerReport
        One row per Conv/Linear-like layer, factorized or kept dense, in module order.
    dense_params, params : int
        Parameters of the uncompressed and of the compressed model.
    input_shape : tuple of int or None
        The input the MACs were counted for (batch 1), or None.
    allocation : str or None
        How a ``compression`` target was shared among the layers (``compress(allocation=...)``:
        ``'uniform'``, ``'weight'`` or ``'activation'``); None when the ranks were given.
    fit : FitReport or None
        The data-aware fit's per-layer errors, once :meth:`with_recovery` added them.
    bn_recalibrated : bool or str
        Whether the BatchNorm statistics were re-estimated (``'keep_function'``: and its weights
        rescaled to keep the function).
    kept_tied : tuple of str
        Layers kept dense because their weight is tied to another module's.
    skipped, adjusted : tuple of LayerNote
        Layers left dense, and layers compressed with another setting than asked for, with why.

    Examples
    --------
    >>> small, report = stpnet.compress(model, "stt", compression=9)     # doctest: +SKIP
    >>> report.compression, report.ranks                                  # doctest: +SKIP
    >>> print(report.to_markdown())                                       # doctest: +SKIP
    """

    layers: tuple[LayerReport, ...]
    dense_params: int
    params: int
    input_shape: tuple[int, ...] | None
    allocation: str | None = None
    fit: "FitReport | None" = None
    bn_recalibrated: bool | str = False
    kept_tied: tuple[str, ...] = ()
    skipped: tuple[LayerNote, ...] = ()
    adjusted: tuple[LayerNote, ...] = ()

    @property
    def compression(self) -> float:
        """The whole-model compression factor, ``dense_params / params``."""
        return self.dense_params / self.params

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Ranks of the factorized layers by name (pass to ``compress(rank=...)`` to rebuild)."""
        return {r.name: r.rank for r in self.layers if r.rank is not None}

    @property
    def t(self) -> dict[str, int]:
        """Each factorized layer's STP factor by name (a Tucker-2 layer's per-mode t as the channel
        modes' t); pass to ``compress(rank=report.ranks, t=report.t)`` to rebuild."""
        return {r.name: max(r.t) if isinstance(r.t, tuple) else r.t for r in self.layers if r.rank is not None}

    @property
    def dense_macs(self) -> int | None:
        """Multiply-adds of the uncompressed Conv/Linear layers for one input; None without an input shape."""
        values = [r.dense_macs for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def macs(self) -> int | None:
        """Multiply-adds of the model's Conv/Linear layers as they are; None without an input shape."""
        values = [r.macs for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    def to_dict(self) -> dict[str, object]:
        """The report as plain JSON values (layers with their compression, totals, notes)."""
        return {"layers": [asdict(r) | {"compression": r.compression} for r in self.layers],
                "dense_params": self.dense_params, "params": self.params, "compression": self.compression,
                "dense_macs": self.dense_macs, "macs": self.macs,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "allocation": self.allocation, "fit": self.fit.to_dict() if self.fit is not None else None,
                "bn_recalibrated": self.bn_recalibrated, "kept_tied": list(self.kept_tied),
                "skipped": [asdict(n) for n in self.skipped], "adjusted": [asdict(n) for n in self.adjusted]}

    def with_recovery(self, recovery: RecoveryReport) -> "CompressionReport":
        """This report with what :func:`stpnet.recover` did (its fit errors and the BatchNorm step)."""
        return dataclasses.replace(self, fit=recovery.fit, bn_recalibrated=recovery.bn_recalibrated)

    def to_markdown(self) -> str:
        """A table: one row per Conv/Linear layer, then the whole-model totals."""
        def macs(v):
            return "-" if v is None else f"{v / 1e6:.2f}M"
        fits = {f.name: f for f in self.fit.layers} if self.fit is not None else {}
        fit_cols = " fit error (before -> after) |" if fits else ""
        lines = ["| layer | type | format | rank | t | params | dense params | compression | MACs | dense MACs |"
                 + fit_cols, "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fits else "")]
        for r in self.layers:
            rank = "-" if r.rank is None else ",".join(map(str, r.rank))
            row = (f"| {r.name} | {r.kind} | {r.format} | {rank} | {r.t if r.t is not None else '-'} | "
                   f"{r.params:,} | {r.dense_params:,} | {r.compression:.2f}x | {macs(r.macs)} | "
                   f"{macs(r.dense_macs)} |")
            if fits:
                f = fits.get(r.name)
                row += f" {f.error_before:.3f} -> {f.error_after:.3f} |" if f else " - |"
            lines.append(row)
        lines.append(f"| **model** | | | | | **{self.params:,}** | **{self.dense_params:,}** | "
                     f"**{self.compression:.2f}x** | {macs(self.macs)} | {macs(self.dense_macs)} |"
                     + (" |" if fits else ""))
        notes = []
        if self.allocation:
            notes.append(f"rank allocation: {self.allocation}")
        if self.fit is not None:
            notes.append(f"fitted to the dense activations on {self.fit.images} calibration inputs")
            layer_names = {r.name for r in self.layers}
            blocks = [f for f in self.fit.layers if f.name not in layer_names]
            if blocks:
                notes.append("block fit errors (before -> after): " + ", ".join(
                    f"{f.name} {f.error_before:.3f} -> {f.error_after:.3f}" for f in blocks))
        if self.bn_recalibrated == "keep_function":
            notes.append("BatchNorm statistics re-estimated, its weights rescaled to keep the function")
        elif self.bn_recalibrated:
            notes.append("BatchNorm statistics re-estimated")
        if self.kept_tied:
            notes.append(f"kept dense because their weights are tied to another module: {', '.join(self.kept_tied)}")
        if notes:
            lines.append("\n" + "; ".join(notes))
        for title, entries in (("Compressed with another setting", self.adjusted), ("Not compressed", self.skipped)):
            if entries:
                lines.append(f"\n{title}:")
                lines.extend(f"- {n.name} ({n.kind}): {n.reason}" for n in entries)
        return "\n".join(lines)


def model_report(model: nn.Module, input_shape: Sequence[int] | None = None,
                 dense_params: int | None = None) -> CompressionReport:
    """Report every Conv/Linear layer of ``model`` (factorized or dense) and the totals.

    Parameters
    ----------
    model : nn.Module
        Any model, compressed by :func:`stpnet.compress` or not.
    input_shape : sequence of int, optional
        One input's shape with its batch dimension (e.g. ``(1, 3, 32, 32)``): counts each layer's
        forward multiply-adds. Without it the MACs are None.
    dense_params : int, optional
        The parameter count of the uncompressed model; by default each factorized layer counts as
        the dense layer it replaces.

    Returns
    -------
    CompressionReport
        One row per Conv/Linear-like layer and the whole-model totals.
    """
    shapes = layer_input_shapes(model, input_shape)
    rows = []
    for name, m in model.named_modules():
        shape = shapes.get(name)
        if isinstance(m, FactorizedLayer):
            kind = type(m).__name__.replace("Factorized", "")
            rows.append(LayerReport(name, kind, m.format, m.rank, m.t, m.dense_params, m.num_params,
                                    None if shape is None else m.dense_macs(shape),
                                    None if shape is None else m.macs(shape)))
        elif (layer_kind := layer_type(m, keep_forward=False)) is not None and layer_kind.counterpart is not None:
            n = sum(p.numel() for p in m.parameters())
            macs = None if shape is None else layer_kind.dense_macs(m, shape)
            rows.append(LayerReport(name, type(m).__name__, "dense", None, None, n, n, macs, macs))
    params = sum(p.numel() for p in model.parameters())
    if dense_params is None:
        dense_params = params + sum(r.dense_params - r.params for r in rows)
    return CompressionReport(tuple(rows), dense_params, params,
                             None if input_shape is None else tuple(input_shape))


def _plan_ranks(layers: dict[str, nn.Module], format: str, t, layout, n_modes, factor: float, clip: bool):
    """Ranks for every layer at a per-layer weight compression ``factor``; and their param counts."""
    plan, total, seen = {}, 0, {}
    for name, m in layers.items():
        c_in, c_out, kernel = dense_geometry(m)
        bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
        lt = t[name] if isinstance(t, Mapping) else t
        key = (type(m), c_in, c_out, kernel, lt)
        if key in seen:  # layers of the same shape get the same ranks
            plan[name], count = seen[key]
            total += count + bias
            continue
        cls, tt, tz = layer_tensorization(format, lt, layout, c_in, c_out, kernel, None, None, n_modes)
        shape = tz.tensor_shape
        ts = tensor_t(tz, tt)
        try:
            ranks = ranks_for_compression(cls, tz, ts, factor, clip)
        except ValueError:  # below the smallest ranks: use them
            ranks = cls.validate_rank(shape, uniform_rank(tz, tt), ts, clip=clip)
        plan[name] = ranks
        seen[key] = (ranks, cls.param_count(shape, ranks, ts))
        total += seen[key][1] + bias
    return plan, total


def compress(
    model: nn.Module,
    format: str = "stt",
    *,
    rank: int | Mapping[str, int | Sequence[int]] | None = None,
    compression: float | None = None,
    t: int | Mapping[str, int] | None = None,
    layout: str | None = None,
    init: str = "decompose",
    n_iter: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
    n_modes: int = 3,
    forward_path: str = "auto",
    input_shape: Sequence[int] | None = None,
    inplace: bool = False,
    allocation: str = "uniform",
    t_choices: Sequence[int] | None = None,
    calibration: torch.Tensor | None = None,
    fit_steps: int | None = None,
    fit_unit: str | None = None,
    recalibrate_bn: bool | str | None = None,
    attention: str = "packed",
) -> tuple[nn.Module, CompressionReport]:
    """Replace the eligible Conv/Linear/Embedding layers of ``model`` with factorized layers.

    This is the structure of the compressed network (which layers, format, ranks and t, their
    allocation); recovering the accuracy it lost on calibration inputs is the next step,
    :func:`stpnet.recover`.

    Parameters
    ----------
    model : nn.Module
        Any model; its Conv1d/2d/3d (groups = 1), Linear (and subclasses keeping its forward) and
        Embedding layers are candidates, and the projections of every ``nn.MultiheadAttention``
        (rewritten as :class:`stpnet.nn.UnpackedMultiheadAttention`, the same function).
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str'}
    rank : int or mapping, optional
        One rank for every replaced layer, or a mapping from layer name to its ranks (then exactly
        those layers are replaced; :attr:`CompressionReport.ranks` gives such a mapping, so a
        compressed architecture can be rebuilt).
    compression : float, optional
        Target compression factor of the **whole model** (all its parameters, BatchNorm and the
        layers kept dense included). Every replaced layer gets the same weight compression,
        chosen by bisection so the model's factor is as close to the target as the ranks allow.
    t : int or mapping, optional
        STP factor (default 1 classic, 2 semi-tensor); with ``rank`` a mapping, also a mapping from
        the same layer names to each layer's t (as :attr:`CompressionReport.t` gives it, to rebuild
        a network whose t was chosen per layer by ``t_choices``).
    layout : str, optional
        Tensorization layout (see :class:`stpnet.nn.FactorizedConv2d`).
    init : {'decompose', 'random'}
        'decompose' fits each layer to the trained weights (:func:`stpnet.decompose`); 'random'
        starts fresh with the variance-preserving initialisation.
    n_iter : int
        Refinement sweeps for 'decompose' (HOOI / ALS).
    include, exclude : sequence of str, optional
        fnmatch patterns on module names; see :func:`eligible_layers`.
    keep_first_conv, keep_classifier : bool, default True
        Keep the first convolution and the last Linear dense.
    input_shape : sequence of int, optional
        One input's shape (batch 1) for the FLOPs columns of the report.
    inplace : bool, default False
        Modify ``model`` itself rather than a deep copy. A compression that raises leaves it as
        it was.
    allocation : {'uniform', 'weight', 'activation'}
        How ``compression`` is shared among the layers. ``'uniform'``: every layer gets the same
        weight compression. ``'weight'`` / ``'activation'``: per-layer ranks that minimise the
        largest normalised weight / output error (:func:`stpnet.recovery.allocate_ranks`;
        ``'activation'`` needs ``calibration``). Needs ``init='decompose'``.
    t_choices : sequence of int, optional
        With a semi-tensor format and ``allocation='weight'`` or ``'activation'``: the STP factors
        a layer may take (e.g. ``(1, 2, 4)``), chosen per layer in the same search as its ranks
        (``t_choices`` of :func:`stpnet.recovery.allocate_ranks`); the report lists each layer's
        t. Not with ``t``.
    calibration : torch.Tensor, optional
        A few hundred preprocessed training inputs (no augmentation), for
        ``allocation='activation'``.
    attention : {'packed', 'separate'}
        How an attention's query/key/value projection is factorized: one (3E x E) matrix, run once
        in self-attention (``'in_proj'``), or three (E x E) matrices (``'q_proj'``, ``'k_proj'``,
        ``'v_proj'``).
    fit_steps, fit_unit, recalibrate_bn
        Deprecated: the recovery is its own step, :func:`stpnet.recover` (whose arguments of
        these names they are). Given here they still run it on ``calibration`` after the
        compression, with a DeprecationWarning, until the next release.

    Returns
    -------
    (nn.Module, CompressionReport)
        The report records each layer's format, ranks and t, the allocation, and the layers
        left as they were and why.

    Raises
    ------
    ValueError
        For an unknown format, init or allocation, no eligible layer, not exactly one of
        rank/compression, or a data-aware step without ``calibration``.

    Examples
    --------
    >>> import stpnet, torch
    >>> from stpnet.models import build_model
    >>> dense = build_model("resnet20").eval()
    >>> small, report = stpnet.compress(dense, "stt", compression=9, t=2)
    >>> calibration = torch.randn(8, 3, 32, 32)
    >>> recovery = stpnet.recover(small, dense, calibration, fit_steps=2)
    >>> report = report.with_recovery(recovery)
    """
    deprecated = {name: value for name, value in (("fit_steps", fit_steps), ("fit_unit", fit_unit),
                                                   ("recalibrate_bn", recalibrate_bn)) if value is not None}
    if deprecated:
        warnings.warn(f"compress({', '.join(f'{k}=...' for k in deprecated)}) is deprecated and will be removed in the "
                      "next release: compress builds the structure, and stpnet.recover(compressed, dense, calibration, "
                      f"{', '.join(f'{k}=...' for k in deprecated)}) recovers the accuracy", DeprecationWarning,
                      stacklevel=2)
    fit_steps = 0 if fit_steps is None else fit_steps
    fit_unit = "block" if fit_unit is None else fit_unit
    recalibrate_bn = False if recalibrate_bn is None else recalibrate_bn
    if (rank is None) == (compression is None):
        raise ValueError("give exactly one of rank=... or compression=...")
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    if compression is not None and not compression > 1:
        raise ValueError(f"compression is a factor and must be > 1, got {compression}")
    if allocation not in ("uniform", *CRITERIA):
        raise ValueError(f"allocation must be one of {('uniform', *CRITERIA)}, got {allocation!r}")
    if allocation != "uniform" and (compression is None or init != "decompose"):
        raise ValueError(f"allocation={allocation!r} shares a compression target among trained layers; it needs "
                         "compression=... and init='decompose'")
    if t_choices is not None and (allocation == "uniform" or t is not None):
        raise ValueError("t_choices chooses each layer's t in the rank allocation: it needs allocation='weight' or "
                         "'activation' (with compression=...), and no t=")
    if attention not in ("packed", "separate"):
        raise ValueError(f"attention must be 'packed' or 'separate', got {attention!r}")
    check_recovery_options(fit_steps, fit_unit, recalibrate_bn)
    needs_data = [what for what, on in (("fit_steps > 0", fit_steps > 0), ("recalibrate_bn", recalibrate_bn),
                                        ("allocation='activation'", allocation == "activation")) if on]
    if needs_data and calibration is None:
        raise ValueError(f"{' and '.join(needs_data)} need calibration inputs (calibration=a few hundred "
                         "preprocessed training images)")
    if needs_data:
        check_images(calibration, "calibration")
        check_images_for(model, calibration, "calibration")
    format_cls, semi = format_class(format)
    if t_choices is not None:
        t_choices = check_t_choices(format, t_choices)
    per_layer_t = dict(t) if isinstance(t, Mapping) else None
    if per_layer_t is not None:
        if not isinstance(rank, Mapping) or set(per_layer_t) != set(rank):
            raise ValueError("t as a mapping gives each layer's t: it needs rank as a mapping of the same layer names "
                             f"(t names {sorted(per_layer_t)}, rank names "
                             f"{sorted(rank) if isinstance(rank, Mapping) else rank!r})")
        for name, value in per_layer_t.items():
            format_cls.t_for(semi, value)  # a clear error for a bad value
        t = None
    requested_t = format_cls.t_for(semi, t if t_choices is None else min(t_choices))
    dense_params = sum(p.numel() for p in model.parameters())
    reference = model
    if not inplace:
        model = copy.deepcopy(model)
    elif fit_steps > 0:
        reference = copy.deepcopy(model)  # the dense activations to fit to
    unpacked, refused = _unpack_attention(model, attention == "packed")
    linearized = _linearize(model)
    made: dict[int, nn.Module] = {}  # factorized layer -> the dense layer it replaced
    try:  # a rejected compression leaves an inplace model as it was
        if isinstance(rank, Mapping):
            names = list(rank)
            for name in names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"rank names layer {name!r}, which the model does not have") from None
                reason = why_not_factorizable(module)
                if reason is not None:
                    raise ValueError(f"layer {name!r} cannot be factorized: {reason}; only Conv1d/2d/3d with groups=1 "
                                     "and Linear (or subclasses keeping their forward) can")
            eligibility = {n: None if n in rank else "not named in rank=" for n, _ in candidate_layers(model)}
        else:
            eligibility = layer_eligibility(model, include, exclude, keep_first_conv, keep_classifier)
            names = [n for n, reason in eligibility.items() if reason is None]
        eligibility.update(refused)
        for name, original in unpacked.items():  # attention none of whose projections is replaced: as it was
            if not any(n.startswith(name + ".") for n in names):
                inner = [n for n in eligibility if n.startswith(name + ".")]
                why = sorted({eligibility.pop(c) or "tied" for c in inner})
                eligibility[name] = f"none of its projections is selected ({'; '.join(why)})"
                set_submodule(model, name, original)
        tied = tied_layers(model, names)
        if tied and isinstance(rank, Mapping):
            raise ValueError(f"layers {tied} share their weight with another module (tied parameters); factorizing "
                             "one would break the tie. Leave them out of rank=...")
        if tied:
            warnings.warn(f"layers {tied} share their weight with another module (tied parameters) and are kept dense; "
                          "the report lists them", stacklevel=2)
            names = [n for n in names if n not in tied]
        _restore_unselected(model, linearized, names)
        if not names:
            reasons = "; ".join(f"{n}: {'weight tied to another module' if n in tied else r}"
                                for n, r in list(eligibility.items())[:8])
            raise ValueError("no eligible layer: the model has no Conv/Linear with groups=1 outside the kept "
                             "first convolution and classifier (see include=/keep_first_conv=)"
                             + (f". Layers seen: {reasons}" if reasons else ". It holds no weight matrix or kernel"))
        layers = {n: model.get_submodule(n) for n in names}
        if init == "decompose":
            _check_weight_dtypes(layers)
        if per_layer_t is not None:
            layer_t, adjusted = _check_layer_t(layers, format, per_layer_t, layout, n_modes), []
        else:
            layer_t, adjusted = _settle_t(layers, format, requested_t, layout, n_modes)
        if adjusted:
            warnings.warn("; ".join(f"{note.name}: {note.reason}" for note in adjusted), stacklevel=2)
        skipped = [LayerNote(n, type(model.get_submodule(n)).__name__, "weight tied to another module" if n in tied
                             else reason) for n, reason in eligibility.items() if n not in layers]
        clip = init == "decompose"
        if compression is not None and allocation != "uniform":
            allocated = allocate_ranks(model, format, compression, t=layer_t, layout=layout, n_modes=n_modes,
                                       criterion=allocation, images=calibration, layers=names, t_choices=t_choices)
            plan = allocated.ranks
            if t_choices is not None:
                layer_t = allocated.t
        elif compression is not None:
            plan = _rank_plan_for_target(model, layers, dense_params, format, layer_t, layout, n_modes, compression,
                                         clip)
        elif isinstance(rank, Mapping):
            plan = {n: tuple(r) if isinstance(r, (list, tuple)) else r for n, r in rank.items()}
        else:
            plan = {n: rank for n in names}
        name_of = {id(m): n for n, m in layers.items()}

        def factorized(dense: nn.Module) -> FactorizedLayer:
            name = name_of[id(dense)]
            cls = layer_type(dense).factorized  # eligible: a layer type with a factorized layer
            if init == "decompose":
                layer = cls.from_dense(dense, format, rank=plan[name], t=layer_t[name], layout=layout, n_modes=n_modes,
                                       n_iter=n_iter, forward_path=forward_path)
            else:
                layer = _fresh_like(cls, dense, format, plan[name], layer_t[name], layout, n_modes, forward_path)
            made[id(layer)] = dense
            return _frozen_like(layer, dense)

        replace_modules(model, lambda m: id(m) in name_of, factorized)  # a shared module stays one shared module
    except BaseException:
        _undo(model, made, linearized, unpacked)
        raise
    report = dataclasses.replace(model_report(model, input_shape, dense_params),
                                 allocation=allocation if compression is not None else None, kept_tied=tuple(tied),
                                 skipped=tuple(skipped), adjusted=tuple(adjusted))
    if fit_steps > 0 or recalibrate_bn:  # the deprecated recovery arguments
        report = report.with_recovery(recover(model, reference, calibration, fit_steps=fit_steps, fit_unit=fit_unit,
                                              recalibrate_bn=recalibrate_bn))
    return model, report


def _unpack_attention(model: nn.Module, packed: bool = True) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by the equivalent
    :class:`stpnet.nn.UnpackedMultiheadAttention`, whose projections are Linear children.

    Returns the replaced modules by name, and the reasons for those left as they are."""
    unpacked, refused = {}, {}
    for name in attention_modules(model):
        module = model.get_submodule(name)
        try:
            new = layer_type(module).unpack(module, packed)
        except ValueError as error:
            refused[name] = str(error)
            continue
        set_submodule(model, name, new)
        unpacked[name] = module
    return unpacked, refused


def _linearize(model: nn.Module) -> dict[str, nn.Module]:
    """Replace (in place) every linear-like layer of ``model`` (a Linear storing its weight another
    way, such as HuggingFace's ``Conv1D``: :func:`stpnet.nn.linear_view`) whose parameters no other
    module holds by the ``nn.Linear`` computing the same function, so that every later step sees a
    Linear. Returns the replaced modules under each of their names."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    originals: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        kind = layer_type(module)
        if (name and kind is not None and kind.linearized and not isinstance(module, FactorizedLayer)
                and all(owners[id(p)] == 1 for p in module.parameters(recurse=False))):
            originals[name] = module
    selected = {id(m) for m in originals.values()}
    replace_modules(model, lambda m: id(m) in selected, as_linear)
    return originals


def _undo(model: nn.Module, made: Mapping[int, nn.Module], linearized: Mapping[str, nn.Module],
          unpacked: Mapping[str, nn.Module]) -> None:
    """Put back, in ``model``, the dense layers of the factorized ones ``made`` (by id), the
    linear-like layers :func:`_linearize` replaced and the attentions :func:`_unpack_attention`
    rewrote: the model as it was before :func:`compress` changed it."""
    replace_modules(model, lambda m: id(m) in made, lambda m: made[id(m)])
    for name, original in [*linearized.items(), *unpacked.items()]:
        set_submodule(model, name, original)


def _restore_unselected(model: nn.Module, originals: Mapping[str, nn.Module], names: Sequence[str]) -> None:
    """Put back the linear-like layers that :func:`_linearize` replaced and that are not among the
    layers to factorize ``names``, under every name they had."""
    chosen = {id(model.get_submodule(n)) for n in names}
    for name, original in originals.items():
        if id(model.get_submodule(name)) not in chosen:
            set_submodule(model, name, original)


def _settle_t(layers: Mapping[str, nn.Module], format: str, t: int, layout: str | None,
              n_modes: int) -> tuple[dict[str, int], list["LayerNote"]]:
    """Each layer's t: the requested one, or for a layer it does not fit (t must divide channel
    counts), the largest smaller t that does, down to 1 (the classic format)."""
    out, notes = {}, []
    for name, m in layers.items():
        c_in, c_out, kernel = dense_geometry(m)
        for candidate in range(t, 0, -1):
            try:
                layer_tensorization(format, candidate, layout, c_in, c_out, kernel, None, None, n_modes)
            except ValueError as error:
                if candidate == 1:
                    raise ValueError(f"layer {name!r}: {error}") from None
                if candidate == t:
                    first_error = error
                continue
            out[name] = candidate
            if candidate != t:
                notes.append(LayerNote(name, type(m).__name__, f"t={t} does not fit ({first_error}); uses t={candidate}"))
            break
    return out, notes


def _check_layer_t(layers: Mapping[str, nn.Module], format: str, t: Mapping[str, int], layout: str | None,
                   n_modes: int) -> dict[str, int]:
    """Each layer's given t, refused with the layer's name where it does not fit."""
    for name, m in layers.items():
        c_in, c_out, kernel = dense_geometry(m)
        try:
            layer_tensorization(format, t[name], layout, c_in, c_out, kernel, None, None, n_modes)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: t={t[name]}: {error}") from None
    return {name: t[name] for name in layers}


def decompress(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every factorized layer of ``model`` by the dense layer it computes (:func:`stpnet.nn.to_dense`).

    The inverse of :func:`compress` up to the approximation: the outputs stay the same (up to
    floating-point rounding), the parameter count returns to the dense one. For deployment where
    storage, not runtime memory, is the constraint: ship the compressed checkpoint, decompress
    once after loading, and run at dense speed.

    Parameters
    ----------
    model : nn.Module
    inplace : bool, default False
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    nn.Module
        The model with only dense layers.
    """
    if isinstance(model, FactorizedLayer):
        return to_dense(model)
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(model, lambda m: isinstance(m, FactorizedLayer), to_dense)


def _frozen_like(layer: FactorizedLayer, dense: nn.Module) -> FactorizedLayer:
    """``layer`` with its factors frozen where ``dense``'s weight was (``requires_grad=False``), and
    its bias where ``dense``'s bias was: a frozen layer's replacement stays frozen."""
    weight, bias = getattr(dense, "weight", None), getattr(dense, "bias", None)
    if isinstance(weight, torch.Tensor) and not weight.requires_grad:
        layer.weight_tensor.requires_grad_(False)
    if isinstance(bias, torch.Tensor) and not bias.requires_grad and getattr(layer, "bias", None) is not None:
        layer.bias.requires_grad_(False)
    return layer


def _check_weight_dtypes(layers: Mapping[str, nn.Module]) -> None:
    """The decompositions run in float32 or float64: refuse other weights with the remedy."""
    odd = {n: m.weight.dtype for n, m in layers.items() if isinstance(getattr(m, "weight", None), torch.Tensor)
           and m.weight.dtype not in (torch.float32, torch.float64)}
    if odd:
        dtypes = sorted({str(d).replace("torch.", "") for d in odd.values()})
        raise ValueError(f"compress decomposes float32 or float64 weights; {len(odd)} layer(s) hold "
                         f"{', '.join(dtypes)} ({', '.join(list(odd)[:3])}{', ...' if len(odd) > 3 else ''}): "
                         "compress model.float() and "
                         f"cast the result back afterwards (.to(torch.{dtypes[0]}))")


def _fresh_like(cls, dense: nn.Module, format, rank, t, layout, n_modes, forward_path) -> FactorizedLayer:
    return cls(*cls.dense_layer_args(dense), format=format, rank=rank, t=t, layout=layout, n_modes=n_modes,
               forward_path=forward_path, device=dense.weight.device, dtype=dense.weight.dtype)


def _rank_plan_for_target(model, layers, dense_params, format, t, layout, n_modes, target, clip):
    """Bisect the per-layer weight compression so the whole model meets ``target``."""
    replaced = sum(sum(p.numel() for p in m.parameters()) for m in layers.values())
    rest = dense_params - replaced

    def model_factor(f):
        plan, total = _plan_ranks(layers, format, t, layout, n_modes, f, clip)
        return plan, dense_params / (rest + total)

    if rest >= dense_params / target:
        raise ValueError(f"compression {target}x is unreachable: the layers kept dense and the other "
                         f"parameters already hold {rest:,} of {dense_params:,} parameters (at most "
                         f"{dense_params / rest:.1f}x)")
    lo, hi = 1.0, 2.0
    while model_factor(hi)[1] < target and hi < 1e7:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if model_factor(mid)[1] < target:
            lo = mid
        else:
            hi = mid
    (plan_lo, f_lo), (plan_hi, f_hi) = model_factor(lo), model_factor(hi)
    plan, achieved = (plan_hi, f_hi) if abs(f_hi - target) <= abs(f_lo - target) else (plan_lo, f_lo)
    if achieved > 1.1 * target:
        ts = sorted(set(t.values())) if isinstance(t, Mapping) else [t]
        warnings.warn(f"compression {target}x asked, {achieved:.1f}x given: with {format} (t={'/'.join(map(str, ts))}) "
                      "even the largest ranks the layers' tensorizations allow hold fewer parameters than the target "
                      "leaves; use a classic format or a smaller t for more parameters", stacklevel=3)
    return plan
