"""On-disk cache of decoded arrays, so that images are decoded once rather than on every load.

Cache files are ``.npz`` archives in :func:`cache_dir`, named by a hash of the source's absolute
path, size and modification time (for a directory: of every file under it), so editing or replacing
the source invalidates its entry. Files are written atomically; an unreadable one is ignored with a
warning and rewritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["cache_dir", "cache_key", "read_cache", "write_cache", "cached_arrays"]

# Bump when the layout of cached arrays changes, so that old entries are not read.
CACHE_FORMAT = 1

Arrays = Dict[str, np.ndarray]


def cache_dir() -> Path:
    """The cache directory: ``$STPNET_CACHE``, else ``$XDG_CACHE_HOME/stpnet``, else ``~/.cache/stpnet``.

    Read from the environment at each call; the directory is not created here.
    """
    explicit = os.environ.get("STPNET_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "stpnet"
    return Path.home() / ".cache" / "stpnet"


def cache_key(source: Union[str, Path], kind: str) -> str:
    """A key that changes whenever ``source`` changes.

    Parameters
    ----------
    source : str or Path
        A file, or a directory (every regular file under it is taken into account).
    kind : str
        What is cached from it (e.g. ``"cifar10"``); different kinds get different keys.

    Returns
    -------
    str
        ``"<kind>-<hash>"``, the hash covering the absolute path, sizes and mtimes.
    """
    path = Path(source).resolve()
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{kind}\0{path}\0".encode())
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root, name)
                st = full.stat()
                h.update(f"{full.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        st = path.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    return f"{kind}-{h.hexdigest()[:24]}"


def read_cache(path: Union[str, Path], keys: Optional[Sequence[str]] = None) -> Optional[Arrays]:
    """Read a cache file fully into memory.

    Returns ``None`` if the file does not exist, and also (with a ``RuntimeWarning``) if it is
    corrupt or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        missing = [k for k in keys or () if k not in arrays]
        if missing:
            raise KeyError(f"missing arrays {missing}")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        message = f"ignoring unreadable cache file {path} ({exc}); it will be rebuilt"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None
    return arrays


def write_cache(path: Union[str, Path], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, atomically (temp file + ``os.replace``).

    Creates the parent directory. Raises OSError if it cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cached_arrays(
    source: Union[str, Path],
    kind: str,
    build: Callable[[], Arrays],
    *,
    enabled: bool = True,
    keys: Optional[Sequence[str]] = None,
) -> Arrays:
    """``build()``'s arrays for ``source``, from the cache when a valid entry exists.

    Parameters
    ----------
    source : str or Path
        The file or directory the arrays are decoded from (its identity keys the entry).
    kind : str
        What is cached (part of the key and of the file name).
    build : callable
        Decodes the source; called only on a cache miss. Returns a dict of name -> array
        (arrays without object dtype).
    enabled : bool
        If False, just call ``build()``.
    keys : tuple of str, optional
        Names an entry must hold to be valid.

    Returns
    -------
    dict of str to numpy.ndarray

    Notes
    -----
    A cache that cannot be written (read-only directory, full disk) only raises a warning.
    """
    if not enabled:
        return build()
    path = cache_dir() / f"{cache_key(source, kind)}.npz"
    arrays = read_cache(path, keys)
    if arrays is not None:
        return arrays
    arrays = build()
    try:
        write_cache(path, arrays)
    except OSError as exc:
        message = f"could not write cache file {path} ({exc}); data will be decoded again next time"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return arrays
