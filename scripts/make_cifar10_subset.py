#!/usr/bin/env python3
"""Rebuild ``src/stpnet/data/cifar10_subset.tar.gz``, the small CIFAR-10 (JPEG q75) shipped with stpnet.

It holds, for each of the 10 classes, the first 500 training and the first 100 test JPEGs by
sorted file name from the shared copy ``shared/data/cifar10-jpeg.tar.gz`` (ImageFolder layout
``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``). The JPEG bytes are copied unchanged (no
re-encoding). The output is byte-for-byte reproducible: members are sorted, and every tar and
gzip timestamp and owner field is fixed.

Usage::

    python scripts/make_cifar10_subset.py [--source PATH] [--output PATH] [--train N] [--test N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUTPUT = REPO / "src" / "stpnet" / "data" / "cifar10_subset.tar.gz"


def read_image_folder(source: Path) -> dict:
    """``{(split, class): {file name: bytes}}`` for every ``<split>/<class>/<file>`` member."""
    found: dict = {}
    with tarfile.open(source, "r:*") as tf:
        for member in tf:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if member.isfile() and len(parts) == 3 and parts[0] in ("train", "test"):
                found.setdefault((parts[0], parts[1]), {})[parts[2]] = tf.extractfile(member).read()
    return found


def build_subset(source: Path, output: Path, per_class: dict) -> None:
    """Write the deterministic ImageFolder tarball with ``per_class[split]`` images per class."""
    found = read_image_folder(source)
    classes = sorted({cls for split, cls in found if split == "train"})
    if len(classes) != 10:
        raise SystemExit(f"{source}: expected 10 class folders under train/, found {classes}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for split in ("train", "test"):
            for cls in classes:
                files = found.get((split, cls), {})
                names = sorted(files)[: per_class[split]]
                if len(names) < per_class[split]:
                    raise SystemExit(f"{source}: {split}/{cls}/ has {len(files)} images, need {per_class[split]}")
                for name in names:
                    data = files[name]
                    info = tarfile.TarInfo(f"{split}/{cls}/{name}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="ImageFolder tarball of CIFAR-10")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the subset")
    parser.add_argument("--train", type=int, default=500, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    args = parser.parse_args()
    build_subset(args.source, args.output, {"train": args.train, "test": args.test})
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()
