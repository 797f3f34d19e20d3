"""Modules that moved keep their old import path for one release: importing it warns and gives the
very module object of the new path, so monkeypatching through either path is seen by both."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import stpnet

MOVED = {
    "stpnet.nn.fused": "stpnet.deploy.fused",
    "stpnet.nn.fold": "stpnet.deploy.fold",
    "stpnet.export": "stpnet.deploy.export",
    "stpnet.native": "stpnet.deploy.native",
    "stpnet.native.build": "stpnet.deploy.native.build",
    "stpnet.native.onepass": "stpnet.deploy.native.onepass",
    "stpnet.cli": "stpnet.app.cli",
    "stpnet.demo": "stpnet.app.demo",
    "stpnet.pipeline": "stpnet.app.pipeline",
    "stpnet.plot": "stpnet.app.plot",
    "stpnet.progress": "stpnet.app.progress",
}


def _forget(name: str, monkeypatch) -> None:
    """Drop the old path (and its parent package's attribute) so that importing it runs it again."""
    parent, _, child = name.rpartition(".")
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, key)
    if parent in sys.modules:
        monkeypatch.delattr(sys.modules[parent], child, raising=False)


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_the_old_path_warns_and_is_the_new_module(old, new, monkeypatch):
    moved = importlib.import_module(new)
    package = "stpnet.native" if old.startswith("stpnet.native.") else old  # a submodule comes with its package
    _forget(package, monkeypatch)
    with pytest.warns(DeprecationWarning, match=f"{package} is deprecated.*import {MOVED[package]} instead"):
        aliased = importlib.import_module(old)
    assert aliased is moved
    assert sys.modules[old] is moved


def test_the_warning_names_the_importing_code(monkeypatch):
    _forget("stpnet.export", monkeypatch)
    with pytest.warns(DeprecationWarning) as record:
        import stpnet.export  # noqa: F401
    assert record[0].filename == __file__


def test_monkeypatching_through_the_old_path_is_seen_through_the_new(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import stpnet.nn.fused as old_fused
        from stpnet.native import build as old_build
    import stpnet.deploy.fused as fused
    from stpnet.deploy.native import build

    monkeypatch.setattr(old_fused, "onepass_available", lambda: "patched")
    assert fused.onepass_available() == "patched"
    monkeypatch.setattr(old_build, "native_enabled", lambda: "patched")
    assert build.native_enabled() == "patched"


def test_names_moved_out_of_stpnet_nn_still_resolve_with_a_warning():
    from stpnet.deploy.fold import fold_batchnorm
    from stpnet.deploy.fused import FusedLayer, fuse

    with pytest.warns(DeprecationWarning, match="stpnet.nn.FusedLayer is deprecated.*stpnet.deploy.fused"):
        assert stpnet.nn.FusedLayer is FusedLayer
    with pytest.warns(DeprecationWarning, match="stpnet.nn.fuse is deprecated"):
        assert stpnet.nn.fuse is fuse
    with pytest.warns(DeprecationWarning, match="stpnet.nn.fold_batchnorm is deprecated.*stpnet.deploy.fold"):
        assert stpnet.nn.fold_batchnorm is fold_batchnorm
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        stpnet.nn.not_a_name


def test_the_public_names_of_stpnet_are_unchanged():
    from stpnet.deploy.fold import fold_batchnorm
    from stpnet.deploy.fused import fuse

    assert stpnet.fuse is fuse and stpnet.fold_batchnorm is fold_batchnorm
    assert all(hasattr(stpnet, name) for name in stpnet.__all__)


def test_the_library_imports_no_old_path():
    """A fresh interpreter importing stpnet and every moved module by its new path sees no warning."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); import importlib, stpnet; "
            f"[importlib.import_module(m) for m in {sorted(set(MOVED.values()))!r}]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("module", ["stpnet.cli", "stpnet.app.cli"])
def test_python_m_runs_the_command_line(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: stpnet")
    assert ("python -m stpnet.cli is deprecated" in out.stderr) == (module == "stpnet.cli")
