"""Reading IDX files (the MNIST format) and the MNIST / Fashion-MNIST datasets built from them."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .dataset import ImageDataset
from .errors import DataError

__all__ = ["load_idx", "load_mnist", "find_idx_file", "MNIST_CLASSES", "FASHION_MNIST_CLASSES"]

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_GZIP_MAGIC = b"\x1f\x8b"


def load_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from its first bytes, not its name).

    Parameters
    ----------
    path : str or Path
        The file. Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
        0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, each dimension as a
        big-endian uint32, then the data, big-endian, row-major.

    Returns
    -------
    numpy.ndarray
        The array in native byte order, with the file's shape and dtype.

    Raises
    ------
    DataError
        If the file is missing, not valid gzip, has a bad magic number or type code, or holds
        fewer or more data bytes than its dimensions call for.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"{path} is a corrupt or truncated gzip file ({exc}); expected a gzipped IDX file"
            ) from None
    if len(raw) < 4:
        raise DataError(f"{path} has {len(raw)} bytes; an IDX file starts with a 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} has magic number 0x{raw[:4].hex()}; an IDX file starts with 00 00, a type code "
            f"({', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}) and the number of dimensions (>= 1)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header needs {header} bytes for {ndim} dimensions, found {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"{path} is {what}: shape {shape} of {dtype.name} needs {expected} data bytes after the "
            f"{header}-byte header, found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def find_idx_file(directory: Union[str, Path], stem: str) -> Path:
    """The IDX file ``stem`` in ``directory``, as ``stem`` or ``stem.gz``.

    Also accepts the common variant with a dot before ``idx`` (``train-images.idx3-ubyte``).

    Raises
    ------
    DataError
        If none of the accepted names exists.
    """
    directory = Path(directory)
    dotted = stem.replace("-idx", ".idx")
    candidates = [stem, stem + ".gz", dotted, dotted + ".gz"]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory} has no IDX file {stem}; expected one of {', '.join(candidates)}")


def _read_split(directory: Path, prefix: str) -> tuple:
    images_path = find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = load_idx(images_path), load_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path} holds a {images.dtype} array of shape {images.shape}; expected uint8 N x H x W")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path} holds a {labels.dtype} array of shape {labels.shape}; expected uint8 of shape (N,)"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= 10:
        raise DataError(f"{labels_path} holds label {int(labels.max())}; MNIST labels are 0..9")
    return images, labels


def load_mnist(directory: Union[str, Path]) -> ImageDataset:
    """Load MNIST or Fashion-MNIST from its four IDX files.

    Parameters
    ----------
    directory : str or Path
        Holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
        and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``). If the directory's name
        contains ``fashion`` the Fashion-MNIST class names are used, otherwise the digits.

    Returns
    -------
    ImageDataset
        Images of shape ``(N, 1, H, W)``; name ``"fashion-mnist"`` or ``"mnist"``.

    Raises
    ------
    DataError
        If the directory or a file is missing, corrupt or inconsistent.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"MNIST directory {directory} does not exist (or is not a directory)")
    train_x, train_y = _read_split(directory, "train")
    test_x, test_y = _read_split(directory, "t10k")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{directory}: train images are {train_x.shape[1:]} but test images are {test_x.shape[1:]}")
    fashion = "fashion" in directory.resolve().name.lower()
    return ImageDataset(
        train_x=torch.from_numpy(train_x[:, None]),
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=torch.from_numpy(test_x[:, None]),
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES,
        name="fashion-mnist" if fashion else "mnist",
    )
