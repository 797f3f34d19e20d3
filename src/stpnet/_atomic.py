"""Atomic file writes: every file stpnet writes goes to a temporary name in the destination folder
and is renamed into place once complete, so an interrupted or failed write never leaves a torn file
and never replaces the previous one."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_text", "check_output_path", "new_file_mode"]


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a :class:`Path`, checked to be writable as a file: not a folder, and every
    existing folder on the way to it a folder (not a file). Folders that do not exist yet are
    allowed (:func:`atomic_path` creates them).

    Raises
    ------
    ValueError
        Saying which part of ``path`` is in the way.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"{what} {path} cannot be written: {ancestor} is a file, not a folder")
            break
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """A temporary path beside ``path`` (same folder, same suffix) to write to. When the block ends
    without an error the file is flushed to disk and renamed to ``path``; on an error it is removed
    and ``path`` is left as it was. Missing folders on the way are created.

    Raises
    ------
    ValueError
        If ``path`` cannot be a file (:func:`check_output_path`).
    OSError
        If the folder cannot be written, with a message naming ``path``.
    """
    path = check_output_path(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would make every written file private
    except OSError as exc:
        raise OSError(f"{what} {path} cannot be written ({exc.strerror or exc})") from None
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_file_mode() -> int:
    """The permission bits a plain new file gets here: 0o666 less the process's file-creation
    mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "output") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text)
    return Path(path)
