"""An inference cache for modules that derive a tensor (a rebuilt weight, merged cores) from their
parameters: computed once in eval mode with gradients off, reused while the parameters are
unchanged."""

from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch import nn

from ..functional.conv import recording

__all__ = ["InferenceCache", "recording"]


class InferenceCache(nn.Module):
    """Mixin: :meth:`_cached` remembers derived tensors across inference calls.

    A cached value is valid while every parameter of :meth:`_cache_owner` (and its submodules) is
    the same object, at the same version (bumped by each in-place update: optimizer steps,
    ``load_state_dict``) and on the same storage; ``train()`` and ``.to()``/``.half()`` drop the
    cache. Training, gradient recording, tracing and compilation always rebuild. The check walks a
    list made when the value was cached (no module traversal per call: at batch 1 that traversal
    cost more than a small convolution).
    """

    def _cache_owner(self) -> nn.Module:
        """The module whose parameters the cached values are computed from."""
        return self

    def _cache_key(self) -> tuple:
        return tuple((module._parameters, name, p, p._version, p.data_ptr())
                     for module in self._cache_owner().modules()
                     for name, p in module._parameters.items() if p is not None)

    @staticmethod
    def _cache_valid(key: tuple) -> bool:
        for params, name, p, version, pointer in key:
            if params.get(name) is not p or p._version != version or p.data_ptr() != pointer:
                return False
        return True

    def _cached(self, name: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, remembered in inference (eval mode, gradients off) while the parameters it is
        computed from are unchanged."""
        if self.training or torch.is_grad_enabled() or recording():
            return build()
        cache = self.__dict__.setdefault("_inference_cache", {})
        hit = cache.get(name)
        if hit is not None and self._cache_valid(hit[0]):
            return hit[1]
        key = self._cache_key()
        value = build()
        cache[name] = (key, value)
        return value

    # ------------------------------------------------------------------ inference plans
    def _planned(self, x: torch.Tensor, config: Hashable) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The function remembered by :meth:`_remember_plan` for an input of ``x``'s shape and
        dtype under ``config`` (the module's settings that choose its computation), if the
        parameters are unchanged and this is an inference call; else None.

        At batch 1 a factorized layer's per-call Python (choosing the path, checking the cache,
        checking the input) measured 7-20 us against a 45 us convolution: a plan skips all of it
        but one parameter check."""
        plan = self.__dict__.get("_plan")
        if plan is None or self.training or torch.is_grad_enabled():
            return None
        shape, dtype, planned_config, key, run = plan
        if shape != x.shape or dtype != x.dtype or planned_config != config or not self._cache_valid(key) \
                or recording():
            return None
        return run

    def _remember_plan(self, x: torch.Tensor, config: Hashable, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Remember ``run`` as the computation for inputs like ``x`` (inference calls only)."""
        if not (self.training or torch.is_grad_enabled() or recording()):
            self.__dict__["_plan"] = (x.shape, x.dtype, config, self._cache_key(), run)

    def _drop_cache(self) -> None:
        self.__dict__.pop("_inference_cache", None)
        self.__dict__.pop("_plan", None)

    def train(self, mode: bool = True):
        self._drop_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._drop_cache()  # .to(), .half(), ...: tensors are replaced
        return super()._apply(fn, *args, **kwargs)
