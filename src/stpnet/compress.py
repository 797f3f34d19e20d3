"""Whole-model compression: replace the eligible Conv and Linear layers of any ``nn.Module`` with
factorized ones, choose ranks for a target size, and report parameters and FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from .nn.base import FactorizedLayer, layer_tensorization, ranks_for_compression, tensor_t, uniform_rank
from .nn.convert import FACTORIZED_COUNTERPARTS, to_dense

if TYPE_CHECKING:
    from .recovery import FitReport

__all__ = ["LayerReport", "CompressionReport", "compress", "decompress", "eligible_layers", "model_report"]

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
        return self.dense_params / self.params


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer and whole-model parameters, compression and forward multiply-adds.

    ``dense_params`` and ``params`` count every parameter of the model (BatchNorm, kept layers and
    biases included), so ``compression`` is the whole-model factor. MACs count the Conv and Linear
    layers for one input of ``input_shape`` (batch 1), or are None without an input shape.
    """

    layers: tuple[LayerReport, ...]
    dense_params: int
    params: int
    input_shape: tuple[int, ...] | None
    allocation: str | None = None
    fit: "FitReport | None" = None
    bn_recalibrated: bool = False
    kept_tied: tuple[str, ...] = ()

    @property
    def compression(self) -> float:
        return self.dense_params / self.params

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Ranks of the factorized layers by name (pass to ``compress(rank=...)`` to rebuild)."""
        return {r.name: r.rank for r in self.layers if r.rank is not None}

    @property
    def dense_macs(self) -> int | None:
        values = [r.dense_macs for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def macs(self) -> int | None:
        values = [r.macs for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) | {"compression": r.compression} for r in self.layers],
                "dense_params": self.dense_params, "params": self.params, "compression": self.compression,
                "dense_macs": self.dense_macs, "macs": self.macs,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "allocation": self.allocation, "fit": self.fit.to_dict() if self.fit is not None else None,
                "bn_recalibrated": self.bn_recalibrated, "kept_tied": list(self.kept_tied)}

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
        if self.bn_recalibrated:
            notes.append("BatchNorm statistics re-estimated")
        if self.kept_tied:
            notes.append(f"kept dense because their weights are tied to another module: {', '.join(self.kept_tied)}")
        if notes:
            lines.append("\n" + "; ".join(notes))
        return "\n".join(lines)


def _is_factorizable(module: nn.Module) -> bool:
    return type(module) in FACTORIZED_COUNTERPARTS and getattr(module, "groups", 1) == 1


def eligible_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
) -> list[str]:
    """Names of the Conv/Linear layers ``compress`` would replace.

    By default the first convolution and the last Linear (the classifier) stay dense. ``include``
    and ``exclude`` are shell-style patterns on module names (``fnmatch``); a layer named by
    ``include`` is eligible even if it is the first conv or the classifier.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    convs = [n for n, m in named if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    protected = set()
    if keep_first_conv and convs:
        protected.add(convs[0])
    if keep_classifier and linears:
        protected.add(linears[-1])
    out = []
    for name, module in named:
        if not _is_factorizable(module):
            continue
        explicitly = include is not None and any(fnmatch.fnmatch(name, p) for p in include)
        if include is not None and not explicitly:
            continue
        if exclude is not None and any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        if name in protected and not explicitly:
            continue
        out.append(name)
    return out


def _layer_shapes(model: nn.Module, input_shape: Sequence[int] | None) -> dict[str, tuple[int, ...]]:
    """Input shape of every Conv/Linear layer for one forward pass on zeros of ``input_shape``."""
    if input_shape is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(name: str):
        def hook(module, args, output) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, FactorizedLayer)):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad():
            model(torch.zeros(*input_shape, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def _dense_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
    return shape[0] * module.out_channels * per_output * _conv_out(module, shape)


def _conv_out(module: nn.Module, shape: tuple[int, ...]) -> int:
    dims = len(module.kernel_size)
    if module.padding == "same":
        return math.prod(shape[2:])
    pad = (0,) * dims if module.padding == "valid" else module.padding
    size = 1
    for s, k, st, p, d in zip(shape[2:], module.kernel_size, module.stride, pad, module.dilation):
        size *= (s + 2 * p - d * (k - 1) - 1) // st + 1
    return size


def model_report(model: nn.Module, input_shape: Sequence[int] | None = None,
                 dense_params: int | None = None) -> CompressionReport:
    """Report every Conv/Linear layer of ``model`` (factorized or dense) and the totals.

    ``dense_params`` is the parameter count of the uncompressed model; by default it is computed
    by counting each factorized layer as the dense layer it replaces.
    """
    shapes = _layer_shapes(model, input_shape)
    rows = []
    for name, m in model.named_modules():
        shape = shapes.get(name)
        if isinstance(m, FactorizedLayer):
            kind = type(m).__name__.replace("Factorized", "")
            rows.append(LayerReport(name, kind, m.format_name, m.rank, m.t, m.dense_params, m.num_params,
                                    None if shape is None else m.dense_flops(shape),
                                    None if shape is None else m.flops(shape)))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            n = sum(p.numel() for p in m.parameters())
            macs = None if shape is None else _dense_macs(m, shape)
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
        kernel = tuple(getattr(m, "kernel_size", ()))
        c_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        c_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        bias = m.bias.numel() if m.bias is not None else 0
        key = (type(m), c_in, c_out, kernel)
        if key in seen:  # layers of the same shape get the same ranks
            plan[name], count = seen[key]
            total += count + bias
            continue
        cls, tt, tz = layer_tensorization(format, t, layout, c_in, c_out, kernel, None, None, n_modes)
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


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compress(
    model: nn.Module,
    format: str = "stt",
    *,
    rank: int | Mapping[str, int | Sequence[int]] | None = None,
    compression: float | None = None,
    t: int | None = None,
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
    calibration: torch.Tensor | None = None,
    fit_steps: int = 0,
    recalibrate_bn: bool = False,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the eligible Conv/Linear layers of ``model`` with factorized layers.

    Parameters
    ----------
    model : nn.Module
        Any model; its Conv1d/2d/3d (groups = 1) and Linear layers are candidates.
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str'}
    rank : int or mapping, optional
        One rank for every replaced layer, or a mapping from layer name to its ranks (then exactly
        those layers are replaced; :attr:`CompressionReport.ranks` gives such a mapping, so a
        compressed architecture can be rebuilt).
    compression : float, optional
        Target compression factor of the **whole model** (all its parameters, BatchNorm and the
        layers kept dense included). Every replaced layer gets the same weight compression,
        chosen by bisection so the model's factor is as close to the target as the ranks allow.
    t : int, optional
        STP factor (default 1 classic, 2 semi-tensor).
    layout : str, optional
        Tensorization layout (see :class:`stpnet.nn.FactorizedConv2d`).
    init : {'decompose', 'random'}
        'decompose' fits each layer to the trained weights (decompositions of MATH.md); 'random'
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
        Modify ``model`` itself rather than a deep copy.
    allocation : {'uniform', 'weight', 'activation'}
        How ``compression`` is shared among the layers. ``'uniform'``: every layer gets the same
        weight compression. ``'weight'`` / ``'activation'``: per-layer ranks that minimise the
        largest normalised weight / output error (:func:`stpnet.recovery.allocate_ranks`;
        ``'activation'`` needs ``calibration``). Needs ``init='decompose'``.
    calibration : torch.Tensor, optional
        A few hundred preprocessed training inputs (no augmentation) for the data-aware steps.
    fit_steps : int
        If > 0, refine every factorized layer for this many L-BFGS iterations to reproduce the
        dense network's activations on ``calibration``, layer by layer in execution order
        (:func:`stpnet.recovery.fit_to_activations`); 100 is a good value (about a minute for
        ResNet-20 on 512 images, 2 CPU cores).
    recalibrate_bn : bool
        Re-estimate BatchNorm running statistics on ``calibration`` at the end
        (:func:`stpnet.recovery.recalibrate_batchnorm`). It recovers much of a plain
        decomposition's loss; after fitting, which targets the dense network's statistics, it
        measured worse on ResNet-20 (BENCHMARKS.md), so combine the two only after checking.

    Returns
    -------
    (nn.Module, CompressionReport)
        The report records the allocation and, when fitted, each layer's output error before
        and after the fit.

    Raises
    ------
    ValueError
        For an unknown format, init or allocation, no eligible layer, not exactly one of
        rank/compression, or a data-aware step without ``calibration``.
    """
    from .recovery import allocate_ranks, fit_to_activations, recalibrate_batchnorm
    from .recovery.allocate import CRITERIA

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
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
        raise ValueError(f"fit_steps must be an int >= 0, got {fit_steps!r}")
    needs_data = [what for what, on in (("fit_steps > 0", fit_steps > 0), ("recalibrate_bn", recalibrate_bn),
                                        ("allocation='activation'", allocation == "activation")) if on]
    if needs_data and calibration is None:
        raise ValueError(f"{' and '.join(needs_data)} need calibration inputs (calibration=a few hundred "
                         "preprocessed training images)")
    dense_params = sum(p.numel() for p in model.parameters())
    reference = model
    if not inplace:
        model = copy.deepcopy(model)
    elif fit_steps > 0:
        reference = copy.deepcopy(model)  # the dense activations to fit to
    if isinstance(rank, Mapping):
        names = list(rank)
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"rank names layer {name!r}, which the model does not have") from None
            if not _is_factorizable(module):
                raise ValueError(f"layer {name!r} is a {type(module).__name__}; only Conv1d/2d/3d with groups=1 "
                                 "and Linear can be factorized")
    else:
        names = eligible_layers(model, include, exclude, keep_first_conv, keep_classifier)
    tied = _tied_layers(model, names)
    if tied and isinstance(rank, Mapping):
        raise ValueError(f"layers {tied} share their weight with another module (tied parameters); factorizing "
                         "one would break the tie. Leave them out of rank=...")
    if tied:
        warnings.warn(f"layers {tied} share their weight with another module (tied parameters) and are kept dense; "
                      "the report lists them", stacklevel=2)
        names = [n for n in names if n not in tied]
    if not names:
        raise ValueError("no eligible layer: the model has no Conv/Linear with groups=1 outside the kept "
                         "first convolution and classifier (see include=/keep_first_conv=)")
    layers = {n: model.get_submodule(n) for n in names}
    aliases: dict[int, list[str]] = {}
    for alias, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
    clip = init == "decompose"
    if compression is not None and allocation != "uniform":
        plan = allocate_ranks(model, format, compression, t=t, layout=layout, n_modes=n_modes, criterion=allocation,
                              images=calibration, layers=names).ranks
    elif compression is not None:
        plan = _rank_plan_for_target(model, layers, dense_params, format, t, layout, n_modes, compression, clip)
    elif isinstance(rank, Mapping):
        plan = {n: tuple(r) if isinstance(r, (list, tuple)) else r for n, r in rank.items()}
    else:
        plan = {n: rank for n in names}
    for name, dense in layers.items():
        cls = FACTORIZED_COUNTERPARTS[type(dense)]
        if init == "decompose":
            new = cls.from_dense(dense, format, rank=plan[name], t=t, layout=layout, n_modes=n_modes,
                                 n_iter=n_iter, forward_path=forward_path)
        else:
            new = _fresh_like(cls, dense, format, plan[name], t, layout, n_modes, forward_path)
        for alias in aliases[id(dense)]:  # a module used in several places stays one shared module
            _set_module(model, alias, new)
    fit = None
    if fit_steps > 0:
        fit = fit_to_activations(model, reference, calibration, steps=fit_steps)
    if recalibrate_bn:
        recalibrate_batchnorm(model, calibration)
    report = model_report(model, input_shape, dense_params)
    return model, dataclasses.replace(report, allocation=allocation if compression is not None else None, fit=fit,
                                      bn_recalibrated=recalibrate_bn, kept_tied=tuple(tied))


def _tied_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose weight Parameter another module also holds (for example a classifier
    tied to an embedding)."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    out = []
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, nn.Parameter) and len(owners.get(id(weight), ())) > 1:
            out.append(name)
    return out


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
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FactorizedLayer):
            aliases.setdefault(id(module), []).append(name)
    for names in aliases.values():
        dense = to_dense(model.get_submodule(names[0]))
        for name in names:  # a shared layer stays shared
            _set_module(model, name, dense)
    return model


def _fresh_like(cls, dense: nn.Module, format, rank, t, layout, n_modes, forward_path) -> FactorizedLayer:
    kw = dict(format=format, rank=rank, t=t, layout=layout, n_modes=n_modes, forward_path=forward_path,
              device=dense.weight.device, dtype=dense.weight.dtype)
    if isinstance(dense, nn.Linear):
        return cls(dense.in_features, dense.out_features, dense.bias is not None, **kw)
    return cls(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding,
               dense.dilation, 1, dense.bias is not None, dense.padding_mode, **kw)


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
    return plan_hi if abs(f_hi - target) <= abs(f_lo - target) else plan_lo
