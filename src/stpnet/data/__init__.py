"""Datasets for training and evaluating compressed networks: loaders, cache, augmentation, batches.

* :func:`load_dataset` -- one entry point: ``"cifar10-subset"`` or a path to CIFAR-10 (python
  batches or ImageFolder, as a directory or tarball) or to an MNIST / Fashion-MNIST IDX directory.
* :class:`ImageDataset` -- the in-memory result (uint8 ``N x C x H x W`` images, int64 labels).
* :func:`random_crop`, :func:`random_hflip`, :func:`training_augment`, :func:`normalize` -- batched augmentation on tensors.
* :func:`iterate_batches` -- deterministic, resumable, shardable minibatches.
* :func:`benchmark_data_path` -- where the benchmarks' and tests' real data lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .augment import crop_padded, normalize, random_crop, random_hflip, training_augment
from .batches import batches_per_epoch, epoch_indices, iterate_batches
from .benchmark import benchmark_data_path
from .cache import cache_dir
from .cifar import CIFAR10_CLASSES, load_cifar10
from .dataset import ImageDataset
from .embedded import load_embedded_cifar10
from .errors import DataError
from .idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, load_idx, load_mnist

__all__ = [
    "benchmark_data_path",
    "DataError",
    "ImageDataset",
    "load_dataset",
    "load_cifar10",
    "load_embedded_cifar10",
    "load_mnist",
    "load_idx",
    "cache_dir",
    "crop_padded",
    "random_crop",
    "random_hflip",
    "training_augment",
    "normalize",
    "iterate_batches",
    "epoch_indices",
    "batches_per_epoch",
    "CIFAR10_CLASSES",
    "MNIST_CLASSES",
    "FASHION_MNIST_CLASSES",
    "EMBEDDED_NAMES",
]

EMBEDDED_NAMES = ("cifar10-subset",)


def _is_idx_directory(path: Path) -> bool:
    return any(path.glob("train-images*idx3-ubyte*"))


def load_dataset(spec: Union[str, Path], *, cache: bool = True) -> ImageDataset:
    """Load a dataset by name or path, detecting the format from the contents.

    Parameters
    ----------
    spec : str or Path
        ``"cifar10-subset"`` (the subset shipped with stpnet), or a path to: a directory with MNIST
        or Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]`` ...), or CIFAR-10 in any form
        :func:`load_cifar10` reads (``cifar-10-batches-py/`` or its parent,
        ``cifar-10-python.tar.gz``, an ImageFolder directory, or a ``.tar``/``.tar.gz`` of one).
    cache : bool
        Cache decoded images (see :mod:`stpnet.data.cache`).

    Returns
    -------
    ImageDataset

    Raises
    ------
    DataError
        If the path does not exist or holds none of the accepted formats.
    """
    if isinstance(spec, str) and spec in EMBEDDED_NAMES:
        return load_embedded_cifar10(cache=cache)
    if not isinstance(spec, (str, Path)):
        raise ValueError(f"spec must be a dataset name or a path, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"{spec!r} is neither a known dataset name ({', '.join(EMBEDDED_NAMES)}) nor an existing path"
        )
    if path.is_dir() and _is_idx_directory(path):
        return load_mnist(path)
    return load_cifar10(path, cache=cache)
