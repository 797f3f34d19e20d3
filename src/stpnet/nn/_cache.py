"""An inference cache for modules that derive a tensor (a rebuilt weight, merged cores) from their
parameters: computed once in eval mode with gradients off, reused while the parameters are
unchanged."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["InferenceCache", "recording"]


def recording() -> bool:
    """True while tracing, scripting or compiling: the graph must see the real computation."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class InferenceCache(nn.Module):
    """Mixin: :meth:`_cached` remembers derived tensors across inference calls.

    The key is every cached-from parameter's version (bumped by each in-place update: optimizer
    steps, ``load_state_dict``), storage, dtype and device, so any change invalidates it; ``train()``
    and ``.to()``/``.half()`` drop the cache. Training, gradient recording, tracing and compilation
    always rebuild. Subclasses say which parameters the derived tensors depend on through
    :meth:`_cache_sources`.
    """

    def _cache_sources(self) -> Iterable[torch.Tensor]:
        return self.parameters()

    def _cached(self, name: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, remembered in inference (eval mode, gradients off) while the sources are
        unchanged."""
        if self.training or torch.is_grad_enabled() or recording():
            return build()
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self._cache_sources())
        cache = self.__dict__.setdefault("_inference_cache", {})
        hit = cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        cache[name] = (key, value)
        return value

    def train(self, mode: bool = True):
        self.__dict__.pop("_inference_cache", None)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_inference_cache", None)  # .to(), .half(), ...: tensors are replaced
        return super()._apply(fn, *args, **kwargs)
