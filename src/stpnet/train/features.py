"""Feature taps: the outputs of named modules, collected by forward hooks for block-wise distillation."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..deploy.fused import FusedLayer
from ..nn import FactorizedLayer

__all__ = ["FeatureTaps", "distillation_points", "modules_named"]


def distillation_points(student: nn.Module, teacher: nn.Module) -> tuple[str, ...]:
    """The default modules whose outputs a compressed student matches to its dense teacher's.

    The innermost modules of ``student`` that contain a factorized layer without being one or lying
    inside one, and that ``teacher`` has under the same name: the residual blocks of a ResNet, the
    attention and MLP sub-blocks of a transformer. The whole model (its logits) is left out; the
    logit distillation covers it.

    Parameters
    ----------
    student : nn.Module
        A network made by :func:`stpnet.compress` (or any network holding factorized layers).
    teacher : nn.Module
        The network it was compressed from.

    Returns
    -------
    tuple of str
        Module names, in the student's module order.

    Raises
    ------
    ValueError
        If the student holds no factorized layer inside a named sub-module that the teacher also has.
    """
    layer_names = [n for n, m in student.named_modules() if isinstance(m, (FactorizedLayer, FusedLayer))]
    teacher_names = {n for n, _ in teacher.named_modules()}

    def inside_layer(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in layer_names)

    def holds_layer(name: str) -> bool:
        return any(f.startswith(name + ".") for f in layer_names)

    candidates = [n for n, _ in student.named_modules() if n and not inside_layer(n) and holds_layer(n)]
    innermost = [n for n in candidates if not any(c.startswith(n + ".") for c in candidates)]
    points = tuple(n for n in innermost if n in teacher_names)
    if not points:
        raise ValueError("found no module that holds a factorized layer and exists under the same name in the "
                         f"teacher (factorized layers: {layer_names[:5] or 'none'}); name the points to match "
                         "(TrainConfig.distill_points)")
    return points


def modules_named(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The sub-modules of ``model`` with these names (as in ``model.named_modules()``).

    Raises
    ------
    ValueError
        If ``names`` is empty or a name is not a module of ``model``; the message lists valid names.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise ValueError(f"no module named {missing or 'any'} in the model; valid names include "
                         f"{[n for n in modules if n][:12]}")
    return [modules[n] for n in names]


class FeatureTaps:
    """Forward hooks on named modules of a model that keep each module's latest output.

    Parameters
    ----------
    model : nn.Module
    names : sequence of str
        Names as in ``model.named_modules()``. A module that returns a tuple (for example
        ``nn.MultiheadAttention``) is tapped at its first element.

    Examples
    --------
    >>> taps = FeatureTaps(model, ["layer1.0", "layer2.0"])       # doctest: +SKIP
    >>> logits = model(x); features = taps.collect()              # doctest: +SKIP
    >>> taps.remove()                                              # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = tuple(names)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(n))
                         for n, m in zip(self.names, modules_named(model, self.names))]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            self._outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return keep

    def collect(self) -> list[torch.Tensor]:
        """The tapped outputs of the latest forward pass, in ``names`` order; then forget them.

        Raises
        ------
        RuntimeError
            If a tapped module did not run in that pass.
        """
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"the modules {missing} did not run in the last forward pass")
        out = [self._outputs[n] for n in self.names]
        self._outputs.clear()
        return out

    def clear(self) -> None:
        """Forget the kept outputs (for example after an evaluation pass)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._outputs.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
