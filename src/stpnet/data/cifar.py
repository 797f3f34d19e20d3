"""Loading CIFAR-10 from the official python batches, an ImageFolder directory, or a tarball of either.

Accepted sources
----------------
* the official "python version": the directory ``cifar-10-batches-py/`` (``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``, optionally ``batches.meta``), its parent directory, or the
  official archive ``cifar-10-python.tar.gz``;
* an ImageFolder directory ``train/<class>/*.jpg|png`` and ``test/<class>/*``;
* a ``.tar`` or ``.tar.gz`` of such an ImageFolder (members are read from the archive; nothing is
  extracted to disk).

Batch pickles are read with an unpickler that only accepts NumPy arrays, lists and plain values,
so a malicious file cannot run code. Decoded arrays of archives and image folders are cached
(:mod:`stpnet.data.cache`); the plain batch directory is already arrays and is read directly.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .cache import cached_arrays
from .dataset import ImageDataset
from .errors import DataError

__all__ = ["load_cifar10", "CIFAR10_CLASSES", "IMAGE_SUFFIXES"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")

_BATCH_DIR = "cifar-10-batches-py"
_ARCHIVE = "cifar-10-python.tar.gz"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_BATCH_FILES = _TRAIN_BATCHES + ("test_batch",)
_META = "batches.meta"
_SPLITS = ("train", "test")
_KEYS = ("train_x", "train_y", "test_x", "test_y", "classes")
_EXPECTED = (
    "expected the CIFAR-10 python batches (cifar-10-batches-py/ with data_batch_1..5 and test_batch, "
    "its parent directory, or cifar-10-python.tar.gz), an ImageFolder directory with train/<class>/ "
    "and test/<class>/ image files, or a .tar/.tar.gz of such an ImageFolder"
)

Arrays = Dict[str, np.ndarray]
# (split, class folder, file name, encoded bytes or file path)
_ImageEntry = Tuple[str, str, str, Union[bytes, Path]]


# ------------------------------------------------------------------------------ python batches


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs (NumPy arrays, latin-1 bytes)."""

    _ALLOWED = frozenset(
        {
            ("_codecs", "encode"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which a CIFAR batch never contains")
        return super().find_class(module, name)


def _unpickle_dict(raw: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types for corrupt input
        raise DataError(
            f"{where} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
            "expected a pickled dict with keys b'data' (uint8 N x 3072) and b'labels'"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} unpickles to a {type(obj).__name__}; expected a dict with keys b'data' and b'labels'")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(raw: bytes, where: str) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle_dict(raw, where)
    if "data" not in d or "labels" not in d:
        hint = " (this looks like CIFAR-100, which has fine_labels)" if "fine_labels" in d else ""
        raise DataError(f"{where} has keys {sorted(d)}; expected a CIFAR-10 batch with b'data' and b'labels'{hint}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: b'data' is a {got}; expected a uint8 array of shape N x 3072 (3 planes of 32 x 32)")
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: b'labels' is not a list of integers ({exc})") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where}: b'data' holds {data.shape[0]} images but b'labels' has shape {labels.shape}")
    # Row-major R, G, B planes of 32 x 32: a plain reshape gives N x C x H x W.
    return data.reshape(-1, 3, 32, 32), labels


def _parse_meta(raw: bytes, where: str) -> Tuple[str, ...]:
    d = _unpickle_dict(raw, where)
    names = d.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{where} has no b'label_names' list; expected the CIFAR-10 batches.meta dict")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _assemble_batches(raws: Dict[str, bytes], meta: Optional[bytes], where: str) -> Arrays:
    missing = [n for n in _BATCH_FILES if n not in raws]
    if missing:
        raise DataError(
            f"{where} lacks {', '.join(missing)}; the CIFAR-10 python version has {', '.join(_BATCH_FILES)}"
        )
    classes = _parse_meta(meta, f"{where}/{_META}") if meta is not None else CIFAR10_CLASSES
    parts = {n: _parse_batch(raws[n], f"{where}/{n}") for n in _BATCH_FILES}
    for n, (_, y) in parts.items():
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{where}/{n} holds labels in [{y.min()}, {y.max()}]; expected 0..{len(classes) - 1}")
    return {
        "train_x": np.concatenate([parts[n][0] for n in _TRAIN_BATCHES]),
        "train_y": np.concatenate([parts[n][1] for n in _TRAIN_BATCHES]),
        "test_x": np.ascontiguousarray(parts["test_batch"][0]),
        "test_y": parts["test_batch"][1],
        "classes": np.array(classes),
    }


def _read_batch_dir(directory: Path) -> Arrays:
    raws = {n: (directory / n).read_bytes() for n in _BATCH_FILES if (directory / n).is_file()}
    meta_path = directory / _META
    meta = meta_path.read_bytes() if meta_path.is_file() else None
    return _assemble_batches(raws, meta, str(directory))


# ------------------------------------------------------------------------------ image folders


def _decode_image(data: Union[bytes, Path], where: str) -> np.ndarray:
    """Decode one encoded image (bytes or a file) to an H x W x 3 uint8 RGB array."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where} is not a decodable image ({exc}); expected a JPEG or PNG file") from None


def _decode_all(entries: List[_ImageEntry], where: str) -> np.ndarray:
    """Decode every entry (in order) into one N x 3 x H x W uint8 array; all images must share H x W."""
    out: Optional[np.ndarray] = None
    for i, (split, cls, name, data) in enumerate(entries):
        img = _decode_image(data, f"{where}: {split}/{cls}/{name}")
        if out is None:
            out = np.empty((len(entries),) + img.shape, dtype=np.uint8)
        elif img.shape != out.shape[1:]:
            first = "/".join(entries[0][:3])
            raise DataError(
                f"{where}: {split}/{cls}/{name} is {img.shape[1]} x {img.shape[0]} pixels but {first} is "
                f"{out.shape[2]} x {out.shape[1]}; all images must have the same size"
            )
        out[i] = img
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _assemble_image_folder(entries: List[_ImageEntry], class_dirs: Dict[str, set], where: str) -> Arrays:
    """Order, label and decode ImageFolder entries; ``class_dirs[split]`` are the class folders seen."""
    counts: Dict[Tuple[str, str], int] = {}
    for split, cls, _, _ in entries:
        counts[(split, cls)] = counts.get((split, cls), 0) + 1
        class_dirs.setdefault(split, set()).add(cls)
    classes = sorted(class_dirs.get("train", ()))
    if not classes:
        raise DataError(f"{where} has no class folders under train/; {_EXPECTED}")
    empty = [c for c in classes if counts.get(("train", c), 0) == 0]
    if empty:
        raise DataError(
            f"{where}: train/{empty[0]}/ holds no images ({len(empty)} empty class folder(s)); "
            f"every class folder needs files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    unknown = sorted(class_dirs.get("test", set()) - set(classes))
    if unknown:
        raise DataError(
            f"{where}: test/{unknown[0]}/ is a class with no train/{unknown[0]}/ folder; train classes are {classes}"
        )
    index = {c: i for i, c in enumerate(classes)}
    arrays: Arrays = {"classes": np.array(classes)}
    for split in _SPLITS:
        chosen = sorted((e for e in entries if e[0] == split), key=lambda e: (index[e[1]], e[2]))
        if not chosen:
            raise DataError(f"{where} has no images under {split}/<class>/; {_EXPECTED}")
        arrays[f"{split}_x"] = _decode_all(chosen, where)
        arrays[f"{split}_y"] = np.array([index[e[1]] for e in chosen], dtype=np.int64)
    return arrays


def _read_image_folder_dir(root: Path) -> Arrays:
    entries: List[_ImageEntry] = []
    class_dirs: Dict[str, set] = {}
    for split in _SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{root} has no {split}/ folder; an ImageFolder needs train/<class>/ and test/<class>/")
        for cls_entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not cls_entry.is_dir() or cls_entry.name.startswith("."):
                continue
            class_dirs.setdefault(split, set()).add(cls_entry.name)
            for f in os.scandir(cls_entry.path):
                if f.is_file() and _is_image_name(f.name):
                    entries.append((split, cls_entry.name, f.name, Path(f.path)))
    return _assemble_image_folder(entries, class_dirs, str(root))


# ------------------------------------------------------------------------------ tarballs


def _read_tar(path: Path) -> Arrays:
    """One sequential pass over a (gzipped) tar: python batches or an ImageFolder, whichever it holds."""
    batches: Dict[str, bytes] = {}
    meta: Optional[bytes] = None
    images: Dict[str, List[_ImageEntry]] = {}  # by the prefix before train/ or test/
    class_dirs: Dict[str, Dict[str, set]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if not parts:
                    continue
                if member.isfile():
                    base = parts[-1]
                    if base in _BATCH_FILES or base == _META:
                        raw = tf.extractfile(member).read()
                        if base == _META:
                            meta = raw if meta is None else meta
                        else:
                            batches.setdefault(base, raw)
                    elif len(parts) >= 3 and parts[-3] in _SPLITS and _is_image_name(base):
                        prefix = "/".join(parts[:-3])
                        entry = (parts[-3], parts[-2], base, tf.extractfile(member).read())
                        images.setdefault(prefix, []).append(entry)
                elif member.isdir() and len(parts) >= 2 and parts[-2] in _SPLITS:
                    prefix = "/".join(parts[:-2])
                    class_dirs.setdefault(prefix, {}).setdefault(parts[-2], set()).add(parts[-1])
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a corrupt or truncated tar archive ({exc}); {_EXPECTED}") from None
    if batches:
        return _assemble_batches(batches, meta, str(path))
    if not images:
        raise DataError(f"{path} holds neither CIFAR-10 python batches nor train/<class>/ images; {_EXPECTED}")
    if len(images) > 1:
        roots = sorted(p or "." for p in images)
        raise DataError(f"{path} holds several ImageFolder roots ({', '.join(roots)}); expected exactly one")
    (prefix, entries), = images.items()
    where = f"{path}:{prefix}" if prefix else str(path)
    return _assemble_image_folder(entries, class_dirs.get(prefix, {}), where)


# ------------------------------------------------------------------------------ public entry


def _locate(path: Path) -> Tuple[str, Path]:
    """('batches', dir), ('folder', dir) or ('tar', file) for a user-given path."""
    if path.is_dir():
        if any((path / n).is_file() for n in _BATCH_FILES):
            return "batches", path
        if (path / _BATCH_DIR).is_dir():
            return "batches", path / _BATCH_DIR
        if (path / "train").is_dir() or (path / "test").is_dir():
            return "folder", path
        if (path / _ARCHIVE).is_file():
            return "tar", path / _ARCHIVE
        raise DataError(f"{path} is not a CIFAR-10 directory; {_EXPECTED}")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"{path} is not a tar archive; {_EXPECTED}")
        return "tar", path
    raise DataError(f"CIFAR-10 source {path} does not exist; {_EXPECTED}")


def load_cifar10(path: Union[str, Path], cache: bool = True) -> ImageDataset:
    """Load CIFAR-10 (or any RGB ImageFolder) into memory.

    Parameters
    ----------
    path : str or Path
        ``cifar-10-batches-py/`` or its parent, ``cifar-10-python.tar.gz``, an ImageFolder directory
        (``train/<class>/*``, ``test/<class>/*``), or a ``.tar``/``.tar.gz`` of an ImageFolder (which
        may sit under one top-level folder).
    cache : bool
        Cache the decoded arrays of archives and image folders (see :mod:`stpnet.data.cache`); the
        plain batch directory is read directly either way.

    Returns
    -------
    ImageDataset
        uint8 images ``N x 3 x H x W`` and int64 labels; named ``"cifar10"``. Classes are the
        official ``label_names`` order for the batches, the sorted folder names for an ImageFolder
        (images ordered by class, then file name).

    Raises
    ------
    DataError
        If the path does not exist, is in none of the accepted layouts, or a file in it is missing,
        corrupt or truncated. The message names the file and what was expected.
    """
    kind, source = _locate(Path(path))
    if kind == "batches":
        arrays = _read_batch_dir(source)
    else:
        reader = _read_tar if kind == "tar" else _read_image_folder_dir
        arrays = cached_arrays(source, "cifar10", lambda: reader(source), enabled=cache, keys=_KEYS)
    return ImageDataset(
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64, copy=False)),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64, copy=False)),
        classes=tuple(str(c) for c in arrays["classes"]),
        name="cifar10",
    )
