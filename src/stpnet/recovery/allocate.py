"""Rank allocation: per-layer ranks that meet a whole-model parameter target with the least error.

Layers differ in how much a given compression costs them: a 16-channel convolution loses far more
of its weight at 9x than a 64-channel one, and a layer whose inputs span few directions loses
little output. The allocation measures, for every layer and every candidate rank, the normalised
approximation error of the decomposition at that rank, then spends the parameter budget either
to minimise the largest per-layer error (``objective='max'``, the default: raise the worst
layer, then the next) or the sum of the errors (``objective='sum'``: the convex-hull greedy for
a multiple-choice knapsack, most error removed per parameter). The per-layer error is either the
weight error ``||W - W_R||^2 / ||W||^2`` (``criterion='weight'``) or the output error on
calibration inputs ``x``, ``||(W - W_R) x||^2 / ||W x||^2`` (``criterion='activation'``), computed
from the inputs' Gram
matrix without storing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..decomposition import decompose
from ..discovery import eligible_layers
from ..formats import format_class
from ..nn.base import FactorizedLayer, layer_tensorization, tensor_t, uniform_rank
from ..nn.convert import dense_matrix
from ..nn.layer_types import layer_type
from ._calibration import check_images, check_images_for, forward_with_hooks, iterate_images

__all__ = ["RankAllocation", "allocate_ranks", "CRITERIA", "OBJECTIVES"]

CRITERIA = ("weight", "activation")
OBJECTIVES = ("max", "sum")


@dataclass(frozen=True)
class RankAllocation:
    """Chosen ranks (and STP factor t) per layer with their parameter counts and normalised errors."""

    ranks: dict[str, tuple[int, ...]]
    layer_params: dict[str, int]
    layer_errors: dict[str, float]
    params: int
    dense_params: int
    criterion: str
    t: dict[str, int] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """Whole-model compression factor of the allocation."""
        return self.dense_params / self.params


def _candidate_ranks(step: int, largest: int) -> list[int]:
    """Every multiple of ``step`` up to 32 steps, then about 5% apart, up to ``largest``."""
    out, R = [], step
    while R <= largest:
        out.append(R)
        R = R + step if R < 32 * step else max(R + step, int(math.ceil(R * 1.05 / step)) * step)
    return out


def allocate_ranks(model: nn.Module, format: str, compression: float, *, t: int | Mapping[str, int] | None = None,
                   layout: str | None = None, n_modes: int = 3, criterion: str = "weight",
                   objective: str = "max", images: torch.Tensor | None = None,
                   layers: Sequence[str] | None = None, batch_size: int = 128,
                   t_choices: Sequence[int] | None = None) -> RankAllocation:
    """Per-layer ranks for ``format`` that bring ``model`` to ``compression`` with the least total error.

    Parameters
    ----------
    model : nn.Module
        The trained dense model.
    format : {'tucker', 'sttu', 'tt', 'stt', 'tr', 'str'}
    compression : float
        Whole-model target factor (all parameters count, as in :func:`stpnet.compress`).
    t : int or mapping, optional
        As in :func:`stpnet.compress`, or per layer name (the value ``compress`` settles on for a layer
        that cannot take the requested t).
    layout, n_modes
        As in :func:`stpnet.compress`.
    criterion : {'weight', 'activation'}
        Normalised weight error, or output error on ``images`` (the dense model's inputs to each
        layer), per layer.
    objective : {'max', 'sum'}
        ``'max'`` (default) minimises the largest per-layer error, then spends what budget is left
        on the next-worst layers; ``'sum'`` minimises the sum of the errors (the greedy "most
        error removed per parameter" on each layer's convex hull). On ResNet-20 the sum starves the
        wide layers, whose errors fall slowly per parameter, and loses far more accuracy after
        fitting than 'max'.
    images : torch.Tensor, optional
        Preprocessed calibration inputs, needed for ``criterion='activation'``.
    layers : sequence of str, optional
        The layers to factorize (default: :func:`stpnet.discovery.eligible_layers`).
    t_choices : sequence of int, optional
        For a semi-tensor format, the STP factors each layer may take (e.g. ``(1, 2, 4)``; t = 1 is
        the classic format): every layer's candidates at every t that fits it enter the same search,
        so a layer gets the t whose ranks give the least error for their parameters. ``t`` is then
        ignored. Default: each layer's ``t`` only.

    Returns
    -------
    RankAllocation
        ``ranks`` and ``t`` can be passed to ``compress(rank=..., t=...)``; the whole-model count is
        within one candidate step of the target and never above the budget.

    Raises
    ------
    ValueError
        For an unknown criterion, missing or malformed images, or a target below what the smallest
        ranks reach (the message gives the largest reachable factor).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not (isinstance(compression, (int, float)) and compression > 1):
        raise ValueError(f"compression is a whole-model factor and must be > 1, got {compression!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if criterion == "activation":
        if images is None:
            raise ValueError("criterion='activation' needs calibration images (images=...)")
        check_images(images)
        check_images_for(model, images)
    if t_choices is not None:
        t_choices = check_t_choices(format, t_choices)
    if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
        raise ValueError(f"layers must be a sequence of module names, got {layers!r}")
    names = list(layers) if layers is not None else eligible_layers(model)
    known = dict(model.named_modules())
    unknown = [n for n in names if n not in known]
    if unknown:
        dense = [n for n, m in known.items() if n and _allocatable(m)]
        raise ValueError(f"layers names modules the model does not have: {unknown[:5]}; its Conv/Linear/Embedding "
                         f"layers: {dense[:8]}{' ...' if len(dense) > 8 else ''}")
    modules = {n: known[n] for n in names}
    for n, m in modules.items():
        if not _allocatable(m):
            raise ValueError(f"layer {n!r} is a {type(m).__name__}; allocation needs dense Conv/Linear/Embedding "
                             "layers")
    grams = _grams(model, modules, images, batch_size) if criterion == "activation" else {}
    dense_params = sum(p.numel() for p in model.parameters())
    rest = dense_params - sum(sum(p.numel() for p in m.parameters()) for m in modules.values())
    budget = dense_params / compression - rest
    options: dict[str, list[tuple[int, float, tuple[int, ...], int]]] = {}
    for name, layer in modules.items():
        choices = t_choices if t_choices is not None else [t.get(name) if isinstance(t, Mapping) else t]
        candidates = []
        for layer_t in choices:
            try:
                candidates += _layer_options(layer, format, layer_t, layout, n_modes, grams.get(name))
            except ValueError:  # this t does not fit the layer's channels
                if t_choices is None:
                    raise
        if not candidates:
            raise ValueError(f"layer {name!r}: none of t_choices={tuple(t_choices)} fits its channels")
        options[name] = _falling(candidates)
    smallest = sum(opts[0][0] for opts in options.values())
    if smallest > budget:
        raise ValueError(f"compression {compression}x is unreachable with {format}: the smallest ranks leave "
                         f"{rest + smallest:,} of {dense_params:,} parameters (at most "
                         f"{dense_params / (rest + smallest):.2f}x)")
    choice = _greedy(options, budget) if objective == "sum" else _raise_the_worst(options, budget)
    ranks = {n: options[n][i][2] for n, i in choice.items()}
    layer_params = {n: options[n][i][0] for n, i in choice.items()}
    errors = {n: options[n][i][1] for n, i in choice.items()}
    chosen_t = {n: options[n][i][3] for n, i in choice.items()}
    return RankAllocation(ranks, layer_params, errors, rest + sum(layer_params.values()), dense_params, criterion,
                          chosen_t)


def _allocatable(module: nn.Module) -> bool:
    """A dense layer of a type a factorized layer replaces (:mod:`stpnet.nn.layer_types`)."""
    kind = layer_type(module, keep_forward=False)
    return not isinstance(module, FactorizedLayer) and kind is not None and kind.counterpart is not None


def check_t_choices(format: str, t_choices: Sequence[int]) -> tuple[int, ...]:
    """``t_choices`` sorted and without repeats; ValueError unless they are positive ints for a
    semi-tensor ``format``."""
    cls, semi = format_class(format)
    values = tuple(t_choices)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"t_choices must be a non-empty sequence of positive ints, got {t_choices!r}")
    if not semi:
        raise ValueError(f"t_choices needs a semi-tensor format ({cls.semi_name!r}); {format!r} is classic (t = 1)")
    return tuple(sorted(set(values)))


@torch.no_grad()
def _grams(model: nn.Module, modules: dict[str, nn.Module], images: torch.Tensor, batch_size: int):
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, args, output):
            g = layer_type(mod, keep_forward=False).input_gram(mod, args[0])
            grams[name] = grams[name] + g if name in grams else g
        return record

    forward_with_hooks(model, {m: hook(n) for n, m in modules.items()}, iterate_images(images, batch_size, model))
    return grams


@torch.no_grad()
def _layer_options(layer: nn.Module, format: str, t, layout, n_modes, gram):
    """(params, normalised error, ranks, t) for every candidate rank."""
    W = dense_matrix(layer)
    c_out, c_in, *kernel = W.shape
    cls, tt, tz = layer_tensorization(format, t, layout, c_in, c_out, tuple(kernel), None, None, n_modes)
    ts = tensor_t(tz, tt)
    shape = tz.tensor_shape
    bias = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
    X = tz.weight_to_tensor(W.double())
    Wm = W.double().reshape(c_out, -1)
    norm = _weighted_norm(Wm, gram)
    step = math.lcm(*ts) if isinstance(ts, tuple) else ts
    seen, points = set(), []
    for R in _candidate_ranks(step, max(shape) ** 2):
        ranks = cls.validate_rank(shape, uniform_rank(tz, R), ts, clip=True)
        if ranks in seen:
            continue
        seen.add(ranks)
        params = cls.param_count(shape, ranks, ts) + bias
        points.append((params, ranks))
        if params >= Wm.numel() + bias:
            break
    name = cls.name_for_t(ts)
    options = []
    for params, ranks in sorted(points):
        if norm == 0:
            err = 0.0
        else:
            approx = tz.tensor_to_weight(decompose(X, name, rank=ranks, t=ts).to_tensor()).reshape(c_out, -1)
            D = Wm - approx
            err = _weighted_norm(D, gram) / norm
        options.append((params, max(err, 0.0), ranks, tt))
    return options


def _weighted_norm(M: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``sum over samples of ||M u||^2`` from the inputs' Gram matrix (a vector: a diagonal one,
    the token counts of an embedding), or ``||M||^2`` without one."""
    if gram is None:
        return float(M.pow(2).sum())
    if gram.ndim == 1:
        return float((M.pow(2) * gram).sum())
    return float((M @ gram * M).sum())


def _falling(options):
    """Options sorted by parameters, each with strictly less error than the one before."""
    out = []
    for o in sorted(options, key=lambda o: (o[0], o[1])):
        if not out or o[1] < out[-1][1]:
            out.append(o)
    return out


def _lower_hull(options):
    """Keep the options on the lower convex hull of (params, error), errors strictly falling."""
    pts = []
    for option in sorted(options, key=lambda o: (o[0], o[1])):
        p, e = option[:2]
        if pts and e >= pts[-1][1]:
            continue  # more parameters, no less error
        while len(pts) >= 2:
            (p1, e1), (p2, e2) = pts[-2][:2], pts[-1][:2]
            # drop the middle point if it lies above the segment from pts[-2] to the new point
            if (e2 - e1) * (p - p1) >= (e - e1) * (p2 - p1):
                pts.pop()
            else:
                break
        pts.append(option)
    return pts


def _raise_the_worst(options, budget: float) -> dict[str, int]:
    """Minimise the largest error: repeatedly upgrade the layer whose error is largest by one option,
    while it fits the budget; a layer that cannot grow further is set aside and the next worst is
    raised (so the budget left over is spent too)."""
    choice = {n: 0 for n in options}
    total = sum(opts[0][0] for opts in options.values())
    open_ = set(options)
    while open_:
        worst = max(open_, key=lambda n: (options[n][choice[n]][1], n))
        i = choice[worst]
        opts = options[worst]
        if i + 1 >= len(opts) or total + opts[i + 1][0] - opts[i][0] > budget:
            open_.discard(worst)
            continue
        total += opts[i + 1][0] - opts[i][0]
        choice[worst] = i + 1
    return choice


def _greedy(options, budget: float) -> dict[str, int]:
    """Minimise the sum of the errors: on each layer's convex hull, take the upgrade with the largest
    error drop per parameter while it fits the budget (optimal on the hulls up to the last step),
    then fill what is left with the options between hull points, the same way."""
    hulls = {n: _lower_hull(opts) for n, opts in options.items()}
    picked = _best_ratio(hulls, {n: 0 for n in options}, budget)
    start = {n: options[n].index(hulls[n][i]) for n, i in picked.items()}
    return _best_ratio(options, start, budget)


def _best_ratio(options, choice: dict[str, int], budget: float) -> dict[str, int]:
    choice = dict(choice)
    total = sum(options[n][i][0] for n, i in choice.items())
    while True:
        best, best_gain = None, 0.0
        for n, i in choice.items():
            opts = options[n]
            if i + 1 >= len(opts):
                continue
            dp = opts[i + 1][0] - opts[i][0]
            if total + dp > budget:
                continue
            gain = (opts[i][1] - opts[i + 1][1]) / dp
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return choice
        i = choice[best]
        total += options[best][i + 1][0] - options[best][i][0]
        choice[best] = i + 1
