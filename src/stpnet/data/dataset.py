"""`ImageDataset`: an in-memory image classification dataset with a train and a test split."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import torch

__all__ = ["ImageDataset"]


def _check_split(x: object, y: object, split: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{split}_x must be a uint8 tensor of shape N x C x H x W, got {got}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.ndim != 1:
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{split}_y must be a 1-D int64 tensor, got {got}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{split}_x holds {x.shape[0]} images but {split}_y holds {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError(f"the {split} split is empty; each split needs at least one image")


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images and labels of a classification dataset, held in memory as tensors.

    Parameters
    ----------
    train_x, test_x : torch.Tensor
        uint8 images, shape ``(N, C, H, W)``; both splits share ``C, H, W``.
    train_y, test_y : torch.Tensor
        int64 labels, shape ``(N,)``, each in ``range(len(classes))``.
    classes : tuple of str
        Class names; label ``k`` is ``classes[k]``.
    name : str
        A short name such as ``"cifar10"``.
    normalization : tuple of (mean, std), optional
        Fixed per-channel preprocessing in [0, 1] scale, for a model trained elsewhere (its
        checkpoint or card records it); by default :attr:`mean` and :attr:`std` are measured on
        this dataset's training images. See :meth:`with_normalization`.

    Raises
    ------
    ValueError
        If a tensor has the wrong dtype or shape, the splits disagree, or a label is out of range.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    name: str
    normalization: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None

    def __post_init__(self) -> None:
        _check_split(self.train_x, self.train_y, "train")
        _check_split(self.test_x, self.test_y, "test")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train images are {tuple(self.train_x.shape[1:])} (C, H, W) but test images are "
                f"{tuple(self.test_x.shape[1:])}; both splits need the same image shape"
            )
        if not isinstance(self.classes, tuple) or not self.classes or not all(
            isinstance(c, str) for c in self.classes
        ):
            raise ValueError(f"classes must be a non-empty tuple of str, got {self.classes!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {self.name!r}")
        if self.normalization is not None:
            c = self.train_x.shape[1]
            try:
                mean, std = (tuple(float(v) for v in part) for part in self.normalization)
            except (TypeError, ValueError):
                raise ValueError(f"normalization must be (mean, std) with {c} floats each, got "
                                 f"{self.normalization!r}") from None
            if len(mean) != c or len(std) != c or not all(v > 0 for v in std):
                raise ValueError(f"normalization must be (mean, std) with {c} values each and every std > 0, "
                                 f"got {self.normalization!r}")
            object.__setattr__(self, "normalization", (mean, std))
        k = len(self.classes)
        for split, y in (("train", self.train_y), ("test", self.test_y)):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"{split}_y holds labels in [{lo}, {hi}], but with {k} classes labels must lie in [0, {k - 1}]"
                )

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.train_x.shape[1:])

    @cached_property
    def _moments(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Exact per-channel moments from a 256-bin histogram: no float copy of the images.
        levels = np.arange(256, dtype=np.float64) / 255.0
        x = self.train_x.cpu()
        means, stds = [], []
        for c in range(x.shape[1]):
            counts = np.bincount(x[:, c].reshape(-1).numpy(), minlength=256).astype(np.float64)
            n = counts.sum()
            m = float(counts @ levels / n)
            var = float(counts @ (levels - m) ** 2 / n)
            means.append(m)
            stds.append(var**0.5)
        return tuple(means), tuple(stds)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean in [0, 1] scale: the fixed ``normalization``, else the training images' mean."""
        return self.normalization[0] if self.normalization is not None else self._moments[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std in [0, 1] scale: the fixed ``normalization``, else the training images'
        (population) standard deviation."""
        return self.normalization[1] if self.normalization is not None else self._moments[1]

    def with_normalization(self, mean, std) -> "ImageDataset":
        """The same images, preprocessed with a fixed ``mean`` and ``std`` (one float per channel)
        instead of this dataset's own statistics: evaluate or fine-tune a model the way it was trained."""
        return dataclasses.replace(self, normalization=(mean, std))

    def subset(
        self,
        n_train: Optional[int] = None,
        n_test: Optional[int] = None,
        seed: int = 0,
        *,
        balanced: bool = True,
    ) -> "ImageDataset":
        """A smaller dataset drawn from this one, deterministically from ``seed``.

        Parameters
        ----------
        n_train, n_test : int or None
            How many images to keep from each split; ``None`` keeps the whole split.
        seed : int
            Seed of the draw; the same seed gives the same subset.
        balanced : bool
            If True, every class gets ``n // num_classes`` images, and the first ``n % num_classes``
            classes one more; if False, a uniform random draw without replacement.

        Returns
        -------
        ImageDataset
            The subset, images kept in their original order, same ``classes`` and ``name``.

        Raises
        ------
        ValueError
            If a count is not a positive integer, exceeds the split, or (balanced) a class has too
            few images.
        """
        gen = torch.Generator().manual_seed(int(seed))
        train = self._draw(self.train_y, n_train, "train", gen, balanced)
        test = self._draw(self.test_y, n_test, "test", gen, balanced)
        return dataclasses.replace(
            self,
            train_x=self.train_x[train],
            train_y=self.train_y[train],
            test_x=self.test_x[test],
            test_y=self.test_y[test],
        )

    def _draw(
        self, y: torch.Tensor, n: Optional[int], split: str, gen: torch.Generator, balanced: bool
    ) -> torch.Tensor:
        total = y.shape[0]
        if n is None:
            return torch.arange(total)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n_{split} must be a positive integer or None, got {n!r}")
        if n > total:
            raise ValueError(f"n_{split}={n} exceeds the {total} images of the {split} split")
        if not balanced:
            return torch.randperm(total, generator=gen)[:n].sort().values
        k = self.num_classes
        y_cpu = y.cpu()
        picks = []
        for c in range(k):
            want = n // k + (1 if c < n % k else 0)
            members = torch.nonzero(y_cpu == c).flatten()
            if want > members.numel():
                raise ValueError(
                    f"a balanced subset of {n} {split} images needs {want} of class {self.classes[c]!r}, "
                    f"which has only {members.numel()}; ask for fewer or pass balanced=False"
                )
            picks.append(members[torch.randperm(members.numel(), generator=gen)[:want]])
        return torch.cat(picks).sort().values
