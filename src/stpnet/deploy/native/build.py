"""Compile a native kernel's C source on first use and load it with :mod:`ctypes`.

The shared library is built once per source, compiler and CPU into a cache folder and reused by
later processes. It is compiled into a temporary name and renamed into place, and its size and
SHA-256 are recorded beside it (``<library>.sha256``, JSON) when it is built; both are checked
before every load. A cached file that does not match its record (truncated, overwritten, or built
by a version that kept no record) is never loaded: it is rebuilt, or where that fails the callers
fall back to PyTorch ops with one logged warning (loading a truncated library can kill the process
with SIGBUS). Nothing here is required: where no C compiler is found, compilation fails, or
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
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from ..._atomic import atomic_write_text

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


def record_path(library: Path) -> Path:
    """Where the size and SHA-256 of a built ``library`` are recorded."""
    return library.with_name(library.name + ".sha256")


def _digest(path: Path | str) -> dict:
    """``{'size': bytes, 'sha256': hex digest}`` of the file at ``path``."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _write_record(built: str, library: Path, flags: Sequence[str]) -> None:
    """Record the size and SHA-256 of the file ``built`` (about to be renamed to ``library``) and
    the compiler flags that built it beside ``library``, atomically."""
    record = {**_digest(built), "flags": list(flags)}
    atomic_write_text(record_path(library), json.dumps(record), "the native library's record")


def _flag_summary(library: Path) -> str:
    """The recorded flags of ``library`` and what they mean for threads."""
    try:
        flags = json.loads(record_path(library).read_text()).get("flags")
    except (OSError, ValueError, AttributeError):
        flags = None
    if not isinstance(flags, list):
        return "flags not recorded"
    threads = "OpenMP threads" if "-fopenmp" in flags else "no OpenMP: one thread"
    return f"{' '.join(flags)}: {threads}"


def verify_library(library: Path) -> str | None:
    """Why ``library`` must not be loaded (no record, unreadable, or its size or SHA-256 differs
    from the record made when it was built), or None where it matches."""
    try:
        record = json.loads(record_path(library).read_text())
    except (OSError, ValueError):
        return f"no readable record of its size and SHA-256 ({record_path(library).name})"
    try:
        actual = _digest(library)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not isinstance(record, dict) or record.get("size") != actual["size"]:
        return (f"it holds {actual['size']} bytes, the record made when it was built says "
                f"{record.get('size') if isinstance(record, dict) else '?'}")
    if record.get("sha256") != actual["sha256"]:
        return "its SHA-256 differs from the record made when it was built"
    return None


def _build(source: Path, target: Path, compiler: str) -> str | None:
    """Compile ``source`` into ``target`` with the first flag set that works; the error of the last
    attempt, or None on success. The library is written beside ``target``, its size and SHA-256
    recorded, and it is renamed into place, so concurrent builds never load a half-written file."""
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
            try:
                _write_record(partial, target, flags)
                os.replace(partial, target)
            except BaseException:
                if os.path.exists(partial):
                    os.unlink(partial)
                raise
            return None
        os.unlink(partial)
        error = f"{' '.join(command)}: {out.stderr.strip()[-2000:]}"
    return error


@functools.lru_cache(maxsize=None)
def load_library(name: str) -> ctypes.CDLL | None:
    """The shared library built from ``stpnet/deploy/native/<name>.c``, compiled on the first call on this
    machine (a second or two) and cached. Each process loads it once, and logs once at INFO level
    which flag set built it (with OpenMP threads or not). None where native kernels are off or
    no compiler is found (said once at INFO level, with the fallback), or where a build fails or a
    cached library fails its check (a warning saying why)."""
    fallback = "fused layers run their 'plain' form, PyTorch convolutions, instead"
    if not native_enabled():
        logger.info("native kernels are off (STPNET_NATIVE=%s): %s", os.environ.get("STPNET_NATIVE"), fallback)
        return None
    source = SOURCE_DIR / f"{name}.c"
    compiler = c_compiler()
    if compiler is None:
        logger.info("no C compiler %r found: the native %s kernel is not available; %s",
                    os.environ.get("CC") or "cc", name, fallback)
        return None
    key = hashlib.sha256("\0".join([source.read_text(), repr(FLAG_SETS), _compiler_version(compiler),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"{name}-{key}.so"
    stale = verify_library(target) if target.exists() else None
    if stale is not None or not target.exists():
        try:
            error = _build(source, target, compiler)
        except OSError as exc:  # the cache folder cannot be written
            error = str(exc)
        if error is None:
            error = verify_library(target)  # replaced meanwhile by another process's build, or damaged
            if error is not None:
                error = f"the library just built does not match its record: {error}"
        if error is not None:
            was = f" (the cached {target} was not loaded: {stale})" if stale is not None else ""
            logger.warning("could not build the native %s kernel (using PyTorch ops instead): %s%s", name, error,
                           was)
            return None
        if stale is not None:
            logger.warning("the cached native %s kernel %s did not match the size and SHA-256 recorded when it "
                           "was built (%s); it was rebuilt", name, target, stale)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:
        logger.warning("could not load the native %s kernel %s: %s", name, target, exc)
        return None
    logger.info("loaded the native %s kernel %s (built with %s)", name, target.name, _flag_summary(target))
    return library
