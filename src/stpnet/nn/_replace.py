"""Replacing submodules of a model by name, keeping modules that appear under several names shared."""

from __future__ import annotations

from typing import Callable

from torch import nn


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_modules(model: nn.Module, select: Callable[[nn.Module], bool],
                    build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every submodule for which ``select`` is true by ``build(module)``; a
    module reachable under several names is built once and stays one shared module."""
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and select(module):
            aliases.setdefault(id(module), []).append(name)
    for names in aliases.values():
        new = build(model.get_submodule(names[0]))
        for name in names:
            set_submodule(model, name, new)
    return model
