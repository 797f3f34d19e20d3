"""Compile a native kernel's C source on first use and load it with :mod:`ctypes`.

The shared library is built once per source, compiler and CPU into a cache folder and reused by
later processes. Nothing here is required: where no C compiler is found, compilation fails, or
``STPNET_NATIVE=0`` is set, :func:`load_library` returns None and the callers keep to PyTorch ops.

Environment
-----------
``STPNET_NATIVE``
    ``0`` turns the native kernels off.
``STPNET_CACHE_DIR``
    where the built libraries go (default ``$XDG_CACHE_HOME/stpnet`` or ``~/.cache/stpnet``).
``CC``
    the C compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["load_library", "native_enabled", "cache_dir", "c_compiler"]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent

#: Tried in order: the first that compiles is used (OpenMP threads, then one thread).
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))


def native_enabled() -> bool:
    """False where ``STPNET_NATIVE`` is set to ``0`` (or ``false``/``no``/``off``)."""
    return os.environ.get("STPNET_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """The folder the built libraries go to (``STPNET_CACHE_DIR``, else the user cache)."""
    explicit = os.environ.get("STPNET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stpnet"


def c_compiler() -> str | None:
    """The C compiler the kernels are built with (``CC``, else ``cc``) if it is on the PATH, else None."""
    compiler = os.environ.get("CC") or "cc"
    return compiler if shutil.which(compiler) is not None else None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's model and flags (a
    library built for one CPU may use instructions another lacks, in a shared cache folder)."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor's block
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""


def _build(source: Path, target: Path, compiler: str) -> str | None:
    """Compile ``source`` into ``target`` with the first flag set that works; the error of the last
    attempt, or None on success. The library is written beside ``target`` and renamed into place,
    so concurrent builds never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = "no flag set tried"
    for flags in FLAG_SETS:
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [compiler, *flags, "-fPIC", "-shared", "-o", partial, str(source)]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            os.unlink(partial)
            return f"{' '.join(command)}: {exc}"
        if out.returncode == 0:
            os.replace(partial, target)
            return None
        os.unlink(partial)
        error = f"{' '.join(command)}: {out.stderr.strip()[-2000:]}"
    return error


@functools.lru_cache(maxsize=None)
def load_library(name: str) -> ctypes.CDLL | None:
    """The shared library built from ``stpnet/native/<name>.c``, compiled on the first call on this
    machine (a second or two) and cached; None (with a logged warning saying why) where native
    kernels are off or cannot be built. Each process loads it once."""
    if not native_enabled():
        logger.debug("native kernels are off (STPNET_NATIVE=%s)", os.environ.get("STPNET_NATIVE"))
        return None
    source = SOURCE_DIR / f"{name}.c"
    compiler = c_compiler()
    if compiler is None:
        logger.warning("no C compiler %r found: the native %s kernel is not available",
                       os.environ.get("CC") or "cc", name)
        return None
    key = hashlib.sha256("\0".join([source.read_text(), repr(FLAG_SETS), _compiler_version(compiler),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"{name}-{key}.so"
    if not target.exists():
        try:
            error = _build(source, target, compiler)
        except OSError as exc:  # the cache folder cannot be written
            error = str(exc)
        if error is not None:
            logger.warning("could not build the native %s kernel (using PyTorch ops instead): %s", name, error)
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        logger.warning("could not load the native %s kernel %s: %s", name, target, exc)
        return None
