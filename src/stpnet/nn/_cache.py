"""An inference cache for modules that derive a tensor (a rebuilt weight, merged cores) from their
parameters: computed once in eval mode with gradients off, reused while the parameters are
unchanged."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Hashable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from ..functional.conv import recording

__all__ = ["InferenceCache", "SourceKey", "recording", "source_key"]


def _source_tensors(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """``(owner dict, name, tensor)`` for every parameter of ``module`` and its submodules."""
    return [(m._parameters, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]


@functools.cache
def _memcmp() -> Callable[[int, int, int], int] | None:
    """The C library's ``memcmp`` (None where it cannot be loaded): a byte comparison of host
    memory several times faster than ``torch.equal``, with no per-call dispatch. Loaded through
    ``PyDLL``, which keeps the GIL during the call: releasing it for so short a call would only
    let other Python threads delay this one."""
    try:
        libc = ctypes.PyDLL("msvcrt") if sys.platform == "win32" else ctypes.PyDLL(None)
        memcmp = libc.memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return memcmp


#: integer dtypes by item size: a tensor's bits viewed as integers compare exactly (NaN equals
#: itself, -0.0 differs from 0.0)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a flat tensor of integers holding their bit patterns."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1).view(_BITS[t.element_size()])


class _Source(NamedTuple):
    """What a key remembers of one source tensor when the value was cached."""
    owner: dict  # the ``_parameters`` (or ``_buffers``) dict holding it
    name: str
    tensor: torch.Tensor
    version: int
    pointer: int
    requires_grad: bool
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


class SourceKey(NamedTuple):
    """The state of the source tensors of a cached value when it was cached (:func:`source_key`).

    ``host`` holds, for each source compared with ``memcmp`` (a CPU tensor of a real dtype whose
    elements fill a span of memory: :func:`_dense_span`), a copy of that span and its size in
    bytes; ``other`` the remaining sources in groups by device, each with one copy of their bits
    concatenated, compared in one ``torch.equal`` per group (so one wait per key on an
    accelerator)."""
    sources: tuple[_Source, ...]
    host: tuple[tuple[_Source, torch.Tensor, int], ...]
    other: tuple[tuple[tuple[torch.Tensor, ...], torch.device, torch.Tensor], ...]


def source_key(sources: Iterable[tuple[dict, str, torch.Tensor]]) -> SourceKey:
    """A :class:`SourceKey` for ``(owner dict, name, tensor)`` triples: their identity, version,
    storage, gradient flag, geometry, and a copy of their values."""
    memcmp = _memcmp()
    recorded, host, other = [], [], {}
    for owner, name, p in sources:
        source = _Source(owner, name, p, p._version, p.data_ptr(), p.requires_grad, p.shape, p.stride(), p.dtype)
        recorded.append(source)
        if p.device.type == "meta":
            continue  # no values to compare
        if memcmp is not None and p.is_cpu and not p.is_complex() and _dense_span(p):
            span = p.detach().as_strided((p.numel(),), (1,))  # its memory, in the order it lies there
            host.append((source, span.clone(), p.numel() * p.element_size()))
        else:
            other.setdefault(p.device, []).append(p)
    groups = tuple((tuple(ps), device, _group_bits(ps).clone()) for device, ps in other.items())
    return SourceKey(tuple(recorded), tuple(host), groups)


def _dense_span(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive slots of its storage from
    ``t.data_ptr()`` on, each once (contiguous, or a permutation of a contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _group_bits(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The bits of ``tensors`` (:func:`_bits`), concatenated (one tensor: its own)."""
    return _bits(tensors[0]) if len(tensors) == 1 else torch.cat([_bits(t) for t in tensors])


#: How an :class:`InferenceCache` checks a cached value's sources on each inference call
#: (``InferenceCache.watch``): ``'bits'`` compares their bits too; ``'versions'`` stops after the
#: cheap checks (identity, version counter, storage, geometry, dtype, gradient flag).
WATCH_MODES = ("bits", "versions")


def source_key_valid(key: SourceKey, bits: bool = True) -> bool:
    """Whether every source of ``key`` is unchanged: the same object in the same place, at the
    same version, on the same storage with the same geometry, dtype and gradient flag, and (with
    ``bits``) holding the same bits."""
    for owner, name, p, version, pointer, requires_grad, shape, stride, dtype in key.sources:
        if (owner.get(name) is not p or p._version != version or p.data_ptr() != pointer
                or p.requires_grad != requires_grad or p.dtype is not dtype or p.shape != shape
                or p.stride() != stride):
            return False
    if not bits:
        return True
    if key.host:
        memcmp = _memcmp()
        for source, copy, nbytes in key.host:
            if not source.tensor.is_cpu or memcmp(source.pointer, copy.data_ptr(), nbytes):
                return False
    for tensors, device, bits in key.other:
        if any(t.device != device for t in tensors) or not torch.equal(_group_bits(tensors), bits):
            return False
    return True


class InferenceCache(nn.Module):
    """Mixin: :meth:`_cached` remembers derived tensors across inference calls.

    A cached value is valid while every source tensor (each parameter of :meth:`_cache_owner`
    and its submodules, and what :meth:`_cache_sources` adds) is

    * the same object in the same place (assigning a new Parameter, ``load_state_dict(...,
      assign=True)``),
    * at the same version (bumped by each in-place update: optimizer steps, ``load_state_dict``,
      in-place edits under ``no_grad``),
    * on the same storage, with the same shape, strides and dtype (``p.data = ...``),
    * with the same ``requires_grad``, and
    * holding the same bits as when the value was cached.

    The last check is the one that sees edits through ``p.data`` (EMA, pruning and quantization code
    use it), and writes through NumPy or raw memory: ``p.data`` is a tensor with a version counter
    of its own, so an in-place edit of it leaves ``p._version`` unchanged, and no counter sees the
    others. Nothing cheaper than reading the values can prove that such an edit did not happen, so
    every cached call compares each source with a copy kept when the value was cached, exactly:

    * on the CPU, byte for byte with the C library's ``memcmp`` over the memory the tensor fills
      (contiguous or a permutation of a contiguous layout: a transposed factor too), one call per
      tensor: a plain memory comparison, several times faster than ``torch.equal``'s elementwise
      kernel, and with no operator dispatch;
    * elsewhere (an accelerator, a complex or strided tensor, or no C library), all of a key's
      tensors on one device at once: their bits viewed as integers and concatenated, then one
      ``torch.equal``, so one wait for the device per cached call rather than one per tensor.

    Comparing bits, not values, makes the check exact both ways: any change of a bit is seen
    (``-0.0`` for ``0.0`` too), and an unchanged NaN is unchanged (``torch.equal`` calls it different,
    which would rebuild on every call). A summary (a sum, a norm, a sampled hash) was rejected:
    an edit can leave it unchanged (a swap of two entries keeps a sum), and it reads the values all
    the same. A version-only check was rejected too: it returns stale results after ``.data``
    edits. The sources are the factors, a fraction of the dense weight's size, so the copy is
    small and the comparison is one pass over it per call; at small batches that pass is still a
    visible part of the time, which is why each cached value is read once per call where we control
    the caller (:class:`stpnet.nn.attention.WeightsOnceEncoderLayer`) and a fused layer's sources
    leave out the bias where the cached value does not depend on it. Code that must not read the
    factors per call runs the uncached paths (a fused model's ``'chain'`` form, or
    ``torch.compile``).

    Serving fixed weights, a model can opt out of the bit comparison: with ``watch = 'versions'``
    (``stpnet.fuse(..., watch='versions')``) each call runs only the checks before it, which see
    every change made through PyTorch operations on the parameters (optimizer steps,
    ``load_state_dict``, ``copy_`` and other in-place ops, a new Parameter) but not writes through
    ``p.data``, NumPy or raw memory; a small transformer's batch-1 call then runs about a tenth
    faster (BENCHMARKS.md, "Transformer inference latency").

    ``train()``, ``.to()``, ``.half()`` and every other ``_apply`` drop the cache outright. Training,
    gradient recording, tracing and compilation always rebuild. The check walks a list made when
    the value was cached (no module traversal per call: at batch 1 that traversal cost more than a
    small convolution).
    """

    def _cache_owner(self) -> nn.Module:
        """The module whose parameters the cached values are computed from."""
        return self

    def _cache_sources(self) -> list[tuple[dict, str, torch.Tensor]]:
        """``(owner dict, name, tensor)`` for every tensor the cached values are computed from."""
        return _source_tensors(self._cache_owner())

    def _cache_key(self) -> SourceKey:
        return source_key(self._cache_sources())

    #: ``'bits'`` (exact, the default) or ``'versions'``: see the class docstring and :data:`WATCH_MODES`.
    watch: str = "bits"

    def _cache_valid(self, key: SourceKey) -> bool:
        return source_key_valid(key, self.watch == "bits")

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
