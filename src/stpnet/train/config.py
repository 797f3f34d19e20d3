"""Training hyper-parameters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

__all__ = ["TrainConfig"]

SCHEDULES = ("cosine", "multistep", "constant")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (SGD with momentum, as in the CIFAR literature, or AdamW).

    Attributes
    ----------
    epochs, batch_size, lr, momentum, nesterov, weight_decay
        Optimizer settings; weight decay applies to every parameter (L2 in SGD, decoupled in
        AdamW); ``momentum`` and ``nesterov`` are SGD's.
    optimizer : {'sgd', 'adamw'}
        SGD with (Nesterov) momentum, the CNN recipe; or AdamW (Loshchilov and Hutter 2019, betas
        0.9 / 0.999), the usual choice for transformers.
    schedule : {'cosine', 'multistep', 'constant'}
        Learning-rate schedule, stepped every iteration (cosine) or at epoch ``milestones``
        (fractions of ``epochs``) with factor ``gamma``.
    warmup_epochs : float
        Linear warm-up from 0 at the start.
    label_smoothing : float
    grad_clip : float, optional
        Clip the global L2 norm of the gradients to this value before each step. Products of
        several factors (deep-linear structure) can make plain SGD blow up at learning rates
        the dense network tolerates; clipping keeps the step bounded (see BENCHMARKS.md,
        "Fashion-MNIST, from scratch"). ``None`` (default) does not clip.
    augment : bool
        Pad-4 random crop and horizontal flip (for 32x32 colour images).
    seed : int
        Seeds the model-independent randomness: data order, augmentation and dropout, per epoch,
        so that a resumed run matches an uninterrupted one.
    amp : {'auto', 'bf16', 'fp16', 'off'}
        Mixed precision. ``'auto'`` autocasts on CUDA only (bfloat16 where the GPU supports it,
        else float16 with loss scaling); ``'bf16'`` autocasts to bfloat16 on any device, which on
        CPUs with AMX or AVX512-BF16 makes a ResNet training step much faster (BENCHMARKS.md) and on
        CPUs without them is slower than float32; ``'fp16'`` float16 autocast (with loss scaling
        on CUDA); ``'off'`` full float32. ``True``/``False`` are read as ``'auto'``/``'off'``.
    channels_last : bool or None
        NHWC memory layout for 4-D inputs and weights. ``None`` (default): on CUDA only. ``True``
        asks for it on every device, ``False`` never. On CPUs it is used only when asked for:
        it was faster for CIFAR ResNets on some processors (BENCHMARKS.md), but on a 2-core AMD
        EPYC with AVX2 only (torch 2.13.0+cpu) the backward pass of a thin ResNet-20 in
        channels_last hung in oneDNN, likely an upstream oneDNN/OpenMP problem, while the
        contiguous layout finished at once. To check a machine before asking for it::

            import torch, torch.nn.functional as F
            from stpnet.models.resnet_cifar import resnet_cifar
            model = resnet_cifar(20, shortcut="B", widths=(5, 10, 20)).to(memory_format=torch.channels_last)
            x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            F.cross_entropy(model(x), torch.randint(0, 10, (128,))).backward()  # hung there

        (``bench/train_speed.py`` times both layouts on the machine at hand).
    train_subset : int, optional
        Train on the first ``train_subset`` samples of a fixed random permutation.
    distill_alpha, distill_temperature : float
        Knowledge distillation from a teacher network given to the :class:`Trainer`: the loss is
        ``(1 - alpha) * CE + alpha * T^2 * KL`` (:func:`stpnet.train.distillation_loss`);
        ``alpha = 0`` (default) trains on the labels alone.
    distill_features : float
        Weight of block-wise feature distillation: adds ``distill_features *``
        :func:`stpnet.train.feature_distillation_loss` between the student's and the teacher's
        outputs at ``distill_points`` to the loss. 0 (default) matches the logits only.
    distill_points : tuple of str
        Module names (in both networks) whose outputs are matched; empty (default) takes
        :func:`stpnet.train.distillation_points` (for a ResNet, every residual block).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    augment: bool = True
    seed: int = 0
    amp: str = "auto"
    channels_last: bool | None = None
    eval_batch_size: int = 500
    train_subset: int | None = None
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    distill_features: float = 0.0
    distill_points: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.amp, bool):  # settings written before the modes existed
            object.__setattr__(self, "amp", "auto" if self.amp else "off")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be True, False or None (CUDA only), got {self.channels_last!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES} (or a bool), got {self.amp!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_subset is not None and (isinstance(self.train_subset, bool) or
                                              not isinstance(self.train_subset, int) or self.train_subset < 1):
            raise ValueError(f"train_subset must be a positive number of samples (or None for all), "
                             f"got {self.train_subset}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if not (isinstance(self.distill_alpha, (int, float)) and 0 <= self.distill_alpha <= 1):
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (isinstance(self.distill_temperature, (int, float)) and math.isfinite(self.distill_temperature)
                and self.distill_temperature > 0):
            raise ValueError(f"distill_temperature must be a finite number > 0, got {self.distill_temperature}")
        if not (isinstance(self.distill_features, (int, float)) and math.isfinite(self.distill_features)
                and self.distill_features >= 0):
            raise ValueError(f"distill_features must be a finite number >= 0, got {self.distill_features}")
        if isinstance(self.distill_points, str) or not all(isinstance(n, str) and n for n in self.distill_points):
            raise ValueError(f"distill_points must be a sequence of module names, got {self.distill_points!r}")
        object.__setattr__(self, "distill_points", tuple(self.distill_points))
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        d["distill_points"] = list(self.distill_points)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["milestones"] = tuple(d.get("milestones", (0.5, 0.75)))
        d["distill_points"] = tuple(d.get("distill_points", ()))
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig settings {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)
