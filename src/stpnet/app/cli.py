"""The ``stpnet`` command line: a thin layer over the library.

Subcommands: train, compress, eval, decompose, report, demo. Each has ``--help``. Errors in the
input (bad arguments, missing or corrupt data, mismatched checkpoints) print one clear line to
stderr and exit with status 2; checkpoints are written atomically, so nothing written is lost.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from .._atomic import atomic_path, atomic_write_text, check_output_path
from .demo import DEMO_FINE_TUNE_EPOCHS, DEMO_FORMATS
from .progress import ProgressBar

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked
    fcntl = None

__all__ = ["main", "build_parser"]

from ..formats import FORMATS
from ..nn.layouts import LAYOUTS

FORMAT_CHOICES = tuple(FORMATS)

#: The file in a run directory that a running ``train`` or ``compress`` holds locked (its pid inside).
LOCK_NAME = ".stpnet.lock"

#: The CLI's default number of calibration images (fewer where the training set has fewer).
DEFAULT_CALIBRATION_IMAGES = 512


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), as the commands'."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------- arguments
def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="cifar10-subset",
                   help="'cifar10-subset' (embedded, default), or a path: CIFAR-10 python batches, an "
                        "ImageFolder directory or .tar(.gz), or an MNIST/Fashion-MNIST IDX directory")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda[:N]'")


def _add_factorization(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--format", choices=(FORMAT_CHOICES if required else ("dense", *FORMAT_CHOICES)),
                   required=required, default=None if required else "dense",
                   help="tensor format of the compressed layers" + ("" if required else " (default dense)"))
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, help="one rank for every factorized layer")
    group.add_argument("--compression", type=float, help="target compression factor of the whole model")
    p.add_argument("--t", type=int, help="STP factor (default 1 classic, 2 semi-tensor)")
    p.add_argument("--layout", choices=tuple(LAYOUTS), help="tensorization layout (each format lists the ones it supports)")


def _add_training(p: argparse.ArgumentParser, default_epochs: int, default_lr: float = 0.1) -> None:
    p.add_argument("--run-dir", required=True, help="folder for checkpoint.pt, metrics.jsonl and report.json; "
                                                    "an existing checkpoint there is resumed. Created once the "
                                                    "arguments are checked, and locked while the command runs "
                                                    "(a second command on it exits with status 2)")
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=default_lr, help=f"peak learning rate (default {default_lr})")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="SGD with Nesterov momentum (default, the CNN recipe) or AdamW (transformers)")
    p.add_argument("--schedule", choices=("cosine", "multistep", "constant"), default="cosine")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value")
    p.add_argument("--no-augment", action="store_true", help="no random crop and flip")
    p.add_argument("--train-subset", type=int, help="train on this many samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision: 'auto' on CUDA only (default), 'bf16' on any device (much "
                        "faster on CPUs with AMX/AVX512-BF16), 'fp16', or 'off'")
    p.add_argument("--no-amp", action="store_true", help="same as --amp off")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout on every device (default: on CUDA only; on some CPUs it is faster, "
                        "on others its backward pass was seen to hang: TrainConfig.channels_last)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _config(args):
    from ..train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       nesterov=not args.no_nesterov, weight_decay=args.weight_decay, optimizer=args.optimizer,
                       schedule=args.schedule,
                       warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
                       grad_clip=args.grad_clip, augment=not args.no_augment, seed=args.seed, amp="off" if args.no_amp else args.amp,
                       train_subset=args.train_subset, channels_last=True if args.channels_last else None)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported; valid: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_dir(path: str, flag: str) -> Path:
    """Check, creating nothing, that ``path`` is a writable directory or can be created as one:
    the nearest existing folder on the way takes a probe file (the only check that holds for root
    and read-only mounts alike)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is a file, not a directory")
    existing = next(a for a in (p, *p.parents) if a.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {p} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {p} cannot be written ({exc.strerror or exc})") from None
    return p


def _writable_dir(path: str, flag: str) -> Path:
    """Check that ``path`` is (or can be created as) a writable directory, and create it."""
    p = _check_dir(path, flag)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {p} cannot be written ({exc.strerror or exc})") from None
    return p


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock file (:data:`LOCK_NAME`, holding this process's pid) while the block
    runs. The lock is an ``flock`` on the file, released when the block ends or the process dies,
    so a killed run leaves no stale lock.

    Raises
    ------
    ValueError
        If another process holds it, naming that process's pid.
    """
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ValueError(f"--run-dir {run_dir}: its lock file {path} cannot be written ({exc.strerror or exc})") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"--run-dir {run_dir} is in use by another stpnet process (pid {holder}); wait for it "
                             "to finish, or give another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _claim_run_dir(args) -> Path:
    """Create ``--run-dir`` and lock it for the rest of the command (after the arguments are
    validated: a rejected command creates nothing). A folder created here that the command leaves
    empty (it failed before writing anything) is removed again."""
    path = Path(args.run_dir)
    created = not path.exists()
    path = _writable_dir(args.run_dir, "--run-dir")
    if created:
        args.cleanup.callback(_remove_if_unused, path)
    args.cleanup.enter_context(run_dir_lock(path))
    return path


def _remove_if_unused(path: Path) -> None:
    """Remove the run directory ``path`` if it holds nothing but its lock file."""
    try:
        if [p.name for p in path.iterdir()] in ([], [LOCK_NAME]):
            (path / LOCK_NAME).unlink(missing_ok=True)
            path.rmdir()
    except OSError:
        pass


def _check_factorization_args(args) -> None:
    _check_count(args.rank, "--rank")
    _check_count(args.t, "--t")
    if args.compression is not None and not args.compression > 1:
        raise ValueError(f"--compression is the whole model's factor and must be > 1, got {args.compression}")


def _check_count(value, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def _check_training_args(args) -> None:
    """The training settings, checked before anything is created (TrainConfig's own checks)."""
    _check_count(args.epochs, "--epochs", 0)
    if args.epochs > 0:
        _config(args)


def _writable_file(path: str, flag: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a directory; give a file path")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {p}: the folder {p.parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=p.parent):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {p} cannot be written ({exc.strerror or exc})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {p} cannot be written")
    return p


def _load_data(spec: str):
    from ..data import load_dataset

    return load_dataset(spec)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: such a value is written as null."""
    return value if math.isfinite(value) else None


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _train_loop(args, spec, data, model=None, extra=None, teacher=None):
    from .pipeline import train_spec

    config = _config(args)
    if teacher is not None:
        config = dataclasses.replace(config, distill_alpha=args.distill_alpha,
                                     distill_temperature=args.distill_temperature,
                                     distill_features=args.distill_features)
    bar = None if args.quiet else ProgressBar(config.epochs)
    model, history = train_spec(spec, data, config, args.run_dir, model=model, device=_device(args.device),
                                on_step=bar.step if bar else None, on_epoch=bar.epoch if bar else None,
                                extra_metadata=extra, teacher=teacher)
    return model, history


def _save_report(run_dir: str, report, history) -> None:
    out = {"report": report.to_dict(), "final": history[-1] if history else None}
    atomic_write_text(Path(run_dir, "report.json"), json.dumps(out, indent=1), "report")


# ---------------------------------------------------------------------------- subcommands
def _cmd_train(args) -> int:
    from ..compress import compress, model_report
    from ..model_spec import ModelSpec

    _check_dir(args.run_dir, "--run-dir")
    _device(args.device)
    _check_training_args(args)
    _check_factorization_args(args)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.format != "dense" and args.rank is None and args.compression is None:
        raise ValueError("--format needs --rank or --compression")
    data = _load_data(args.data)
    c, h, w = data.train_x.shape[1:]
    spec = ModelSpec(args.model, c, data.num_classes)
    model = None
    _claim_run_dir(args)
    if args.format != "dense":
        dense = spec.build()
        model, report = compress(dense, args.format, rank=args.rank, compression=args.compression, t=args.t,
                                 layout=args.layout, init="random")
        spec = ModelSpec(args.model, c, data.num_classes, args.format, args.t, args.layout, report.ranks)
    model, history = _train_loop(args, spec, data, model)
    report = model_report(model.cpu(), (1, c, h, w), dense_params=sum(
        p.numel() for p in ModelSpec(args.model, c, data.num_classes).build().parameters()))
    _save_report(args.run_dir, report, history)
    final = history[-1]
    print(f"{spec.name} {spec.format}: {report.params:,} parameters ({report.compression:.2f}x), "
          f"test accuracy {final['test_accuracy']:.2%} after {final['epoch']} epochs")
    return 0


def _cmd_compress(args) -> int:
    from .pipeline import calibration_images, compress_trained, load_trained, normalized_like

    _check_dir(args.run_dir, "--run-dir")
    _device(args.device)
    _check_training_args(args)
    _check_factorization_args(args)
    if args.calibration_images is not None and args.calibration_images < 2:
        raise ValueError(f"--calibration-images {args.calibration_images}: the calibration batch needs an int >= 2 "
                         "images")
    _check_count(args.n_iter, "--n-iter", 0)
    _check_count(args.fit_steps, "--fit-steps", 0)
    if args.distill and args.epochs == 0:
        raise ValueError("--distill fine-tunes with the dense network as teacher; give --epochs N > 0")
    if args.distill_features and not args.distill:
        raise ValueError("--distill-features matches the dense network's block outputs while fine-tuning; "
                         "add --distill (and --epochs N > 0)")
    model, spec, state = load_trained(args.checkpoint)
    data = _load_data(args.data)
    c, h, w = data.train_x.shape[1:]
    if (c, data.num_classes) != (spec.in_channels, spec.num_classes):
        raise ValueError(f"the checkpoint's model takes {spec.in_channels} channels and {spec.num_classes} "
                         f"classes, but the data has {c} channels and {data.num_classes} classes")
    if args.rank is None and args.compression is None:
        raise ValueError("compress needs --rank or --compression")
    data = normalized_like(data, state)
    allocation, fit_steps, bn_mode = args.allocation, args.fit_steps, args.bn_recalibrate
    if args.recover:  # the recommended recovery, each part overridable
        allocation = "weight" if allocation is None else allocation
        fit_steps = 100 if fit_steps is None else fit_steps
        if bn_mode is None and args.epochs > 0:  # fine-tuning runs BatchNorm on batch statistics
            bn_mode = "keep-function"
    bn = {None: False, "off": False, "estimate": True, "keep-function": "keep_function"}[bn_mode]
    keep_function = bn == "keep_function"  # on augmented images: bn_calibration of the recovery (below)
    allocation = allocation or "uniform"
    if allocation != "uniform" and args.compression is None:
        raise ValueError(f"--allocation {allocation} shares a --compression target among the layers; give "
                         "--compression instead of --rank")
    fit_steps = fit_steps or 0
    n_train = len(data.train_y)
    if args.calibration_images is None:
        args.calibration_images = min(DEFAULT_CALIBRATION_IMAGES, n_train)
    elif args.calibration_images > n_train:
        raise ValueError(f"--calibration-images {args.calibration_images} is more than the {n_train} training images "
                         f"of {args.data}; give at most {n_train}")
    if args.calibration_images < 2:
        raise ValueError(f"the calibration batch needs >= 2 images; {args.data} has {n_train} training images")
    _claim_run_dir(args)
    calibration = calibration_images(data, args.calibration_images, args.seed) if (
        fit_steps or bn or allocation == "activation") else None
    # keep_function: the statistics of what training will feed the network, augmented images (docs/accuracy.md)
    augmented = calibration_images(data, args.calibration_images, args.seed, augment=True) if keep_function else None
    small, new_spec, report = compress_trained(model, spec, args.format, rank=args.rank,
                                               compression=args.compression, t=args.t, layout=args.layout,
                                               n_iter=args.n_iter, input_shape=(1, c, h, w), allocation=allocation,
                                               calibration=calibration, fit_steps=fit_steps,
                                               fit_unit=args.fit_unit, recalibrate_bn=bn, bn_calibration=augmented,
                                               t_choices=args.t_choices)
    print(report.to_markdown())
    if keep_function:
        print(f"BatchNorm: statistics moved to the network's own on {calibration.shape[0]} augmented calibration "
              "images, weights rescaled to keep the function")
    made = {"source": str(args.checkpoint), "format": args.format, "compression_target": args.compression,
            "rank": args.rank, "t": args.t, "t_choices": args.t_choices, "allocation": allocation,
            "fit_steps": fit_steps,
            "fit_unit": args.fit_unit if fit_steps else None,
            "bn_recalibrated": bn, "bn_calibration": "augmented" if keep_function else ("plain" if bn else None),
            "calibration_images": None if calibration is None else int(calibration.shape[0]),
            "distill": bool(args.distill), "distill_alpha": args.distill_alpha if args.distill else 0.0,
            "distill_temperature": args.distill_temperature,
            "distill_features": args.distill_features, "fine_tune_epochs": args.epochs}
    history = []
    if args.epochs > 0:
        small, history = _train_loop(args, new_spec, data, small, extra={"source": str(args.checkpoint),
                                                                        "made_by": made},
                                     teacher=model if args.distill else None)
    else:
        from ..train import save_checkpoint

        save_checkpoint({"model": small.state_dict(), "epoch": 0,
                         "metadata": {"spec": new_spec.to_dict(), "source": str(args.checkpoint), "made_by": made,
                                      "preprocessing": {"mean": list(data.mean), "std": list(data.std)}}},
                        Path(args.run_dir) / "checkpoint.pt")
    _save_report(args.run_dir, report, history)
    acc = f", test accuracy {history[-1]['test_accuracy']:.2%}" if history else ""
    print(f"compressed to {report.params:,} parameters ({report.compression:.2f}x){acc}")
    return 0


def _cmd_eval(args) -> int:
    from .pipeline import load_trained, normalized_like
    from ..train import evaluate

    device = _device(args.device)
    _check_count(args.batch_size, "--batch-size")
    model, spec, state = load_trained(args.checkpoint, device=device)
    data = _load_data(args.data)
    if (data.train_x.shape[1], data.num_classes) != (spec.in_channels, spec.num_classes):
        raise ValueError(f"the checkpoint's model takes {spec.in_channels} channels and {spec.num_classes} "
                         f"classes, but {args.data} has {data.train_x.shape[1]} and {data.num_classes}")
    data = normalized_like(data, state)
    result = evaluate(model, data.test_x, data.test_y, data.mean, data.std, batch_size=args.batch_size, device=device)
    print(json.dumps({"checkpoint": str(args.checkpoint), "model": spec.name, "format": spec.format,
                      "test_accuracy": _finite_or_none(result["accuracy"]),
                      "test_loss": _finite_or_none(result["loss"]), "test_samples": len(data.test_y)},
                     allow_nan=False))
    return 0


def _cmd_decompose(args) -> int:
    import numpy as np
    import torch

    from ..decomposition import decompose, relative_error

    if args.output:
        _writable_file(args.output, "--output")
    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give a .npy or .pt file holding one tensor")
    if path.suffix == ".npy":
        try:
            X = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from None
    elif path.suffix in (".pt", ".pth"):
        try:
            X = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable torch file: {exc}") from None
        if not isinstance(X, torch.Tensor):
            raise ValueError(f"{path} holds a {type(X).__name__}, not a tensor")
        if X.layout != torch.strided:
            raise ValueError(f"{path} holds a {X.layout} tensor; decompose takes dense tensors (call .to_dense())")
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; valid: .npy, .pt")
    if X.is_complex():
        raise ValueError(f"{path} holds a complex tensor ({X.dtype}); the decompositions take real tensors")
    if not X.is_floating_point():
        X = X.double()
    start = time.perf_counter()
    result = decompose(X, args.format, rank=args.rank, t=args.t, tol=args.tol, max_params=args.max_params,
                       n_iter=args.n_iter)
    seconds = time.perf_counter() - start
    error = relative_error(X, result)
    _print_table(["format", "shape", "rank", "t", "params", "compression", "rel. error", "time (s)"],
                 [[result.format, "x".join(map(str, result.shape)), ",".join(map(str, result.rank)), result.t,
                   f"{result.num_params:,}", f"{result.compression_ratio:.2f}x", f"{error:.3e}", f"{seconds:.3f}"]])
    if args.output:
        with atomic_path(args.output, "--output") as partial:
            torch.save({"format": result.format, "t": result.t, "shape": result.shape, "rank": result.rank,
                        "factors": [f.detach() for f in ([result.core] if hasattr(result, "core") else [])
                                    + result.factors]}, partial)
        print(f"factors written to {args.output}")
    return 0


def _cmd_report(args) -> int:
    from ..compress import model_report
    from ..models import MODELS, build_model
    from .pipeline import inference_latency, load_trained

    if args.input_shape is not None:
        try:
            parsed = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            parsed = ()
        if len(parsed) < 2 or any(v < 1 for v in parsed):
            raise ValueError(f"--input-shape {args.input_shape!r} must be positive integers N,C,... such as 1,3,32,32")
    if args.latency and any(b < 1 for b in args.latency):
        raise ValueError(f"--latency takes batch sizes >= 1, got {args.latency}")
    if args.target in MODELS:
        shape = tuple(int(v) for v in (args.input_shape or "1,3,32,32").split(","))
        model = build_model(args.target, in_channels=shape[1], num_classes=args.num_classes)
        name = args.target
    else:
        model, spec, _ = load_trained(args.target)
        shape = (1, spec.in_channels, 32 if spec.name != "lenet5" else 28, 32 if spec.name != "lenet5" else 28)
        if args.input_shape:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        name = f"{spec.name} ({spec.format})"
    dense = None
    if args.target not in MODELS:
        dense = sum(p.numel() for p in build_model(spec.name, in_channels=spec.in_channels,
                                                   num_classes=spec.num_classes).parameters())
    report = model_report(model, shape, dense_params=dense)
    print(f"{name}, input {tuple(shape)}\n")
    print(report.to_markdown())
    if args.latency:
        for batch in args.latency:
            sec = inference_latency(model, (batch, *shape[1:]))
            print(f"inference latency, batch {batch}: {sec * 1e3:.2f} ms")
    return 0


def _cmd_export(args) -> int:
    import torch

    from ..deploy.export import FORMATS, export
    from .pipeline import load_trained

    output = check_output_path(args.output, "--output")
    if output.suffix not in FORMATS:
        raise ValueError(f"export writes {', '.join(sorted(FORMATS))} files; got --output {output.name!r}")
    _check_dir(str(output.parent), "--output folder")
    _check_count(args.batch, "--batch")
    if args.batch > MAX_EXPORT_BATCH:
        raise ValueError(f"--batch {args.batch} is larger than an example batch needs; give 1 to {MAX_EXPORT_BATCH} "
                         "(the ONNX batch is dynamic)")
    if args.input_size is not None and not MIN_EXPORT_SIZE <= args.input_size <= MAX_EXPORT_SIZE:
        raise ValueError(f"--input-size {args.input_size} would check a degenerate image; give {MIN_EXPORT_SIZE} to "
                         f"{MAX_EXPORT_SIZE} (default: the size the model was trained on)")
    source = Path(args.checkpoint)
    if not args.force and output.exists() and source.exists() and os.path.samefile(output, source):
        raise ValueError(f"--output {output} is the checkpoint being exported; the export would replace it: give "
                         "another --output (or --force)")
    model, spec, _ = load_trained(args.checkpoint)
    size = args.input_size or (28 if spec.name == "lenet5" else 32)
    example = torch.randn(args.batch, spec.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    result = export(model.float(), output, example, fuse_layers=not args.no_fuse,
                    fold_batchnorm=args.fold_batchnorm, force=args.force)
    check = ("not checked (onnxruntime is not installed)" if result.max_abs_difference is None
             else f"max |difference| {result.max_abs_difference:.2e} against PyTorch")
    print(f"wrote {result.path} ({result.format}, {result.params:,} parameters, "
          f"{'fused' if not args.no_fuse else 'as trained'}"
          f"{', BatchNorm folded' if args.fold_batchnorm else ''}); {check}")
    return 0


#: ``stpnet export``'s example: image sides that give every zoo network's last stage a map of at
#: least 2 x 2 (ResNets halve 32 twice), and a batch no larger than a check needs.
MIN_EXPORT_SIZE, MAX_EXPORT_SIZE, MAX_EXPORT_BATCH = 8, 4096, 4096


def _cmd_demo(args) -> int:
    from .demo import run_compression_demo, run_demo

    progress = None if args.quiet else sys.stderr
    if args.from_scratch:
        rows, plot = run_demo(epochs=args.epochs, rank=args.rank, out_dir=args.out_dir, seed=args.seed,
                              progress=progress, train_subset=args.train_subset)
        print()
        _print_table(["format", "parameters", "compression", "test accuracy", "training time (s)"],
                     [[r["format"], f"{r['params']:,}", f"{r['compression']:.2f}x", f"{r['accuracy']:.2%}",
                       f"{r['train_seconds']:.1f}"] for r in rows])
    else:
        epochs = DEMO_FINE_TUNE_EPOCHS if args.epochs is None else args.epochs
        rows, plot = run_compression_demo(args.formats, args.compression, args.out_dir, args.seed, progress,
                                          fine_tune_epochs=epochs, train_subset=args.train_subset)
        print()
        pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
        _print_table(["network", "parameters", "compression", "straight after compression",
                      "after allocation + fit (no epoch)", f"after {epochs} distilled epoch{'s' * (epochs != 1)}",
                       "time (s)"],
                     [[r["format"] + (f" (shipped; {r['full_test_accuracy']:.2%} on the full test set)"
                                      if "full_test_accuracy" in r else ""),
                       f"{r['params']:,}", f"{r['compression']:.2f}x", pct(r["plain"]),
                       pct(r["recovered"]), f"{r['accuracy']:.2%}", f"{r['seconds']:.1f}"] for r in rows])
    if plot:
        print(f"\nplot: {plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stpnet", description="Compress neural networks with semi-tensor "
                                     "product tensor decompositions (STTu, STT, STR; Tucker, TT, TR).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model, dense or compressed from scratch",
                       description="Train a zoo model, dense or with factorized layers initialised fresh.")
    from ..models import MODELS

    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    _add_data(p)
    _add_factorization(p, required=False)
    _add_training(p, default_epochs=10)
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("compress", help="compress a trained checkpoint, then fine-tune it",
                       description="Factorize a trained dense checkpoint through the decompositions, "
                                   "then fine-tune (--epochs 0 to skip).")
    p.add_argument("checkpoint", help="checkpoint.pt written by 'stpnet train', or a shipped network "
                                      "such as resnet20-cifar10")
    _add_data(p)
    _add_factorization(p, required=True)
    p.add_argument("--n-iter", type=int, default=0, help="refinement sweeps (HOOI / ALS) of the fit")
    rec = p.add_argument_group("recovery", "keep the trained network's accuracy (--recover turns on the "
                               "recommended set for fine-tuning afterwards: --allocation weight --fit-steps 100)")
    rec.add_argument("--recover", action="store_true",
                     help="allocate ranks (--allocation weight), fit the layers to the dense activations "
                          "(--fit-steps 100) and, with --epochs N > 0, --bn-recalibrate keep-function")
    rec.add_argument("--allocation", choices=("uniform", "weight", "activation"), default=None,
                     help="how --compression is shared among layers (default uniform; weight with --recover: "
                          "on ResNet-20 uniform ranks recovered more without fine-tuning, weight-allocated "
                          "ones more after it, BENCHMARKS.md)")
    rec.add_argument("--t-choices", type=int, nargs="+", default=None, metavar="T",
                     help="semi-tensor formats with --allocation weight/activation (or --recover): the STP "
                          "factors each layer may take, chosen per layer with its ranks (e.g. 1 2 4; not with --t)")
    rec.add_argument("--fit-steps", type=int, default=None,
                     help="L-BFGS iterations per layer fitting the dense activations (default 0; 100 with --recover)")
    rec.add_argument("--fit-unit", choices=("block", "layer"), default="block",
                     help="fit each block's factorized layers together to the dense block's output (default; "
                          "every residual block of a ResNet), or each factorized layer to its dense output")
    rec.add_argument("--bn-recalibrate", nargs="?", const="estimate", choices=("off", "estimate", "keep-function"),
                     default=None,
                     help="re-estimate BatchNorm statistics: 'estimate' (the flag alone) helps a plain "
                          "decomposition but after fitting, which targets the dense statistics, measured worse; "
                          "'keep-function' also rescales each BatchNorm's weight and bias so the network computes "
                          "the same function, with statistics that training-mode batches then match (measured on "
                          "augmented calibration images; the default of --recover with --epochs N > 0); 'off' "
                          "neither (BENCHMARKS.md)")
    rec.add_argument("--calibration-images", type=int, default=None,
                     help=f"training images for the data-aware steps (default {DEFAULT_CALIBRATION_IMAGES}, or all "
                          "where the training set has fewer; more than it has is an error)")
    rec.add_argument("--distill", action="store_true", help="fine-tune with the dense network as teacher")
    rec.add_argument("--distill-alpha", type=float, default=0.9, help="weight of the distillation term (default 0.9)")
    rec.add_argument("--distill-temperature", type=float, default=4.0, help="softening temperature (default 4)")
    rec.add_argument("--distill-features", type=float, default=0.0, metavar="WEIGHT",
                     help="with --distill, also match the dense network's block outputs (every residual block of "
                          "a ResNet), with this weight on the relative squared error (default 0: logits only)")
    _add_training(p, default_epochs=5, default_lr=0.01)
    p.set_defaults(run=_cmd_compress)

    p = sub.add_parser("eval", help="test accuracy of a checkpoint", description="Evaluate a checkpoint.")
    p.add_argument("checkpoint", help="checkpoint.pt, or a shipped network such as resnet20-cifar10")
    _add_data(p)
    p.add_argument("--batch-size", type=int, default=500)
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser("decompose", help="decompose a tensor file (.npy or .pt)",
                       description="Decompose a tensor stored in a .npy or .pt file and print the result.")
    p.add_argument("file")
    p.add_argument("--format", choices=FORMAT_CHOICES, required=True)
    p.add_argument("--rank", type=int)
    p.add_argument("--tol", type=float, help="relative error target")
    p.add_argument("--max-params", type=int, help="parameter budget")
    p.add_argument("--t", type=int)
    p.add_argument("--n-iter", type=int, default=0, help="HOOI / ALS refinement sweeps")
    p.add_argument("--output", help="write the factors to this .pt file")
    p.set_defaults(run=_cmd_decompose)

    p = sub.add_parser("report", help="parameters, FLOPs and latency of a model or checkpoint",
                       description="Per-layer parameters, compression and multiply-adds of a zoo model "
                                   "name or a checkpoint, and optionally inference latency.")
    p.add_argument("target", help="a zoo model name, a checkpoint.pt, or a shipped network such as "
                                  "resnet20-cifar10")
    p.add_argument("--input-shape", default=None,
                   help="N,C,H,W of one input (default: what the checkpoint's model takes; 1,3,32,32 for a zoo name)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--latency", type=int, nargs="*", help="batch sizes to time inference at (e.g. 1 128)")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("export", help="write a checkpoint as ONNX or TorchScript, fused for deployment",
                       description="Export a checkpoint (or a shipped network) to ONNX (.onnx) or TorchScript "
                                   "(.pt/.ts). Factorized layers are fused first (stpnet.fuse): fixed chains of "
                                   "standard ops on the compressed factors. The export is checked against "
                                   "PyTorch on a random batch (ONNX Runtime for ONNX).")
    p.add_argument("checkpoint", help="checkpoint.pt, or a shipped network such as resnet20-cifar10")
    p.add_argument("--output", required=True, help="the file to write: .onnx, .pt or .ts")
    p.add_argument("--no-fuse", action="store_true", help="export the factorized layers as they are")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="fold each BatchNorm that follows a convolution into it (stpnet.fold_batchnorm)")
    p.add_argument("--input-size", type=int,
                   help=f"image side ({MIN_EXPORT_SIZE} to {MAX_EXPORT_SIZE}; default: 32, 28 for LeNet-5)")
    p.add_argument("--batch", type=int, default=1, help="batch of the example input (the ONNX batch is dynamic)")
    p.add_argument("--force", action="store_true",
                   help="replace --output even where it is an stpnet checkpoint (refused otherwise)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("demo", help="compress the shipped trained ResNet-20 ~9x and recover its accuracy",
                       description="Show the shipped compressed ResNet-20s beside the dense one, then compress the shipped "
                                   "trained ResNet-20 about 9x in TT and STT and recover "
                                   "each (rank allocation, fitting to the dense activations, a distilled fine-tune "
                                   "on the embedded CIFAR-10 subset), print a table and save a plot. "
                                   "--from-scratch trains dense, TT and STT from scratch instead.")
    p.add_argument("--from-scratch", action="store_true", help="train dense, TT and STT from scratch instead")
    p.add_argument("--formats", nargs="+", choices=FORMAT_CHOICES, default=list(DEMO_FORMATS),
                   help=f"formats to compress to (default {' '.join(DEMO_FORMATS)})")
    p.add_argument("--compression", type=float, default=9.0, help="whole-model factor (default 9)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"fine-tuning epochs per format (default {DEMO_FINE_TUNE_EPOCHS}), or with --from-scratch "
                        "training epochs (5)")
    p.add_argument("--rank", type=int, default=8, help="rank of TT and STT with --from-scratch")
    p.add_argument("--out-dir", default="stpnet-demo", help="where the plot and logs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, help="train on this many images of the subset (quick checks)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stpnet`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..train import TrainingDivergedError

    try:
        with contextlib.ExitStack() as cleanup:  # run-directory locks, released however the command ends
            args.cleanup = cleanup
            return args.run(args)
    except (ValueError, MemoryError, OSError, ImportError, TrainingDivergedError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line
        print(f"stpnet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stpnet {args.command}: interrupted; the last epoch's checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
