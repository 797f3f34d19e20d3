"""Where the real benchmark data lives: one folder the benchmarks and tests read, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["benchmark_data_path"]

#: The environment variable naming the benchmark data folder.
DATA_DIR_VARIABLE = "STPNET_DATA_DIR"


def benchmark_data_path(name: str = "") -> Path:
    """The path of ``name`` in the benchmark data folder (the folder itself for ``""``).

    The benchmarks (``bench/``) and the tests that use real data read one folder:
    ``$STPNET_DATA_DIR`` where that is set, else ``../shared/data`` relative to the root of the
    repository this package was installed from in editable mode (where this project's machines
    lay the data beside the clone). It holds CIFAR-10 re-encoded as JPEG (quality 75) in the
    ImageFolder layout as ``cifar10-jpeg.tar.gz`` and Fashion-MNIST as the original IDX files in
    ``fashion-mnist/``; :func:`stpnet.data.load_dataset` reads both. Nothing is downloaded: with
    another installation, set ``STPNET_DATA_DIR``.

    Parameters
    ----------
    name : str
        A file or folder in the data folder, e.g. ``"cifar10-jpeg.tar.gz"``.

    Returns
    -------
    Path
        The path; it may not exist (callers say what is missing).
    """
    folder = os.environ.get(DATA_DIR_VARIABLE)
    root = Path(folder) if folder else Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return root / name if name else root
