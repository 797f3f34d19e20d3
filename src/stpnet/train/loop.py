"""The training loop: SGD, schedules, augmentation, evaluation, atomic checkpoints and exact resume."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset, iterate_batches, normalize, training_augment
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distill import distillation_loss, feature_distillation_loss
from .features import FeatureTaps, distillation_points, modules_named
from .distributed import DistributedContext, all_reduce_sum, setup_distributed
from .metrics import MetricsLog

__all__ = ["Trainer", "TrainingDivergedError", "amp_dtype", "resolve_amp", "evaluate", "lr_at", "default_device"]

# settings that must match for a resumed run to continue the same run (epochs may grow)
_RESUME_KEYS = ("batch_size", "lr", "momentum", "nesterov", "weight_decay", "optimizer", "schedule", "milestones", "gamma",
                "warmup_epochs", "label_smoothing", "grad_clip", "augment", "seed", "train_subset", "distill_alpha",
                "distill_temperature", "distill_features", "distill_points")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the last finished epoch's checkpoint is kept."""


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bfloat16 where supported (no loss scaling needed), else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that :class:`TrainConfig` ``amp`` mode asks for on ``device``, or None for float32.

    ``'auto'`` is mixed precision on CUDA only (:func:`amp_dtype`); ``'bf16'`` and ``'fp16'`` apply on
    every device; ``'off'`` never.
    """
    if mode == "auto":
        return amp_dtype(device) if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def _grad_scaler(enabled: bool):
    """A CUDA gradient scaler (float16 autocast); a disabled one passes every call through."""
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is not None:
        return scaler_cls("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Learning rate at a global step: linear warm-up, then the schedule (a pure function of step)."""
    total = config.epochs * steps_per_epoch
    warm = config.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "cosine":
        progress = (step - warm) / max(total - warm, 1)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(progress, 1.0)))
    if config.schedule == "multistep":
        epoch = step / steps_per_epoch
        passed = sum(epoch >= m * config.epochs for m in config.milestones)
        return config.lr * config.gamma**passed
    return config.lr


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout for image batches; other ranks (1-D signals, volumes) are left as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _non_finite(model: nn.Module) -> list[str]:
    """Names of the model's parameters and floating buffers holding a NaN or infinity."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return [name for name, t in tensors if not bool(torch.isfinite(t).all())]


def _seed(config: TrainConfig, epoch: int, stream: int) -> int:
    return (config.seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, *, batch_size: int = 500,
             device: torch.device | None = None, ctx: DistributedContext = DistributedContext(),
             amp: bool | torch.dtype = False, channels_last: bool = False) -> dict[str, float]:
    """Loss and top-1 accuracy of ``model`` on uint8 images ``x`` with labels ``y``.

    ``amp`` is False (float32), True (:func:`amp_dtype` of the device) or an autocast dtype.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    dtype = amp if isinstance(amp, torch.dtype) else amp_dtype(device)
    totals = torch.zeros(3, dtype=torch.float64)
    for xb, yb in iterate_batches(x, y, batch_size, shuffle=False, seed=0, epoch=0, rank=ctx.rank,
                                  world_size=ctx.world_size):
        xb = normalize(xb, mean, std).to(device)
        if channels_last:
            xb = _channels_last(xb)
        yb = yb.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=amp is not False):
            logits = model(xb)
        totals += torch.tensor([F.cross_entropy(logits.float(), yb, reduction="sum").item(),
                                (logits.argmax(1) == yb).sum().item(), len(yb)], dtype=torch.float64)
    model.train(was_training)
    totals = all_reduce_sum(totals, ctx)
    return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2])}


class Trainer:
    """Train a model on an :class:`~stpnet.data.ImageDataset`, resumably.

    Parameters
    ----------
    model : nn.Module
    data : ImageDataset
    config : TrainConfig
    run_dir : path, optional
        Where ``checkpoint.pt`` (every epoch, atomically) and ``metrics.jsonl`` go. If it already
        holds a checkpoint of the same settings, :meth:`fit` resumes from it; the resumed run ends
        with the same weights as an uninterrupted one.
    device : torch.device, optional
        Default: CUDA if available, else CPU (the CPU fallback).
    metadata : dict, optional
        Stored in every checkpoint (for example how to rebuild the model).
    on_step : callable, optional
        ``on_step(epoch, step, steps_per_epoch, loss)`` after each optimizer step (progress bars).
    on_epoch : callable, optional
        ``on_epoch(record)`` after each epoch with its metrics record.
    teacher : nn.Module, optional
        A trained network over the same classes (for example the dense network a compressed one
        came from), run in eval mode without gradients on each batch; with
        ``config.distill_alpha > 0`` the loss distils its predictions, with
        ``config.distill_features > 0`` its intermediate outputs (block-wise).
    """

    def __init__(self, model: nn.Module, data: ImageDataset, config: TrainConfig, run_dir=None, *,
                 device: torch.device | str | None = None, metadata: dict[str, Any] | None = None,
                 on_step: Callable[[int, int, int, float], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, teacher: nn.Module | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        self.data = data
        self.config = config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.metadata = dict(metadata or {})
        # the preprocessing travels with the weights, so eval and compress normalize the same way
        self.metadata.setdefault("preprocessing", {"mean": list(data.mean), "std": list(data.std)})
        self.on_step, self.on_epoch = on_step, on_epoch
        distills = config.distill_alpha > 0 or config.distill_features > 0
        if distills and teacher is None:
            raise ValueError(f"distill_alpha={config.distill_alpha} and distill_features={config.distill_features} "
                             "need a teacher network (Trainer(teacher=...))")
        self.teacher = None
        self.distill_points: tuple[str, ...] = ()
        if teacher is not None and distills:
            self.teacher = teacher.to(self.device).eval()
            if config.distill_features > 0:
                self.distill_points = config.distill_points or distillation_points(model, teacher)
                modules_named(model, self.distill_points)  # names checked now, not mid-run
                modules_named(teacher, self.distill_points)
        autocast = resolve_amp(config.amp, self.device)
        self.amp = autocast is not None
        self.amp_dtype = autocast or torch.float32  # float16 on CUDA gets a GradScaler in fit()
        # channels_last on CUDA unless set: on CPUs only when asked for (TrainConfig.channels_last)
        self.channels_last = self.device.type == "cuda" if config.channels_last is None else config.channels_last
        self.train_x, self.train_y = data.train_x, data.train_y
        if config.train_subset is not None and config.train_subset < len(self.train_y):
            perm = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(config.seed))
            keep = perm[: config.train_subset].sort().values
            self.train_x, self.train_y = self.train_x[keep], self.train_y[keep]

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def _restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> tuple[int, int, list[dict]]:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return 0, 0, []
        state = load_checkpoint(path, map_location=self.device)
        saved = state.get("config", {})
        current = self.config.to_dict()
        diff = [k for k in _RESUME_KEYS if k in saved and saved[k] != current[k]]
        if diff:
            detail = ", ".join(f"{k}: {saved[k]} -> {current[k]}" for k in diff)
            raise CheckpointError(f"{path} holds a run with other settings ({detail}); resume with the same "
                                  "settings or use a new run directory")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not match this model: {str(exc).splitlines()[0]}") from None
        if "optimizer" not in state:  # weights only (e.g. `stpnet compress --epochs 0`): train them from epoch 0
            return 0, 0, []
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return int(state["epoch"]), int(state["step"]), list(state.get("history", []))

    def fit(self) -> list[dict]:
        """Train for ``config.epochs`` epochs (resuming if a checkpoint exists); return the history."""
        taps = (FeatureTaps(self.model, self.distill_points), FeatureTaps(self.teacher, self.distill_points)) \
            if self.distill_points else None
        try:
            return self._fit(taps)
        finally:
            for tap in taps or ():
                tap.remove()

    def _fit(self, taps: tuple[FeatureTaps, FeatureTaps] | None) -> list[dict]:
        cfg = self.config
        ctx = setup_distributed(self.device)
        model = self.model
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        scaler = _grad_scaler(self.amp and self.amp_dtype == torch.float16 and self.device.type == "cuda")
        start_epoch, step, history = self._restore(model, optimizer, scaler)
        train_model = model
        if ctx.enabled:
            ids = [ctx.local_rank] if self.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        log = MetricsLog(self.run_dir / "metrics.jsonl") if (self.run_dir and ctx.is_main) else None
        if log is not None:
            log.truncate_after(start_epoch)
        n = len(self.train_y)
        per_rank = math.ceil(n / ctx.world_size)
        steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
        mean, std = self.data.mean, self.data.std
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_seed(cfg, epoch, 1))  # dropout and other global-RNG users
                gen = torch.Generator().manual_seed(_seed(cfg, epoch, 2))
                train_model.train()
                sums = torch.zeros(3, dtype=torch.float64)
                for i, (xb, yb) in enumerate(iterate_batches(self.train_x, self.train_y, cfg.batch_size,
                                                             shuffle=True, seed=cfg.seed, epoch=epoch,
                                                             rank=ctx.rank, world_size=ctx.world_size)):
                    if cfg.augment:
                        xb = training_augment(xb, generator=gen)
                    xb = normalize(xb, mean, std).to(self.device, non_blocking=True)
                    if self.channels_last:
                        xb = _channels_last(xb)
                    yb = yb.to(self.device, non_blocking=True)
                    lr = lr_at(step, steps_per_epoch, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                        logits = train_model(xb)
                        if self.teacher is not None:
                            with torch.no_grad():
                                teacher_logits = self.teacher(xb)
                            if teacher_logits.shape != logits.shape:
                                raise ValueError(
                                    f"the teacher returns outputs of shape {tuple(teacher_logits.shape)} and the "
                                    f"model {tuple(logits.shape)} on the same batch: distillation needs a teacher "
                                    f"over the same classes ({logits.shape[-1]})")
                            loss = distillation_loss(logits, teacher_logits, yb, alpha=cfg.distill_alpha,
                                                     temperature=cfg.distill_temperature,
                                                     label_smoothing=cfg.label_smoothing)
                            if taps is not None:
                                loss = loss + cfg.distill_features * feature_distillation_loss(
                                    taps[0].collect(), taps[1].collect())
                        else:
                            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise TrainingDivergedError(
                            f"the training loss became {loss_value} at epoch {epoch + 1}, step {i + 1} "
                            f"(lr {lr:.4g}); the checkpoint of the last finished epoch is kept. Lower the "
                            "learning rate or clip gradients (TrainConfig.grad_clip, --grad-clip)")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    sums += torch.tensor([loss_value * len(yb), (logits.argmax(1) == yb).sum().item(), len(yb)],
                                         dtype=torch.float64)
                    if self.on_step is not None and ctx.is_main:
                        self.on_step(epoch, i + 1, steps_per_epoch, loss_value)
            train_time = time.perf_counter() - started
            sums = all_reduce_sum(sums, ctx)
            test = evaluate(model, self.data.test_x, self.data.test_y, mean, std, batch_size=cfg.eval_batch_size,
                            device=self.device, ctx=ctx, amp=self.amp_dtype if self.amp else False,
                            channels_last=self.channels_last)
            for tap in taps or ():
                tap.clear()
            record = {"epoch": epoch + 1, "train_loss": float(sums[0] / sums[2]),
                      "train_accuracy": float(sums[1] / sums[2]), "test_loss": test["loss"],
                      "test_accuracy": test["accuracy"], "lr": lr_at(step - 1, steps_per_epoch, cfg),
                      "epoch_time": train_time, "eval_time": time.perf_counter() - started - train_time}
            bad = _non_finite(model)
            if bad:
                raise TrainingDivergedError(
                    f"{len(bad)} parameter or buffer tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                    f"became NaN or infinite during epoch {epoch + 1} (lr {record['lr']:.4g}); the checkpoint of "
                    "the last finite epoch is kept. Lower the learning rate or clip gradients "
                    "(TrainConfig.grad_clip, --grad-clip)")
            history.append(record)
            if ctx.is_main:
                if self.checkpoint_path is not None:
                    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                     "epoch": epoch + 1, "step": step, "history": history,
                                     "config": cfg.to_dict(), "metadata": self.metadata}, self.checkpoint_path)
                if log is not None:
                    log.write(record)
                if self.on_epoch is not None:
                    self.on_epoch(record)
        return history
