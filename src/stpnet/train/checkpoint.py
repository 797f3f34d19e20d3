"""Atomic checkpoints: written to a temporary file and renamed, so a kill never leaves a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._atomic import new_file_mode

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model it is loaded into."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically (temp file in the same folder, fsync,
    rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, new_file_mode())  # the permissions of a plain new file, not mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, RuntimeError) and "writ" in str(exc).lower():  # torch's zip writer: disk full, I/O
            raise OSError(f"could not write checkpoint {path} ({str(exc).splitlines()[0]}); the previous "
                          "checkpoint is unchanged") from None
        if isinstance(exc, OSError):
            raise OSError(f"could not write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint "
                          "is unchanged") from None
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Only tensors and plain Python containers and scalars are unpickled (``weights_only=True``):
    a file holding any other object is refused before anything in it runs.

    Raises
    ------
    CheckpointError
        If the file is missing or is not a readable stpnet checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain containers only, so a crafted pickle cannot run code
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean an unreadable file
        text = str(exc)
        unsafe = next((line.strip() for line in text.splitlines() if "GLOBAL" in line.upper()), None)
        if unsafe is not None:
            raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than tensors and plain "
                                  f"data, which stpnet never writes, and loading them could run code; it may be "
                                  f"unsafe ({unsafe})") from None
        detail = type(exc).__name__
        if text and not text.startswith("Weights only load failed"):  # torch's long generic advice
            detail += f": {text.splitlines()[0]}"
        raise CheckpointError(f"checkpoint {path} is not readable ({detail})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an stpnet checkpoint (no 'model' entry)")
    return state
