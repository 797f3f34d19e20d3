"""The data layer: loaders for the official on-disk formats (written here in tmp_path), the cache,
augmentation, minibatches, the embedded CIFAR-10 subset and, when shared/ is present, Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from stpnet.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    DataError,
    ImageDataset,
    benchmark_data_path,
    batches_per_epoch,
    cache_dir,
    crop_padded,
    iterate_batches,
    load_cifar10,
    load_dataset,
    load_embedded_cifar10,
    load_idx,
    load_mnist,
    normalize,
    random_crop,
    random_hflip,
)
from stpnet.data import cifar as cifar_module


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    """Every test caches into its own folder, never the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STPNET_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """The benchmark data folder (:func:`stpnet.data.benchmark_data_path`)."""
    path = benchmark_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is not present")
    return path


def _images(n: int, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ------------------------------------------------------------------------ CIFAR python batches


def _batch_bytes(images: np.ndarray, labels: list, label: bytes) -> bytes:
    """A batch pickled like the official ones: row = R plane, G plane, B plane, each 32x32 row-major."""
    rows = np.stack([np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()]) for img in images])
    batch = {
        b"batch_label": label,
        b"labels": list(labels),
        b"data": rows.astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def _write_cifar_batches(directory: Path, per_batch: int = 3, n_test: int = 4, meta: bool = True) -> dict:
    directory.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = _images(per_batch, seed=b)
        y = [(b * 7 + i) % 10 for i in range(per_batch)]
        (directory / f"data_batch_{b}").write_bytes(_batch_bytes(x, y, f"training batch {b} of 5".encode()))
        train_x.append(x)
        train_y += y
    test_x = _images(n_test, seed=99)
    test_y = [(3 * i) % 10 for i in range(n_test)]
    (directory / "test_batch").write_bytes(_batch_bytes(test_x, test_y, b"testing batch 1 of 1"))
    if meta:
        names = {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
        (directory / "batches.meta").write_bytes(pickle.dumps(names, protocol=2))
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.array(train_y),
        "test_x": test_x,
        "test_y": np.array(test_y),
    }


def _assert_same(data: ImageDataset, expected: dict) -> None:
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(data, key).numpy(), expected[key]), key
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64


def test_cifar_batches_round_trip(tmp_path):
    expected = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    data = load_cifar10(tmp_path / "cifar-10-batches-py")
    _assert_same(data, expected)
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.classes == CIFAR10_CLASSES and data.name == "cifar10"


def test_cifar_batches_plane_order(tmp_path):
    """A row of b'data' is 1024 red, then 1024 green, then 1024 blue values, each plane row-major."""
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(d, meta=False)
    row = np.zeros(3072, dtype=np.uint8)
    row[:1024], row[1024:2048], row[2048:] = 10, 20, 30
    row[1 * 32 + 5] = 200  # red, y=1, x=5
    row[1024 + 31 * 32 + 0] = 201  # green, y=31, x=0
    row[2048 + 0 * 32 + 31] = 202  # blue, y=0, x=31
    (d / "test_batch").write_bytes(pickle.dumps({b"data": row[None], b"labels": [8]}, protocol=2))
    img = load_cifar10(d).test_x[0]
    assert img[0, 1, 5] == 200 and img[1, 31, 0] == 201 and img[2, 0, 31] == 202
    assert (img[0] == 10).sum() == 1023 and (img[1] == 20).sum() == 1023 and (img[2] == 30).sum() == 1023
    # The same pixels through Pillow's HWC view of the image.
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    assert pil.getpixel((5, 1))[0] == 200 and pil.getpixel((0, 31))[1] == 201 and pil.getpixel((31, 0))[2] == 202


def test_cifar_batches_parent_directory_and_official_tarball(tmp_path):
    expected = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    _assert_same(load_cifar10(tmp_path), expected)  # the parent directory
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = load_cifar10(archive)
    _assert_same(from_tar, expected)
    assert from_tar.classes == CIFAR10_CLASSES


def test_cifar_batches_label_names_from_meta(tmp_path):
    d = tmp_path / "b"
    _write_cifar_batches(d)
    names = [f"class{i}".encode() for i in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    assert load_cifar10(d).classes == tuple(f"class{i}" for i in range(10))


def test_corrupt_batch_pickle_raises(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(d)
    (d / "data_batch_3").write_bytes(b"\x80\x02}q\x00(garbage")
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR batch.*b'data'"):
        load_cifar10(d)


def test_batch_pickle_cannot_run_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(d)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_1.*refusing to load .*system"):
        load_cifar10(d)


def test_batch_with_wrong_layout_raises(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(d)
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_2.*shape \(2, 1024\).*N x 3072"):
        load_cifar10(d)
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_2.*CIFAR-100"):
        load_cifar10(d)


def test_missing_batch_raises(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(d)
    (d / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_5"):
        load_cifar10(d)


# ------------------------------------------------------------------------ ImageFolder


def _write_image_folder(root: Path, counts: dict, seed: int = 0) -> dict:
    """PNG ImageFolder; returns the expected arrays in loader order (sorted class, then file name)."""
    expected: dict = {}
    classes = sorted(counts)
    for split in ("train", "test"):
        xs, ys = [], []
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            imgs = _images(counts[cls][split], seed=seed + 100 * label + (split == "test"))
            for i, img in enumerate(imgs):
                Image.fromarray(img.transpose(1, 2, 0)).save(root / split / cls / f"{i:04d}.png")
            xs.append(imgs)
            ys += [label] * len(imgs)
        expected[f"{split}_x"], expected[f"{split}_y"] = np.concatenate(xs), np.array(ys)
    expected["classes"] = tuple(classes)
    return expected


COUNTS = {"zebra": {"train": 3, "test": 2}, "ant": {"train": 2, "test": 1}, "moth": {"train": 4, "test": 2}}


def test_image_folder_round_trip(tmp_path):
    expected = _write_image_folder(tmp_path / "folder", COUNTS)
    (tmp_path / "folder" / "train" / "ant" / "notes.txt").write_text("not an image")
    data = load_cifar10(tmp_path / "folder")
    assert data.classes == ("ant", "moth", "zebra")  # sorted folder names
    _assert_same(data, expected)
    assert data.train_y.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("mode, prefix", [("w:gz", ""), ("w", ""), ("w:gz", "cifar10/")])
def test_image_folder_tarball_matches_directory(tmp_path, mode, prefix):
    expected = _write_image_folder(tmp_path / "folder", COUNTS)
    archive = tmp_path / ("images.tar.gz" if mode == "w:gz" else "images.tar")
    with tarfile.open(archive, mode) as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / "folder" / split, arcname=prefix + split)
    data = load_cifar10(archive)
    assert data.classes == expected["classes"]
    _assert_same(data, expected)


def test_jpeg_image_folder_decodes(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "grey").mkdir(parents=True)
        Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / split / "grey" / "a.jpg", quality=95)
    data = load_cifar10(tmp_path)
    assert data.train_x.shape == (1, 3, 32, 32)
    assert (data.train_x.int() - 128).abs().max() <= 2


def test_empty_image_folder_raises(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=r"no class folders under train/"):
        load_cifar10(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=r"train/cat/ holds no images"):
        load_cifar10(tmp_path)


def test_image_folder_errors(tmp_path):
    root = tmp_path / "f"
    _write_image_folder(root, {"a": {"train": 2, "test": 1}})
    (root / "test" / "b").mkdir()
    Image.new("RGB", (32, 32)).save(root / "test" / "b" / "x.png")
    with pytest.raises(DataError, match=r"test/b/ is a class with no train/b/ folder"):
        load_cifar10(root, cache=False)
    (root / "test" / "b" / "x.png").unlink()
    (root / "test" / "b").rmdir()
    Image.new("RGB", (16, 32)).save(root / "train" / "a" / "9999.png")
    with pytest.raises(DataError, match=r"train/a/9999.png is 16 x 32 pixels.*same size"):
        load_cifar10(root, cache=False)
    (root / "train" / "a" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"train/a/9999.png is not a decodable image"):
        load_cifar10(root, cache=False)


def test_missing_and_unrecognised_paths_raise(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*cifar-10-batches-py"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"neither a known dataset name \(cifar10-subset\) nor an existing path"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"other is not a CIFAR-10 directory"):
        load_dataset(tmp_path / "other")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt is not a tar archive"):
        load_cifar10(tmp_path / "notes.txt")


def test_truncated_tarball_raises(tmp_path):
    _write_image_folder(tmp_path / "folder", COUNTS)
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "folder" / "train", arcname="train")
        tar.add(tmp_path / "folder" / "test", arcname="test")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images.tar.gz is a corrupt or truncated tar archive"):
        load_cifar10(archive)


# ------------------------------------------------------------------------ cache


def _image_tarball(tmp_path: Path, seed: int = 0) -> tuple:
    expected = _write_image_folder(tmp_path / f"folder{seed}", COUNTS, seed=seed)
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / f"folder{seed}" / split, arcname=split)
    return archive, expected


def _refuse_to_decode(*args, **kwargs):
    raise AssertionError("decoded although a valid cache entry exists")


def test_second_load_reads_the_cache(tmp_path, cache_root, monkeypatch):
    archive, expected = _image_tarball(tmp_path)
    first = load_cifar10(archive)
    files = list(cache_root.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("cifar10-")
    monkeypatch.setattr(cifar_module, "_decode_image", _refuse_to_decode)
    second = load_cifar10(archive)
    _assert_same(second, expected)
    assert second.classes == first.classes
    assert not list(cache_root.glob("*.tmp"))  # written atomically, nothing left behind


def test_cache_is_invalidated_when_the_source_changes(tmp_path, cache_root):
    archive, _ = _image_tarball(tmp_path, seed=0)
    load_cifar10(archive)
    stat = archive.stat()
    archive.unlink()
    archive2, expected2 = _image_tarball(tmp_path, seed=5)
    os.utime(archive2, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _assert_same(load_cifar10(archive2), expected2)
    assert len(list(cache_root.glob("*.npz"))) == 2


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, cache_root, monkeypatch):
    archive, expected = _image_tarball(tmp_path)
    load_cifar10(archive)
    (entry,) = cache_root.glob("*.npz")
    entry.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.warns(RuntimeWarning, match=r"ignoring unreadable cache file .*rebuilt"):
        _assert_same(load_cifar10(archive), expected)
    monkeypatch.setattr(cifar_module, "_decode_image", _refuse_to_decode)
    _assert_same(load_cifar10(archive), expected)  # the rewritten entry is valid


def test_cache_disabled_writes_nothing(tmp_path, cache_root):
    archive, expected = _image_tarball(tmp_path)
    _assert_same(load_cifar10(archive, cache=False), expected)
    assert not cache_root.exists() or not list(cache_root.iterdir())


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("STPNET_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("STPNET_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "stpnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "stpnet"


# ------------------------------------------------------------------------ IDX / MNIST


IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_idx_round_trip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 5) * 37 - 100).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        arr = (np.arange(30) * 37 % 256).reshape(2, 3, 5).astype(np.uint8)
    raw = _idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = load_idx(path)
    assert out.dtype == arr.dtype and out.dtype.isnative and out.shape == (2, 3, 5)
    assert np.array_equal(out, arr)


def test_idx_header_is_big_endian(tmp_path):
    raw = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    (tmp_path / "x").write_bytes(raw)
    assert load_idx(tmp_path / "x").tolist() == [0x0102, -2]


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_raises(tmp_path, gz):
    raw = _idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    message = r"train-images-idx3-ubyte is truncated: shape \(4, 28, 28\).*needs 3136.*found 3036"
    with pytest.raises(DataError, match=message):
        load_idx(path)


def test_corrupt_idx_raises(tmp_path):
    good = gzip.compress(_idx_bytes(np.zeros((4, 28, 28), np.uint8)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut.gz is a corrupt or truncated gzip file"):
        load_idx(tmp_path / "cut.gz")
    (tmp_path / "magic").write_bytes(b"\x00\x00\x07\x01" + bytes(8))
    with pytest.raises(DataError, match=r"magic.*magic number 0x00000701.*type code"):
        load_idx(tmp_path / "magic")
    (tmp_path / "long").write_bytes(_idx_bytes(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match=r"long is corrupt \(trailing bytes\)"):
        load_idx(tmp_path / "long")
    with pytest.raises(DataError, match=r"does not exist"):
        load_idx(tmp_path / "absent")


def _write_mnist(directory: Path, gz: bool) -> dict:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(3)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3).astype(np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        (directory / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "mnist", gz)
    data = load_mnist(tmp_path / "mnist")
    assert data.name == "mnist" and data.classes == MNIST_CLASSES
    assert data.train_x.shape == (6, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    assert np.array_equal(data.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    via_spec = load_dataset(tmp_path / "mnist")
    assert via_spec.name == "mnist" and torch.equal(via_spec.train_x, data.train_x)


def test_fashion_names_and_missing_file(tmp_path):
    _write_mnist(tmp_path / "Fashion-MNIST-raw", gz=True)
    data = load_mnist(tmp_path / "Fashion-MNIST-raw")
    assert data.name == "fashion-mnist" and data.classes == FASHION_MNIST_CLASSES
    (tmp_path / "Fashion-MNIST-raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"no IDX file t10k-labels-idx1-ubyte; expected one of"):
        load_mnist(tmp_path / "Fashion-MNIST-raw")


def test_load_dataset_detects_cifar_formats(tmp_path):
    expected = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    _assert_same(load_dataset(tmp_path), expected)
    _assert_same(load_dataset(str(tmp_path / "cifar-10-batches-py")), expected)


# ------------------------------------------------------------------------ ImageDataset


def _toy_dataset(n_train: int = 40, n_test: int = 20, k: int = 4) -> ImageDataset:
    return ImageDataset(
        train_x=torch.from_numpy(_images(n_train, h=4, w=4, seed=1)),
        train_y=torch.arange(n_train) % k,
        test_x=torch.from_numpy(_images(n_test, h=4, w=4, seed=2)),
        test_y=torch.arange(n_test) % k,
        classes=tuple("abcd"[:k]),
        name="toy",
    )


def test_mean_and_std_per_channel():
    data = _toy_dataset()
    x = data.train_x.double() / 255
    assert data.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert data.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    assert len(data.mean) == 3 and all(isinstance(m, float) for m in data.mean)


def test_fixed_normalization_overrides_the_measured_statistics():
    data = _toy_dataset()
    fixed = data.with_normalization([0.5, 0.4, 0.3], (0.2, 0.25, 0.3))
    assert fixed.mean == (0.5, 0.4, 0.3) and fixed.std == (0.2, 0.25, 0.3)
    assert fixed.train_x is data.train_x and data.normalization is None
    assert fixed.subset(4, 4).mean == (0.5, 0.4, 0.3)  # a subset keeps the model's preprocessing
    with pytest.raises(ValueError, match="3 values each and every std > 0"):
        data.with_normalization([0.5, 0.4], [0.2, 0.2])
    with pytest.raises(ValueError, match="every std > 0"):
        data.with_normalization([0.5, 0.4, 0.3], [0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="normalization must be"):
        data.with_normalization("abc", None)


def test_balanced_and_random_subsets():
    data = _toy_dataset()
    sub = data.subset(12, 8, seed=1)
    assert torch.bincount(sub.train_y).tolist() == [3, 3, 3, 3]
    assert torch.bincount(sub.test_y).tolist() == [2, 2, 2, 2]
    again = data.subset(12, 8, seed=1)
    assert torch.equal(sub.train_x, again.train_x) and torch.equal(sub.test_y, again.test_y)
    assert not torch.equal(sub.train_x, data.subset(12, 8, seed=2).train_x)
    odd = data.subset(6, None, seed=0)
    assert torch.bincount(odd.train_y, minlength=4).tolist() == [2, 2, 1, 1] and odd.test_x.shape[0] == 20
    rand = data.subset(7, 3, seed=0, balanced=False)
    assert rand.train_x.shape[0] == 7 and rand.test_x.shape[0] == 3
    # Every kept image is an original image with its own label.
    rows = {tuple(img.flatten().tolist()): int(lbl) for img, lbl in zip(data.train_x, data.train_y)}
    assert all(rows[tuple(img.flatten().tolist())] == int(lbl) for img, lbl in zip(rand.train_x, rand.train_y))
    with pytest.raises(ValueError, match=r"n_train=41 exceeds the 40 images"):
        data.subset(41)
    skewed = ImageDataset(data.train_x, torch.tensor([0] * 37 + [1, 2, 3]), data.test_x, data.test_y, data.classes, "s")
    with pytest.raises(ValueError, match=r"needs 2 of class 'b', which has only 1.*balanced=False"):
        skewed.subset(8)


def test_dataset_rejects_inconsistent_tensors():
    good = _toy_dataset()
    with pytest.raises(ValueError, match=r"train_x must be a uint8 tensor"):
        ImageDataset(good.train_x.float(), good.train_y, good.test_x, good.test_y, good.classes, "x")
    with pytest.raises(ValueError, match=r"train_x holds 40 images but train_y holds 39"):
        ImageDataset(good.train_x, good.train_y[:-1], good.test_x, good.test_y, good.classes, "x")
    with pytest.raises(ValueError, match=r"labels in \[0, 3\].*with 2 classes"):
        ImageDataset(good.train_x, good.train_y, good.test_x, good.test_y, ("a", "b"), "x")


# ------------------------------------------------------------------------ augmentation


def test_crop_padded_at_known_offsets():
    x = torch.from_numpy(_images(3, h=8, w=8)).clamp(min=1)  # no zero pixels, so padding is recognisable
    n = x.shape[0]
    full = lambda v: torch.full((n,), v)  # noqa: E731
    assert torch.equal(crop_padded(x, full(4), full(4), padding=4), x)
    top_left = crop_padded(x, full(0), full(0), padding=4)
    assert (top_left[:, :, :4, :] == 0).all() and (top_left[:, :, :, :4] == 0).all()
    assert torch.equal(top_left[:, :, 4:, 4:], x[:, :, :4, :4])
    bottom_right = crop_padded(x, full(8), full(8), padding=4)
    assert torch.equal(bottom_right[:, :, :4, :4], x[:, :, 4:, 4:])
    assert (bottom_right[:, :, 4:, :] == 0).all() and (bottom_right[:, :, :, 4:] == 0).all()
    mixed = crop_padded(x, torch.tensor([0, 4, 6]), torch.tensor([4, 4, 2]), padding=4)
    assert torch.equal(mixed[1], x[1])
    assert torch.equal(mixed[0, :, 4:], x[0, :, :4]) and (mixed[0, :, :4] == 0).all()
    assert torch.equal(mixed[2, :, :6, 2:], x[2, :, 2:, :6])
    assert (mixed[2, :, 6:] == 0).all() and (mixed[2, :, :, :2] == 0).all()
    with pytest.raises(ValueError, match=r"top offsets must lie in \[0, 8\]"):
        crop_padded(x, full(9), full(0), padding=4)


def test_random_crop_is_a_padded_crop_and_deterministic():
    x = torch.from_numpy(_images(16))
    out = random_crop(x, padding=4, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, random_crop(x, padding=4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(out, random_crop(x, padding=4, generator=torch.Generator().manual_seed(8)))
    # Each output is exactly one of the 81 windows of its zero-padded image.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(x.shape[0]):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # C x 9 x 9 x 32 x 32
        assert (windows == out[i][:, None, None]).flatten(3).all(-1).all(0).any()
    g = torch.Generator().manual_seed(7)
    top, left = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    assert torch.equal(out, crop_padded(x, top, left, 4))
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator"):
        random_crop(x, generator=None)


def test_random_hflip_is_exact_mirror():
    x = torch.from_numpy(_images(64, h=5, w=7)).float()
    assert torch.equal(random_hflip(x, p=1.0, generator=torch.Generator()), x.flip(-1))
    assert torch.equal(random_hflip(x, p=0.0, generator=torch.Generator()), x)
    out = random_hflip(x, generator=torch.Generator().manual_seed(3))
    flipped = torch.tensor([torch.equal(o, m) for o, m in zip(out, x.flip(-1))])
    kept = torch.tensor([torch.equal(o, m) for o, m in zip(out, x)])
    assert (flipped ^ kept).all() and 10 < int(flipped.sum()) < 54
    assert torch.equal(out, random_hflip(x, generator=torch.Generator().manual_seed(3)))
    assert out[flipped][0, 0, 0, 0] == x[flipped][0, 0, 0, -1]


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 2, 1, 3).contiguous()
    out = normalize(x, mean=(0.5, 0.2), std=(0.25, 0.1))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out[0, 0, 0].tolist() == pytest.approx([-2.0, -1.2, 2.0], abs=1e-6)
    assert out[1, 1, 0].tolist() == pytest.approx([-2.0, 0.0, 8.0], abs=1e-6)
    with pytest.raises(ValueError, match=r"uint8"):
        normalize(x.float(), (0.5, 0.5), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"one value per channel \(2\), got 3 and 2"):
        normalize(x, (0.5, 0.5, 0.5), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"std must be positive"):
        normalize(x, (0.5, 0.5), (1.0, 0.0))


# ------------------------------------------------------------------------ batches


def _epoch(n: int = 103, bs: int = 10, **kw) -> list:
    x, y = torch.arange(n).view(n, 1).float(), torch.arange(n)
    batches = list(iterate_batches(x, y, bs, **kw))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired
    return batches


def test_batches_cover_every_sample_once_per_epoch():
    batches = _epoch(shuffle=True, seed=0, epoch=0)
    assert [len(b[1]) for b in batches] == [10] * 10 + [3]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(103)) and seen.tolist() != list(range(103))
    assert len(batches) == batches_per_epoch(103, 10)
    dropped = _epoch(shuffle=True, seed=0, epoch=0, drop_last=True)
    assert [len(b[1]) for b in dropped] == [10] * 10 and len(dropped) == batches_per_epoch(103, 10, drop_last=True)
    plain = torch.cat([b[1] for b in _epoch(shuffle=False, seed=0, epoch=0)])
    assert plain.tolist() == list(range(103))


def test_batch_order_depends_only_on_seed_and_epoch():
    order = lambda **kw: torch.cat([b[1] for b in _epoch(shuffle=True, **kw)]).tolist()  # noqa: E731
    assert order(seed=1, epoch=3) == order(seed=1, epoch=3)
    assert order(seed=1, epoch=3) != order(seed=1, epoch=4)
    assert order(seed=1, epoch=3) != order(seed=2, epoch=3)


@pytest.mark.parametrize("n", [12, 10])
def test_sharding_is_disjoint_covers_and_matches_distributed_sampler(n):
    world = 4
    shards = [
        torch.cat([b[1] for b in _epoch(n=n, bs=2, shuffle=True, seed=5, epoch=2, rank=r, world_size=world)])
        for r in range(world)
    ]
    assert all(len(s) == 3 for s in shards)  # ceil(n / 4), padded by wrapping
    union = torch.cat(shards).tolist()
    assert set(union) == set(range(n)) and len(union) - len(set(union)) == 12 - n
    for r, shard in enumerate(shards):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5)
        sampler.set_epoch(2)
        assert shard.tolist() == list(sampler)


def test_batches_reject_bad_arguments_eagerly():
    x, y = torch.zeros(5, 2), torch.zeros(5)
    with pytest.raises(ValueError, match=r"x holds 5 samples but y holds 4"):
        iterate_batches(x, y[:4], 2, shuffle=False, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\]"):
        iterate_batches(x, y, 2, shuffle=False, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        iterate_batches(x, y, 0, shuffle=False, seed=0, epoch=0)


# ------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def embedded() -> ImageDataset:
    return load_embedded_cifar10(cache=False)


def test_embedded_cifar10_subset(embedded):
    assert embedded.name == "cifar10-subset" and embedded.classes == CIFAR10_CLASSES
    assert embedded.train_x.shape == (5000, 3, 32, 32) and embedded.test_x.shape == (1000, 3, 32, 32)
    assert torch.bincount(embedded.train_y).tolist() == [500] * 10
    assert torch.bincount(embedded.test_y).tolist() == [100] * 10
    # CIFAR-10's per-channel means (126.0, 123.7, 114.8) / 255 and stds (~0.247, 0.243, 0.261).
    assert embedded.mean == pytest.approx((0.494, 0.485, 0.450), abs=0.02)
    assert embedded.std == pytest.approx((0.247, 0.243, 0.261), abs=0.02)


def test_load_dataset_embedded_name(embedded, monkeypatch, cache_root):
    data = load_dataset("cifar10-subset")
    assert torch.equal(data.train_x, embedded.train_x) and torch.equal(data.test_y, embedded.test_y)
    monkeypatch.setattr(cifar_module, "_decode_image", _refuse_to_decode)
    assert torch.equal(load_dataset("cifar10-subset").test_x, embedded.test_x)  # from the cache


@pytest.mark.slow
def test_real_fashion_mnist(shared_data):
    data = load_dataset(shared_data / "fashion-mnist")
    assert data.name == "fashion-mnist" and data.classes == FASHION_MNIST_CLASSES
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert data.mean[0] == pytest.approx(0.2860, abs=1e-3)
