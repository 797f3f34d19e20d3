"""Data-aware fitting: refine factorized layers to reproduce the dense network's activations.

A decomposition minimizes the weight error ``||W - W_hat||``, which weighs every input direction
alike; what matters is the output error on the inputs the layer really sees. Following the output
reconstruction of Zhang et al. (2015, "Accelerating very deep convolutional networks for
classification and detection"), each factorized layer is refined, in the order the network runs
them, so that on a calibration batch it maps the inputs that the *already fitted* compressed
layers before it produce to the outputs the *dense* network computes at that point. A layer can
therefore also correct the error that reaches it from the layers before, and errors do not
accumulate through depth.

``unit='block'`` fits a whole block at a time instead (a residual block with its shortcut, an
attention or MLP sub-block: a layer's nearest enclosing module that is not a mere container):
all factorized layers inside it together,
so that the block's output, after its BatchNorms, nonlinearities and shortcut, matches the dense
block's (block-wise reconstruction, as in BRECQ, Li et al. 2021, for quantization). The layers of
a block can then share out its error instead of each matching its own dense output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..nn.base import FactorizedLayer
from ..nn.convert import dense_counterpart, dense_geometry
from ..nn.layer_types import factorized_layer_type, layer_type
from ._calibration import check_images, check_images_for, forward_with_hooks, iterate_images, modes_restored

__all__ = ["LayerFit", "FitReport", "fit_to_activations", "activation_errors", "factorized_layer_order"]

TARGETS = ("network", "layer")
WEIGHTINGS = ("channel", "none")
UNITS = ("layer", "block")


@dataclass(frozen=True)
class LayerFit:
    """One layer's (or block's) relative output error ``||f(X) - Y|| / ||Y||`` on the calibration batch."""

    name: str
    error_before: float
    error_after: float
    steps: int


@dataclass(frozen=True)
class FitReport:
    """What :func:`fit_to_activations` did, layer by layer, in execution order."""

    layers: tuple[LayerFit, ...]
    target: str
    images: int
    unit: str = "layer"

    def to_dict(self) -> dict:
        return {"target": self.target, "images": self.images, "unit": self.unit,
                "layers": [{"name": f.name, "error_before": f.error_before, "error_after": f.error_after,
                            "steps": f.steps} for f in self.layers]}


class _Stop(Exception):
    """Raised from a forward hook to end a forward pass once the wanted activation is captured."""


class _NotOneInput(Exception):
    """The module was called with other than one positional tensor (no keywords): it cannot be
    refitted from a captured input alone."""


def factorized_layer_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of ``model``'s factorized layers in the order one forward pass calls them."""
    order: list[str] = []
    hooks = {m: (lambda mod, a, o, name=name: order.append(name) if name not in order else None)
             for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    forward_with_hooks(model, hooks, [example])
    return order


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, images: torch.Tensor, batch_size: int,
             what: str) -> torch.Tensor:
    """The input (``what='input'``) or output of ``module`` when ``model`` runs on ``images``;
    each forward pass stops as soon as it is captured."""
    parts: list[torch.Tensor] = []

    def hook(mod, args, kwargs, output):
        if what == "input" and (len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor)):
            raise _NotOneInput
        value = args[0] if what == "input" else output
        if not isinstance(value, torch.Tensor):
            raise _NotOneInput
        parts.append(value.detach())
        raise _Stop

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        for batch in iterate_images(images, batch_size, model):
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not parts:
        raise ValueError(f"{type(module).__name__} was not called by the model's forward pass")
    return torch.cat(parts)


def _channel_weights(Y: torch.Tensor, weighting: str, channel_dim: int) -> torch.Tensor | None:
    """Per-output-channel weights 1 / std (``weighting='channel'``), shaped to broadcast over ``Y``.

    A BatchNorm after the layer divides each channel by its standard deviation, so an error in a
    quiet channel matters as much as one in a loud channel; the unweighted error lets the loud ones
    dominate."""
    if weighting == "none":
        return None
    dim = channel_dim % Y.ndim
    dims = [d for d in range(Y.ndim) if d != dim]
    std = Y.double().std(dim=dims)
    std = torch.where(std > 1e-12 * (float(std.max()) or 1.0), std, torch.ones_like(std))
    shape = [1] * Y.ndim
    shape[dim] = -1
    return (1.0 / std).to(Y.dtype).view(shape)


def _relative_error(layer: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int,
                    weights: torch.Tensor | None) -> float:
    num = den = 0.0
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            y = Y[start:start + batch_size]
            d = layer(X[start:start + batch_size]) - y
            if weights is not None:
                d, y = d * weights, y * weights
            num += float(d.double().pow(2).sum())
            den += float(y.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _fit_layer(layer: nn.Module, X: torch.Tensor, Y: torch.Tensor, steps: int, batch_size: int,
               weights: torch.Tensor | None, fitted: list[FactorizedLayer] | None = None) -> int:
    """Minimize the squared output error over the factors and biases of the factorized layers in
    ``layer`` (itself one, or a block holding some) with L-BFGS (full batch, strong-Wolfe line
    search: no step size to tune, whatever the scale of the factors). The rest of a block (its
    BatchNorms, a dense shortcut) stays fixed and in eval mode. ``fitted``: only these layers."""
    if fitted is None:
        fitted = [m for m in layer.modules() if isinstance(m, FactorizedLayer)]
    params = [p for m in fitted for p in m.parameters() if p.requires_grad]
    if steps == 0 or not params:
        return 0
    w = weights if weights is not None else torch.ones((), dtype=Y.dtype)
    scale = float((Y * w).double().pow(2).sum()) or 1.0
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, X.shape[0], batch_size):
            loss = ((layer(X[start:start + batch_size]) - Y[start:start + batch_size]) * w).pow(2).sum() / scale
            loss.backward()
            total += float(loss.detach())
        for p in params:  # L-BFGS flattens gradients with view()
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        return torch.tensor(total)

    with modes_restored(layer):
        layer.eval()
        for m in fitted:
            m.train()  # the factors change: no cached eval-mode weights
        with torch.enable_grad():
            optimizer.step(closure)
    return int(optimizer.state[params[0]].get("n_iter", steps))


#: Modules that only hold others: their output is one child's (Sequential) or they have no
#: forward of their own, so a block is never one of them.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _block_of(layer: str, compressed: nn.Module, dense: nn.Module, factorized: set[str]) -> str | None:
    """The block whose output a factorized layer is fitted through: its nearest enclosing module
    that is not a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``), not
    factorized itself, not the whole model, and present in ``dense`` under the same name. A
    residual block's shortcut ``nn.Sequential(conv, bn)`` thus belongs to the block that adds it
    to the main path, with the block's other convolutions. None: no such module."""
    dense_names = {n for n, _ in dense.named_modules()}
    parts = layer.split(".")
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        if name in factorized or any(name.startswith(f + ".") for f in factorized):
            continue
        if isinstance(compressed.get_submodule(name), _CONTAINERS):
            continue
        return name if name in dense_names else None
    return None


def _units(compressed: nn.Module, dense: nn.Module, order: list[str], unit: str) -> list[tuple[str | None, list[str]]]:
    """``(block name or None, its factorized layers to fit)`` in execution order; ``None``: fit the
    layers one at a time (``unit='layer'``, or layers outside every block, see :func:`_block_of`)."""
    if unit == "layer":
        return [(None, order)]
    factorized = set(order)
    units: list[tuple[str | None, list[str]]] = []
    for name in order:
        block = _block_of(name, compressed, dense, factorized)
        if block is not None and units and units[-1][0] == block:
            units[-1][1].append(name)
        else:
            units.append((block, [name]))
    return units


def _fit_unit(compressed: nn.Module, dense: nn.Module, name: str, layer_names: list[str], images: torch.Tensor,
              steps: int, target: str, weighting: str, batch_size: int) -> LayerFit:
    """Fit the factorized layers ``layer_names`` so that module ``name`` (one of them, or the block
    holding them) reproduces the dense network's output of the same module."""
    module = compressed.get_submodule(name)
    try:
        reference = dense.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the dense model has no module {name!r}; pass the model that was compressed") from None
    if isinstance(reference, FactorizedLayer):
        raise ValueError(f"layer {name!r} of the dense model is factorized; pass the uncompressed model")
    layers = [compressed.get_submodule(n) for n in layer_names]
    X = _capture(compressed, module, images, batch_size, "input")
    with torch.no_grad():  # both networks are in eval mode here (fit_to_activations)
        if target == "network":
            Y = _capture(dense, reference, images, batch_size, "output")
        else:
            Y = torch.cat([reference(X[s:s + batch_size]) for s in range(0, X.shape[0], batch_size)])
    channel_dim = 1 if any(_channel_dim(m) == 1 for m in layers) and Y.ndim >= 3 else -1
    weights = _channel_weights(Y, weighting, channel_dim)
    before = _relative_error(module, X, Y, batch_size, weights)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    n = _fit_layer(module, X, Y, steps, batch_size, weights, layers)
    after = _relative_error(module, X, Y, batch_size, weights)
    if not after <= before:  # also catches NaN
        module.load_state_dict(saved)
        after = before
    return LayerFit(name, before, after, n)


def _channel_dim(layer: nn.Module) -> int:
    """The output channel axis of a factorized layer (:attr:`stpnet.nn.layer_types.LayerType.channel_dim`)."""
    kind = factorized_layer_type(layer)
    return kind.channel_dim if kind is not None else -1


def fit_to_activations(compressed: nn.Module, dense: nn.Module, images: torch.Tensor, *, steps: int = 30,
                       target: str = "network", weighting: str = "channel", batch_size: int = 128,
                       layers: list[str] | None = None, unit: str = "layer",
                       callback: Callable[[LayerFit], None] | None = None) -> FitReport:
    """Refine every factorized layer of ``compressed`` to reproduce ``dense``'s activations, in place.

    Layers are fitted one at a time in execution order. For layer ``L``, ``X`` is what reaches
    ``L`` in ``compressed`` (all layers before it already fitted) and the target ``Y`` is the output
    of the dense layer of the same name: in the dense network (``target='network'``, the default:
    the layer also absorbs the error that reaches it) or applied to ``X`` (``target='layer'``: the
    layer only imitates its dense counterpart). ``||L(X) - Y||^2`` is minimized over ``L``'s factors
    and bias by full-batch L-BFGS (strong-Wolfe line search) from the current factors (for example
    the decomposition), which works alike for all six formats and every layout. A fit never ends
    worse than it started: if it did (it cannot with the line search, barring rounding), the layer's
    factors are restored.

    Parameters
    ----------
    compressed : nn.Module
        The output of :func:`stpnet.compress` for ``dense`` (same module names).
    dense : nn.Module
        The trained dense network; not modified.
    images : torch.Tensor
        Calibration inputs, preprocessed as the networks take them (a few hundred training images
        without augmentation suffice).
    steps : int
        L-BFGS iterations per layer (0 only measures the errors).
    target : {'network', 'layer'}
    weighting : {'channel', 'none'}
        ``'channel'`` (default) divides each output channel's error by that channel's standard
        deviation in ``Y``: the error a BatchNorm after the layer would see. ``'none'``: plain
        squared error. The reported errors use the same weighting.
    batch_size : int
        Images per forward pass (memory), not an optimization setting.
    layers : list of str, optional
        Fit only these factorized layers (default all).
    unit : {'layer', 'block'}
        ``'layer'`` (default): each factorized layer matches its dense layer's output.
        ``'block'``: the factorized layers of each block (a layer's nearest enclosing module that
        is not an ``nn.Sequential``/``ModuleList``/``ModuleDict`` container nor the whole model:
        a residual block with its shortcut projection, an attention sub-block) are fitted together
        so that the block's output matches the dense block's; layers outside
        every block, and blocks called with more than one input, are fitted layer by layer. The
        report then has one entry per block.
    callback : callable, optional
        Called with each :class:`LayerFit` as it completes (progress).

    Returns
    -------
    FitReport
        Each layer's relative output error on ``images`` before and after its fit.

    Raises
    ------
    ValueError
        If ``images`` is not a floating batch, ``target`` or ``steps`` is invalid, ``compressed``
        has no factorized layer, or a factorized layer has no dense counterpart in ``dense``.
    """
    check_images(images)
    check_images_for(compressed, images)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    with modes_restored(compressed, dense):
        compressed.eval()
        dense.eval()
        example = next(iterate_images(images, 2, compressed))
        order = factorized_layer_order(compressed, example)
        if not order:
            raise ValueError("the compressed model has no factorized layer to fit")
        if layers is not None:
            unknown = sorted(set(layers) - set(order))
            if unknown:
                raise ValueError(f"layers {unknown} are not factorized layers of the model; valid: {order}")
            order = [n for n in order if n in set(layers)]
        _check_counterparts(compressed, dense, order)
        fits = []
        for unit_name, names in _units(compressed, dense, order, unit):
            if unit_name is not None:
                try:
                    fits.append(_fit_unit(compressed, dense, unit_name, names, images, steps, target, weighting,
                                          batch_size))
                    if callback is not None:
                        callback(fits[-1])
                    continue
                except _NotOneInput:  # a block taking several inputs: its layers one at a time
                    pass
            for name in names:
                fits.append(_fit_unit(compressed, dense, name, [name], images, steps, target, weighting, batch_size))
                if callback is not None:
                    callback(fits[-1])
    return FitReport(tuple(fits), target, int(images.shape[0]), unit)


def _check_counterparts(compressed: nn.Module, dense: nn.Module, names: list[str]) -> None:
    """Each factorized layer of ``names`` has, in ``dense`` under its name, a layer of the type it
    replaced with the same weight geometry: the layers are paired by name, and a module of another
    kind there (a ReLU, another network's layer) must not silently serve as the target."""
    dense_modules = dict(dense.named_modules())
    for name in names:
        layer = compressed.get_submodule(name)
        layer_kind = factorized_layer_type(layer)
        kind = layer_kind.counterpart if layer_kind is not None else None
        tz = layer.tensorization
        geometry = (tz.in_features, tz.out_features, tuple(tz.kernel_size))
        other = dense_modules.get(name)
        advice = ("fit_to_activations pairs the layers by name: give the dense network that compress() "
                  "started from")
        if other is None:
            parent = name.rpartition(".")[0]
            kind = layer_type(dense_modules[parent]) if parent in dense_modules else None
            if kind is not None and kind.role == "attention":
                raise ValueError(f"the factorized layer {name!r} is a projection of the attention {parent!r}, which "
                                 "compress() rewrote with Linear projections and the dense network still has as "
                                 f"{type(dense_modules[parent]).__name__}: stpnet.recover(compressed, dense, "
                                 "images, ...) pairs them (it rewrites a copy of the dense attention the same way)")
            raise ValueError(f"the dense network has no module {name!r} for the factorized layer of that name; "
                             f"{advice}")
        if isinstance(other, FactorizedLayer):
            raise ValueError(f"layer {name!r} of the dense network is factorized; pass the uncompressed model "
                             "(the one compress() started from)")
        counterpart = dense_counterpart(other)
        if counterpart is None or (kind is not None and counterpart is not kind):
            expected = kind.__name__ if kind is not None else "dense layer"
            raise ValueError(f"layer {name!r}: the factorized layer stands for a {expected}, but the dense "
                             f"network's {name!r} is a {type(other).__name__}; {advice}")
        if dense_geometry(other) != geometry:
            raise ValueError(f"layer {name!r}: the factorized layer has (inputs, outputs, kernel) {geometry}, the "
                             f"dense network's {type(other).__name__} {dense_geometry(other)}; {advice}")


@torch.no_grad()
def activation_errors(compressed: nn.Module, dense: nn.Module, images: torch.Tensor, *, target: str = "network",
                      weighting: str = "channel", batch_size: int = 128) -> dict[str, float]:
    """Each factorized layer's relative output error ``||L(X) - Y|| / ||Y||`` on ``images``, with
    ``X`` and ``Y`` as in :func:`fit_to_activations` (for example on held-out images)."""
    report = fit_to_activations(compressed, dense, images, steps=0, target=target, weighting=weighting,
                                batch_size=batch_size)
    return {f.name: f.error_before for f in report.layers}
