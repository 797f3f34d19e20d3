"""The cached native library is loaded only when its size and SHA-256 match the record made when it
was built: a truncated or overwritten file is rebuilt, or skipped with one warning; never loaded
(a truncated shared library can kill the process with SIGBUS)."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stpnet.deploy.native import build

needs_compiler = pytest.mark.skipif(not build.native_enabled() or build.c_compiler() is None,
                                    reason="no C compiler, or STPNET_NATIVE=0")


def _library_in(cache: Path) -> Path:
    (library,) = (cache / "native").glob("onepass-*.so")
    return library


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STPNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("STPNET_NATIVE", raising=False)
    monkeypatch.setattr(build, "FLAG_SETS", (("-O0",),))  # a quick build: what is checked is the file
    build.load_library.cache_clear()
    yield tmp_path / "cache"
    monkeypatch.undo()
    build.load_library.cache_clear()


@needs_compiler
def test_the_size_and_sha256_are_recorded_when_the_library_is_built(private_cache):
    assert build.load_library("onepass") is not None
    library = _library_in(private_cache)
    record = json.loads(build.record_path(library).read_text())
    import hashlib

    data = library.read_bytes()
    assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "flags": ["-O0"]}
    assert build.verify_library(library) is None
    leftovers = [p.name for p in (private_cache / "native").iterdir() if p not in (library, build.record_path(library))]
    assert leftovers == []  # the temporary names were renamed into place


def _replace_bytes(library: Path, data: bytes) -> None:
    """Put ``data`` at ``library``'s path as a new file. Never write into the file in place: this
    process may have it mapped (loaded), and changing a mapped library's pages under it kills the
    process with SIGBUS or SIGSEGV later, at exit at the latest."""
    partial = library.with_name(library.name + ".damaged")
    partial.write_bytes(data)
    os.replace(partial, library)


def _truncate(library: Path, size: int = 20_000) -> None:
    data = library.read_bytes()
    assert len(data) > size
    _replace_bytes(library, data[:size])


@needs_compiler
@pytest.mark.parametrize("damage", ["truncated", "overwritten", "no-record", "bad-record"])
def test_a_damaged_library_is_rebuilt_not_loaded(private_cache, monkeypatch, caplog, damage):
    assert build.load_library("onepass") is not None
    library = _library_in(private_cache)
    good = library.read_bytes()
    if damage == "truncated":
        _truncate(library)
    elif damage == "overwritten":
        _replace_bytes(library, bytes(len(good)))  # same size, other bytes
    elif damage == "no-record":
        build.record_path(library).unlink()
    else:
        build.record_path(library).write_text("{not json")
    assert build.verify_library(library) is not None
    loaded = []
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *a, **k: loaded.append(build.verify_library(Path(path)))
                        or real_cdll(path, *a, **k))
    build.load_library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="stpnet.deploy.native.build"):
        assert build.load_library("onepass") is not None
    assert loaded == [None]  # loaded once, after the rebuild, and verified
    assert build.verify_library(library) is None
    assert [r.levelname for r in caplog.records].count("WARNING") == 1 and "rebuilt" in caplog.text


@needs_compiler
def test_a_damaged_library_that_cannot_be_rebuilt_falls_back_with_one_warning(private_cache, monkeypatch, caplog):
    assert build.load_library("onepass") is not None
    library = _library_in(private_cache)
    _truncate(library)
    monkeypatch.setattr(build, "_build", lambda source, target, compiler: "cc: broken compiler")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("a library that failed its check was loaded"))
    build.load_library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="stpnet.deploy.native.build"):
        assert build.load_library("onepass") is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "broken compiler" in caplog.text and "was not loaded" in caplog.text and "20000 bytes" in caplog.text


@needs_compiler
@pytest.mark.slow
def test_a_truncated_cached_library_never_kills_the_process(tmp_path):
    """In a subprocess with a private cache: build, truncate the library to 20,000 bytes, then fuse
    a model with an example in a fresh process (which tries the 'onepass' form): it must finish."""
    env = {**os.environ, "STPNET_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("STPNET_NATIVE", None)
    script = textwrap.dedent("""
        import torch, stpnet
        from stpnet.deploy.native import build
        build.FLAG_SETS = (("-O0",),)  # a quick build: what is checked is the file
        from stpnet.nn import FactorizedConv2d
        from stpnet.deploy.native import onepass_available
        torch.manual_seed(0)
        model = torch.nn.Sequential(FactorizedConv2d(8, 8, 3, 1, 1, format="stt", rank=2, t=2)).eval()
        x = torch.randn(1, 8, 8, 8)
        fused = stpnet.fuse(model, example=x)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
        print("onepass", onepass_available())
    """)
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    library = _library_in(tmp_path / "cache")
    _truncate(library)
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, f"exit {second.returncode}: {second.stderr[-2000:]}"
    assert "onepass True" in second.stdout and "rebuilt" in second.stderr
    assert build.verify_library(library) is None


@needs_compiler
def test_loading_logs_once_which_flag_set_built_the_library(private_cache, caplog):
    with caplog.at_level(logging.INFO, logger="stpnet.deploy.native.build"):
        assert build.load_library("onepass") is not None  # built now
        assert build.load_library("onepass") is not None  # the same process: loaded once
        build.load_library.cache_clear()
        assert build.load_library("onepass") is not None  # another process would load the cached file
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("built with -O0: no OpenMP: one thread" in line for line in lines), lines
    assert all(r.levelname == "INFO" for r in caplog.records)
