"""Checks and batching shared by the calibration steps (BatchNorm, fitting, allocation)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..nn.layer_types import takes_indices


def check_images(images: object, name: str = "images") -> None:
    """A non-empty tensor with a batch dimension: the model's preprocessed floating inputs, or the
    integer token indices of a model that starts with an embedding."""
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[0] == 0:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a non-empty batch of preprocessed inputs (N x C x ...) or of token "
                         f"indices (N x L), got {got}")
    if images.device.type == "meta":
        raise ValueError(f"{name} are on the meta device (a shape without values); give real inputs")
    if images.dtype in (torch.int64, torch.int32):
        return  # token indices (uint8 is refused below: those are raw, unnormalized images)
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point (normalized inputs, e.g. stpnet.data.normalize(x, mean, "
                         f"std)) or int64/int32 token indices, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def check_images_for(model: nn.Module, images: torch.Tensor, name: str = "images") -> None:
    """``images`` (already through :func:`check_images`) suit ``model``: real data (not the meta
    device) for a model with real parameters, and integer token indices only for a model that
    looks them up (one with an embedding)."""
    params = list(model.parameters())
    if any(p.device.type == "meta" for p in params):
        raise ValueError("the model's parameters are on the meta device (shapes without values): load or "
                         "materialize its weights first (model.to_empty(device=...) and load_state_dict)")
    if images.device.type == "meta":
        raise ValueError(f"{name} are on the meta device (a shape without values); give real inputs")
    if not images.is_floating_point() and not any(takes_indices(m) for m in model.modules()):
        floating = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        raise ValueError(f"{name} are {images.dtype}, integer token indices, but the model has no embedding to "
                         f"look them up: give its preprocessed floating inputs ({floating}, e.g. "
                         "stpnet.data.normalize(x, mean, std))")


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def iterate_images(images: torch.Tensor, batch_size: int, model: nn.Module) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``images`` on the model's device and in its floating dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    floating = images.is_floating_point() and param is not None and param.is_floating_point()
    dtype = param.dtype if floating else images.dtype  # token indices stay integers
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size].to(device=device, dtype=dtype)


@contextmanager
def modes_restored(*models: nn.Module):
    """Restore every submodule's train/eval mode on exit, whatever the code inside changes."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@torch.no_grad()
def forward_with_hooks(model: nn.Module, hooks: dict[nn.Module, Callable], batches: Iterable[torch.Tensor]) -> None:
    """Run ``model`` in eval mode on each batch with forward hooks ``{module: hook}`` attached;
    hooks, and every module's mode, are removed and restored afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with modes_restored(model):
            model.eval()
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
