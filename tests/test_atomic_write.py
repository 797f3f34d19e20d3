"""Atomic writes keep the usual permissions of a new file and leave nothing behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from stpnet._atomic import atomic_path, atomic_write_text


def test_an_atomically_written_file_has_the_permissions_of_a_plain_new_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "sub" / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("export failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_plot_that_fails_to_save_keeps_the_previous_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from stpnet.app.plot import plot_accuracy_vs_compression

    point = [{"format": "tt", "compression": 9.0, "accuracy": 0.8, "params": 30_000, "label": "tt"}]
    path = plot_accuracy_vs_compression(point, tmp_path / "plot.png")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def broken_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_accuracy_vs_compression(point, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
