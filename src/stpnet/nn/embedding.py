"""FactorizedEmbedding: an embedding table held as a factorized tensor of any registered format."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FactorizedTensor
from .base import FORWARD_PATHS, FactorizedLayer, resolve_weight_compression
from .cost import PathCost

__all__ = ["FactorizedEmbedding"]


class FactorizedEmbedding(FactorizedLayer):
    """``nn.Embedding`` whose (num_embeddings x embedding_dim) table is a factorized tensor.

    The table is stored as the weight of a factorized Linear from ``num_embeddings`` to
    ``embedding_dim`` features (a token is the one-hot input it selects), tensorized with the same
    layouts. A lookup contracts only the factor slices of the requested tokens
    (:mod:`stpnet.functional.lookup`): the table is not formed, whatever the batch (but see the
    inference cache of small tables below). ``weight`` returns the table, as
    ``nn.Embedding.weight`` (rebuilt, cached in inference).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    padding_idx : int, optional
        Lookups of this index return zeros, which is what a trained ``nn.Embedding`` returns for
        it (its row starts at zero and receives no gradient). Negative values count from the end.
    format, rank, t, weight_compression, layout, in_modes, out_modes, n_modes, clip_ranks
        As in :class:`stpnet.nn.FactorizedLinear` (``in_modes`` factor the vocabulary,
        ``out_modes`` the embedding dimension).
    forward_path : str, default 'contract'
        Accepted for a signature uniform with the other layers (one of ``FORWARD_PATHS``) and
        otherwise ignored: a lookup has one path.

    Notes
    -----
    ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` of ``nn.Embedding`` are not supported:
    renormalising rows in place or sparse row gradients have no meaning for shared factors.

    In inference (eval mode, gradients off) a small table, of at most ``max_cached_table``
    entries (a position table, say), is rebuilt once and gathered from while the factors are
    unchanged: a contraction per call costs far more than a gather for a small table. Larger
    tables (vocabularies) are never formed.
    """

    #: The largest table (entries) that inference caches instead of contracting per call.
    max_cached_table: int = 1 << 16

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        format: str = "tt",
        rank: int | Sequence[int] | None = None,
        t: int | None = None,
        weight_compression: float | None = None,
        compression: float | None = None,
        layout: str | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_modes: int = 3,
        forward_path: str = "contract",
        clip_ranks: bool = False,
        device=None,
        dtype=None,
        weight: FactorizedTensor | None = None,
    ):
        if forward_path not in FORWARD_PATHS:
            raise ValueError(f"forward_path must be one of {FORWARD_PATHS}, got {forward_path!r}")
        if max_norm is not None:
            raise ValueError("max_norm is not supported by a factorized embedding (it renormalises table rows in "
                             "place, which shared factors cannot do); keep this embedding dense or drop max_norm")
        if scale_grad_by_freq or sparse:
            raise ValueError("scale_grad_by_freq=True and sparse=True are not supported by a factorized embedding "
                             "(its gradients are dense over shared factors)")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must lie in [{-num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        super().__init__(num_embeddings, embedding_dim, (), format=format, rank=rank, t=t,
                         weight_compression=resolve_weight_compression(weight_compression, compression),
                         layout=layout, in_modes=in_modes, out_modes=out_modes, n_modes=n_modes, bias=False,
                         forward_path="contract", clip_ranks=clip_ranks, device=device, dtype=dtype, weight=weight)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type = None, norm_type
        self.scale_grad_by_freq, self.sparse = False, False

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"format={self.format!r}, layout={self.tensorization.layout!r}, rank={self.rank}, t={self.t}")

    def dense_weight(self) -> torch.Tensor:
        """The table (num_embeddings, embedding_dim), rebuilt from the factors (differentiable)."""
        table = super().dense_weight().transpose(0, 1)
        if self.padding_idx is not None:
            keep = torch.ones(self.num_embeddings, 1, dtype=table.dtype, device=table.device)
            keep[self.padding_idx] = 0
            table = table * keep
        return table

    def _lookup(self, flat: torch.Tensor) -> torch.Tensor:
        return self.tensorization.layout.lookup(self, flat)

    def _check_range(self, flat: torch.Tensor) -> None:
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"embedding index out of range: indices must lie in [0, {self.num_embeddings}), got "
                             f"values from {int(flat.min())} to {int(flat.max())}")

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"embedding indices must be an integer tensor, got {indices.dtype}")
        if (not self.training and not torch.is_grad_enabled()
                and self.num_embeddings * self.embedding_dim <= self.max_cached_table):
            return self._gather(indices)
        flat = indices.reshape(-1).long()
        self._check_range(flat)
        rows = self._lookup(flat) if flat.numel() else self.weight_tensor.factors[0].new_zeros(0, self.embedding_dim)
        if self.padding_idx is not None:
            rows = rows * (flat != self.padding_idx).unsqueeze(1).to(rows.dtype)
        return rows.reshape(*indices.shape, self.embedding_dim)

    def _gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Inference on a small table: rows of the cached table (its padding row is zero), as
        ``nn.Embedding`` gathers them. On the CPU the gather checks the range itself (no
        reductions and reads of the indices before it), and its error is replaced by this
        layer's."""
        ids = indices if indices.dtype in (torch.int64, torch.int32) else indices.long()
        if ids.device.type != "cpu":
            self._check_range(ids.reshape(-1))
            return F.embedding(ids, self.weight)
        try:
            return F.embedding(ids, self.weight)
        except IndexError:
            self._check_range(ids.reshape(-1))
            raise

    # ------------------------------------------------------------------ costs
    def _per_token_macs(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        key = tuple(self.rank)
        cached = self.__dict__.get("_token_macs")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self._lookup(torch.zeros(1, dtype=torch.long, device=self.weight_tensor.device))
        macs = counter.get_total_flops() // 2
        self.__dict__["_token_macs"] = (key, macs)
        return macs

    def _path_costs(self, input_shape: tuple[int, ...]) -> dict[str, PathCost]:
        n = math.prod(input_shape)
        lookup = PathCost(macs=n * self._per_token_macs(), activations=n * self.embedding_dim,
                          peak=n * self.embedding_dim)
        return {"contract": lookup, "rebuild": lookup}

    def _contract_forward(self, x: torch.Tensor) -> torch.Tensor:  # the abstract path; forward is the lookup
        return self.forward(x)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    # ------------------------------------------------------------- from a dense layer
    @classmethod
    def from_dense(cls, layer: nn.Embedding, format: str = "tt", *, rank: int | Sequence[int] | None = None,
                   tol: float | None = None, weight_compression: float | None = None,
                   compression: float | None = None, t: int | None = None,
                   layout: str | None = None, in_modes: Sequence[int] | None = None,
                   out_modes: Sequence[int] | None = None, n_modes: int = 3, n_iter: int = 0,
                   forward_path: str = "contract") -> "FactorizedEmbedding":
        """A FactorizedEmbedding initialised from a trained ``nn.Embedding`` through the decompositions.

        Give one of ``rank``, ``tol`` or ``weight_compression`` (of the table). A non-zero ``padding_idx``
        row is dropped with a warning (the factorized lookup returns zeros for it). ``forward_path``
        is accepted for a uniform signature with the other layers and ignored: a lookup has one
        path.
        """
        if not isinstance(layer, nn.Embedding):
            raise ValueError(f"from_dense expects an nn.Embedding, got {type(layer).__name__}")
        if layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
            raise ValueError("nn.Embedding with max_norm, scale_grad_by_freq or sparse is not supported by a "
                             "factorized embedding")
        table = layer.weight.detach()
        if layer.padding_idx is not None and bool(table[layer.padding_idx].any()):
            warnings.warn(f"the padding_idx row ({layer.padding_idx}) of the embedding is not zero; the factorized "
                          "lookup returns zeros for it", stacklevel=2)
        return cls._from_trained(layer, table.transpose(0, 1), format, rank=rank, tol=tol,
                                 weight_compression=resolve_weight_compression(weight_compression, compression), t=t,
                                 layout=layout, in_modes=in_modes, out_modes=out_modes, n_modes=n_modes,
                                 n_iter=n_iter).train(layer.training)

    @classmethod
    def dense_layer_args(cls, dense: nn.Embedding) -> tuple:
        return dense.num_embeddings, dense.embedding_dim, dense.padding_idx
