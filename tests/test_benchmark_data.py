"""Where the benchmarks and tests find their real data."""

from __future__ import annotations

from pathlib import Path

from stpnet.data import benchmark_data_path


def test_the_data_folder_is_the_environment_variable_where_set(monkeypatch, tmp_path):
    monkeypatch.setenv("STPNET_DATA_DIR", str(tmp_path))
    assert benchmark_data_path() == tmp_path
    assert benchmark_data_path("cifar10-jpeg.tar.gz") == tmp_path / "cifar10-jpeg.tar.gz"


def test_the_default_folder_lies_beside_the_repository(monkeypatch):
    monkeypatch.delenv("STPNET_DATA_DIR", raising=False)
    repository = Path(__file__).resolve().parents[1]  # an editable install from this checkout
    assert benchmark_data_path() == repository.parent / "shared" / "data"
    assert benchmark_data_path("fashion-mnist").name == "fashion-mnist"
