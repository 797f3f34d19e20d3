"""Batched, vectorized image augmentation on tensors: random crop with zero padding, horizontal flip,
and normalization. Every random choice is drawn from an explicit ``torch.Generator``, on the CPU,
so results are reproducible on any device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["crop_padded", "random_crop", "random_hflip", "training_augment", "normalize"]


def _check_images(x: object, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch of images N x C x H x W, got {got}")


def _check_generator(generator: object) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got {generator!r}"
        )


def _check_padding(padding: object) -> int:
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    return padding


def crop_padded(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Zero-pad each image by ``padding`` on every side and crop it back to H x W at its own offset.

    Parameters
    ----------
    x : torch.Tensor
        Images ``N x C x H x W`` of any dtype.
    top, left : torch.Tensor
        Integer offsets, shape ``(N,)``, each in ``[0, 2 * padding]``, into the padded image;
        ``top = left = padding`` returns the image unchanged.
    padding : int
        Zero padding on each side.

    Returns
    -------
    torch.Tensor
        The crops, same shape, dtype and device as ``x``. One gather, no loop over images.
    """
    _check_images(x)
    padding = _check_padding(padding)
    n, c, h, w = x.shape
    for name, off in (("top", top), ("left", left)):
        if not isinstance(off, torch.Tensor) or off.shape != (n,) or off.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape ({n},), got {off!r}")
        if n and (int(off.min()) < 0 or int(off.max()) > 2 * padding):
            raise ValueError(f"{name} offsets must lie in [0, {2 * padding}] for padding={padding}")
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (top.to(x.device)[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (left.to(x.device)[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chans, rows, cols]


def random_crop(x: torch.Tensor, padding: int = 4, *, generator: torch.Generator) -> torch.Tensor:
    """Random translation: pad each image with ``padding`` zeros, then crop a random H x W window.

    Offsets are drawn as ``top = randint(0, 2p+1, (N,))`` then ``left`` likewise, from ``generator``.

    Parameters
    ----------
    x : torch.Tensor
        Images ``N x C x H x W`` (uint8 or float; CIFAR: 32 x 32).
    padding : int
        Zero padding on each side (4 for the standard CIFAR recipe).
    generator : torch.Generator
        CPU generator the offsets are drawn from.

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as ``x``.
    """
    _check_images(x)
    _check_generator(generator)
    padding = _check_padding(padding)
    n = x.shape[0]
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return crop_padded(x, top, left, padding)


def random_hflip(x: torch.Tensor, p: float = 0.5, *, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability ``p`` (decided per image from ``generator``).

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as ``x``; each image is either unchanged or exactly
        ``image.flip(-1)``.
    """
    _check_images(x)
    _check_generator(generator)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32.

    Parameters
    ----------
    x : torch.Tensor
        uint8 images ``N x C x H x W``.
    mean, std : sequence of float
        ``C`` values each, in [0, 1] scale (e.g. :attr:`ImageDataset.mean`); every ``std`` > 0.

    Returns
    -------
    torch.Tensor
        float32, same shape and device as ``x``.
    """
    _check_images(x)
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images (0..255), got {x.dtype}")
    c = x.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).flatten()
    if mean_t.numel() != c or std_t.numel() != c:
        raise ValueError(f"mean and std need one value per channel ({c}), got {mean_t.numel()} and {std_t.numel()}")
    if not bool((std_t > 0).all()):
        raise ValueError(f"std must be positive in every channel, got {std_t.tolist()}")
    scale = (1.0 / (255.0 * std_t)).view(1, c, 1, 1)
    shift = (mean_t / std_t).view(1, c, 1, 1)
    return x.to(torch.float32) * scale - shift


def training_augment(x: torch.Tensor, *, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The training augmentation of :class:`stpnet.train.Trainer`: :func:`random_crop` with
    ``padding`` zero pixels, then :func:`random_hflip`, both drawn from ``generator``."""
    return random_hflip(random_crop(x, padding, generator=generator), generator=generator)
