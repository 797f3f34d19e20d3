"""How to rebuild a (compressed) zoo model: stored in checkpoints so `eval`, `compress` and
`report` can reconstruct the architecture before loading the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .compress import compress
from .models import build_model

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo model name, its input/output sizes, and the factorization of its layers.

    Attributes
    ----------
    name : str
        A key of :data:`stpnet.models.MODELS`.
    in_channels, num_classes : int
    format : str
        'dense' or one of the six formats.
    t : int, dict or None
        One STP factor, or layer name -> t when it was chosen per layer (``t_choices``).
    layout : str or None
    ranks : dict
        Layer name -> ranks of each factorized layer (empty when dense).
    """

    name: str
    in_channels: int = 3
    num_classes: int = 10
    format: str = "dense"
    t: int | dict | None = None
    layout: str | None = None
    ranks: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The model with this architecture and fresh weights."""
        model = build_model(self.name, in_channels=self.in_channels, num_classes=self.num_classes)
        if self.format == "dense":
            return model
        ranks = {k: tuple(v) for k, v in self.ranks.items()}
        model, _ = compress(model, self.format, rank=ranks, t=self.t, layout=self.layout, init="random",
                            inplace=True)
        return model

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = {k: list(v) for k, v in self.ranks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["ranks"] = {k: tuple(v) for k, v in d.get("ranks", {}).items()}
        return cls(**d)
