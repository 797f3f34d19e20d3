"""Training and evaluation: the loop, checkpoints, metrics log and distributed set-up."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distill import distillation_loss, feature_distillation_loss
from .features import FeatureTaps, distillation_points
from .distributed import DistributedContext, setup_distributed
from .loop import Trainer, TrainingDivergedError, amp_dtype, default_device, evaluate, lr_at, resolve_amp
from .metrics import MetricsLog, read_metrics

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "amp_dtype",
    "resolve_amp",
    "evaluate",
    "distillation_loss",
    "feature_distillation_loss",
    "FeatureTaps",
    "distillation_points",
    "lr_at",
    "default_device",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "MetricsLog",
    "read_metrics",
    "DistributedContext",
    "setup_distributed",
]
