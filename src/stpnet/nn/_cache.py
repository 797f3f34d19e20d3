"""An inference cache for modules that derive a tensor (a rebuilt weight, merged cores) from their
parameters: computed once in eval mode with gradients off, reused while the parameters are
unchanged."""

from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch import nn

from ..functional.conv import recording

__all__ = ["InferenceCache", "recording"]


def _source_tensors(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """``(owner dict, name, tensor)`` for every parameter of ``module`` and its submodules."""
    return [(m._parameters, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]


def _entry(params: dict, name: str, p: torch.Tensor) -> tuple:
    """What a cached value remembers of one source tensor: the tensor object, its version, storage,
    gradient flag and a copy of its values."""
    return params, name, p, p._version, p.data_ptr(), p.requires_grad, p.detach().clone()


class InferenceCache(nn.Module):
    """Mixin: :meth:`_cached` remembers derived tensors across inference calls.

    A cached value is valid while every source tensor (each parameter of :meth:`_cache_owner`
    and its submodules, and what :meth:`_cache_key` adds) is

    * the same object in the same place (assigning a new Parameter, ``load_state_dict(...,
      assign=True)``),
    * at the same version (bumped by each in-place update: optimizer steps, ``load_state_dict``,
      in-place edits under ``no_grad``),
    * on the same storage (``p.data = ...``),
    * with the same ``requires_grad``, and
    * holding the same values as when the value was cached.

    The last check is the one that sees edits through ``p.data`` (EMA, pruning and quantization code
    use it): ``p.data`` is a tensor with a version counter of its own, so an in-place edit of it
    leaves ``p._version`` unchanged. The values are compared exactly (``torch.equal``) with a copy
    kept when the value was cached, rather than through a summary such as a sum or a hash (which
    an edit can leave unchanged, and which costs a reduction per tensor all the same). The sources
    are the factors, a small fraction of a dense layer's size, so the copy is small and the
    comparison is one pass over them per call: exactness is chosen over the cheaper checks of
    identity and version alone, which let those edits return stale results. On an accelerator each
    comparison waits for the device; code that needs no such wait runs the uncached paths (a fused
    model's ``'chain'`` form, or ``torch.compile``).

    ``train()``, ``.to()``, ``.half()`` and every other ``_apply`` drop the cache outright. Training,
    gradient recording, tracing and compilation always rebuild. The check walks a list made when
    the value was cached (no module traversal per call: at batch 1 that traversal cost more than a
    small convolution).
    """

    def _cache_owner(self) -> nn.Module:
        """The module whose parameters the cached values are computed from."""
        return self

    def _cache_key(self) -> tuple:
        """One entry (:func:`_entry`) per source tensor."""
        return tuple(_entry(*source) for source in _source_tensors(self._cache_owner()))

    @staticmethod
    def _cache_valid(key: tuple) -> bool:
        for params, name, p, version, pointer, requires_grad, values in key:
            if (params.get(name) is not p or p._version != version or p.data_ptr() != pointer
                    or p.requires_grad != requires_grad or not torch.equal(p, values)):
                return False
        return True

    def _cached(self, name: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, remembered in inference (eval mode, gradients off) while the tensors it is
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
        source tensors are unchanged and this is an inference call; else None.

        At batch 1 a factorized layer's per-call Python (choosing the path, checking the cache,
        checking the input) is a sizeable part of a small convolution's time: a plan skips all of
        it but one check of the source tensors."""
        plan = self.__dict__.get("_plan")
        if plan is None or self.training or torch.is_grad_enabled():
            return None
        shape, dtype, planned_config, key, run = plan
        if shape != x.shape or dtype != x.dtype or planned_config != config or recording() \
                or not self._cache_valid(key):
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

    def requires_grad_(self, requires_grad: bool = True):
        self._drop_cache()
        return super().requires_grad_(requires_grad)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_cache()  # load_state_dict, also with assign=True
        return super()._load_from_state_dict(*args, **kwargs)
