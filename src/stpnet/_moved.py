"""Old import paths of modules that moved: each stays, for one release, the same module object as
its new home, and importing it raises a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

__all__ = ["alias_module"]


def alias_module(old: str, new: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Make the module ``old`` (called from its own body) the module ``new``, with a warning.

    ``sys.modules[old]`` becomes ``new`` itself (and ``old.<name>`` each of ``new``'s
    ``submodules``), so attributes set through either path are seen through both and no second
    copy is ever imported. The warning points at the code that imported ``old``.
    """
    warnings.warn(f"{old} is deprecated and will be removed in the next release; import {new} instead",
                  DeprecationWarning, stacklevel=3)  # warnings skips the import machinery's frames
    module = importlib.import_module(new)
    for name in submodules:
        sys.modules[f"{old}.{name}"] = importlib.import_module(f"{new}.{name}")
    sys.modules[old] = module
    return module

