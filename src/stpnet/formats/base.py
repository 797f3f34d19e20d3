"""The interface every factorized tensor shares."""

from __future__ import annotations

import math
import warnings
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from .._validate import check_positive_int

__all__ = ["FactorizedTensor", "FORMATS", "format_class", "FitMethod", "FITS", "register_fit", "fit_method"]

# Format name -> (class, whether the name denotes the semi-tensor variant). Filled once, by the
# class statements of the format modules (through _FormatMeta); read through FORMATS.
_REGISTRY: dict[str, tuple[type["FactorizedTensor"], bool]] = {}

#: Every registered format name -> (class, whether the name is the semi-tensor variant), in
#: registration order: 'tucker', 'sttu', 'tt', 'stt', 'tr', 'str', 'cp'.
FORMATS = MappingProxyType(_REGISTRY)


def format_class(name: str) -> tuple[type["FactorizedTensor"], bool]:
    """Look up a format name: ``(class, is_semi_tensor_name)``; ValueError listing the valid names."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


@dataclass(frozen=True)
class FitMethod:
    """A format family's decomposition, as :func:`stpnet.decompose` runs it.

    Attributes
    ----------
    fit : callable
        ``fit(cls, X, rank, t, *, tol, svd, generator, n_iter, n_restarts, callback)``: decompose
        the dense ``X`` (finite, scaled to max|X| about 1) into an instance of the format class
        ``cls`` at validated ranks ``rank`` (caps) or tolerance ``tol``, then ``n_iter`` sweeps of
        the family's refinement.
    fit_bytes : callable
        ``fit_bytes(cls, shape, t, rank, n_iter, itemsize, svd)``: the estimated peak bytes of
        ``fit`` (the memory check ``decompose`` makes first).
    """

    fit: Callable[..., "FactorizedTensor"]
    fit_bytes: Callable[..., int]


# Format family -> its decomposition. Filled by the algorithm modules of stpnet.decomposition
# (register_fit), which import the format classes; the format modules never import them.
_FITS: dict[str, FitMethod] = {}

#: Every registered decomposition by format family ('tucker', 'tt', 'tr', 'cp').
FITS = MappingProxyType(_FITS)


def register_fit(family: str, fit: Callable[..., "FactorizedTensor"], fit_bytes: Callable[..., int]) -> None:
    """Register the decomposition of the format family ``family`` (see :class:`FitMethod` for the
    signatures); :func:`stpnet.decompose` looks it up by the format class's ``family``."""
    if not isinstance(family, str) or not family:
        raise ValueError(f"family must be a format family name (a non-empty str), got {family!r}")
    if not (callable(fit) and callable(fit_bytes)):
        raise TypeError("register_fit needs callables fit and fit_bytes")
    _FITS[family] = FitMethod(fit, fit_bytes)


def fit_method(cls: type["FactorizedTensor"]) -> FitMethod:
    """The decomposition registered for the format class ``cls`` (by its ``family``).

    A format class written before the registry, which defines its own ``fit`` and ``fit_bytes``
    classmethods, is still served by them, with a DeprecationWarning."""
    registered = _FITS.get(cls.family)
    if registered is not None:
        return registered
    if (cls.fit.__func__ is not FactorizedTensor.fit.__func__
            and cls.fit_bytes.__func__ is not FactorizedTensor.fit_bytes.__func__):
        warnings.warn(f"format {cls.family!r} defines its decomposition as the classmethods fit/fit_bytes; "
                      "register it with stpnet.formats.register_fit instead (fit and fit_bytes on the class "
                      "are deprecated and will be removed in the next release)", DeprecationWarning, stacklevel=3)
        return FitMethod(lambda c, *a, **k: c.fit(*a, **k), lambda c, *a, **k: c.fit_bytes(*a, **k))
    raise ValueError(f"no decomposition is registered for format {cls.family!r}; registered: "
                     f"{', '.join(_FITS) or 'none'} (stpnet.formats.register_fit registers one)")


class _FormatMeta(ABCMeta):
    """Registers each concrete format class (one that sets ``family`` and implements every
    abstract method) in :data:`FORMATS` when its class statement runs."""

    def __new__(mcs, name, bases, namespace, **kwargs):
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        if "family" in namespace and not cls.__abstractmethods__:
            if not cls.layouts:
                raise TypeError(f"format class {name} must declare the layer layouts it supports (layouts = ...)")
            for format_name, semi in ((cls.family, False), (cls.semi_name, True)):
                if format_name is None:
                    continue
                taken = _REGISTRY.get(format_name)
                if taken is not None and taken[0].__qualname__ != cls.__qualname__:
                    raise TypeError(f"format name {format_name!r} is taken by {taken[0].__name__}")
                _REGISTRY[format_name] = (cls, semi)
        return cls


class FactorizedTensor(nn.Module, metaclass=_FormatMeta):
    """A tensor held as factors (nn.Parameters) of one decomposition family.

    Subclasses hold one family each (Tucker, TT, TR, CP); ``t = 1`` is the classic format and
    ``t > 1`` its semi-tensor variant, in the same class. The abstract methods are enforced: a
    subclass that misses one cannot be instantiated.

    A concrete subclass that sets ``family`` in its class body is a *format*: defining it
    registers its names in :data:`FORMATS`, and every entry point (:func:`stpnet.decompose`, the layers,
    :func:`stpnet.compress`, the CLI, the plots) reads that registry. A format declares its
    names, the layer layouts it supports, its rank rules, parameter count, random init and
    reconstruction. Its decomposition lives in :mod:`stpnet.decomposition`, registered for its
    family with :func:`register_fit`.

    Attributes
    ----------
    family : str
        The classic (t = 1) format name ('tucker', 'tt', 'tr', 'cp').
    semi_name : str or None
        The semi-tensor (t > 1) format name ('sttu', 'stt', 'str'); None for a format without
        a semi-tensor variant.
    layouts : tuple of str
        Names of the layer layouts (:mod:`stpnet.nn.layouts`) the format supports; the first is
        the layers' default.
    refinement : str or None
        The iterative refinement ``decompose(..., n_iter=...)`` runs after the initial fit
        ('HOOI', 'ALS'), or None if the format has none.
    """

    family: ClassVar[str]
    semi_name: ClassVar[str | None] = None
    layouts: ClassVar[tuple[str, ...]] = ()
    refinement: ClassVar[str | None] = None

    @classmethod
    def name_for_t(cls, t: int | Sequence[int]) -> str:
        """The format name for STP factor(s) ``t``: ``family`` for t = 1, ``semi_name`` above."""
        semi = any(v > 1 for v in t) if isinstance(t, tuple) else t > 1
        if semi and cls.semi_name is None:
            raise ValueError(f"format {cls.family!r} has no semi-tensor variant; t must be 1, got {t}")
        return cls.semi_name if semi else cls.family

    @classmethod
    def t_for(cls, semi: bool, t: int | Sequence[int] | None,
              shape: Sequence[int] | None = None) -> int | tuple[int, ...]:
        """The STP factor a format name asks for: ``t`` checked (default 2 for a semi-tensor name,
        1 for a classic one), refusing t > 1 under a classic name. With ``shape``, checked against
        the tensor (:meth:`resolve_t`); without, one positive int (a layer's t)."""
        if t is None:
            t = 2 if semi else 1
        t = cls.resolve_t(shape, t) if shape is not None else cls._one_t(t)
        if not semi and (any(v > 1 for v in t) if isinstance(t, tuple) else t > 1):
            raise ValueError(f"format {cls.family!r} is the classic format (t = 1); for t={t} use "
                             f"{cls.semi_name!r}, its semi-tensor name")
        return t

    @classmethod
    def resolve_t(cls, shape: Sequence[int], t: int | Sequence[int]) -> int | tuple[int, ...]:
        """Check the STP factor for a tensor of ``shape``: one positive int (Tucker overrides this
        with one per mode)."""
        return cls._one_t(t)

    @classmethod
    def _one_t(cls, t: int) -> int:
        """One positive int, above 1 only for a format with a semi-tensor variant."""
        t = check_positive_int(t, "t")
        if t > 1 and cls.semi_name is None:
            raise ValueError(f"format {cls.family!r} has no semi-tensor variant; t must be 1, got {t}")
        return t

    @classmethod
    def fit(cls, X: torch.Tensor, rank: tuple[int, ...] | None, t, *, tol: float | None, svd: str,
            generator: torch.Generator, n_iter: int = 0, n_restarts: int = 0,
            callback: Callable[[int, float], None] | None = None) -> "FactorizedTensor":
        """Decompose the dense ``X`` with the family's registered decomposition (:class:`FitMethod`).

        .. deprecated::
            The decompositions live in :mod:`stpnet.decomposition` and are registered per family
            (:func:`register_fit`); call :func:`stpnet.decompose`. This classmethod will be removed
            in the next release."""
        warnings.warn(f"{cls.__name__}.fit is deprecated and will be removed in the next release; call "
                      "stpnet.decompose", DeprecationWarning, stacklevel=2)
        return fit_method(cls).fit(cls, X, rank, t, tol=tol, svd=svd, generator=generator, n_iter=n_iter,
                                   n_restarts=n_restarts, callback=callback)

    @classmethod
    def fit_bytes(cls, shape: tuple[int, ...], t, rank: tuple[int, ...] | None, n_iter: int, itemsize: int,
                  svd: str) -> int:
        """Estimated peak bytes of the family's registered decomposition.

        .. deprecated::
            Read ``fit_method(cls).fit_bytes``; this classmethod will be removed in the next release."""
        warnings.warn(f"{cls.__name__}.fit_bytes is deprecated and will be removed in the next release; use "
                      "stpnet.formats.fit_method(cls).fit_bytes", DeprecationWarning, stacklevel=2)
        return fit_method(cls).fit_bytes(cls, shape, t, rank, n_iter, itemsize, svd)

    @abstractmethod
    def scale_(self, factor: float) -> None:
        """Multiply the tensor by ``factor`` in place (through one factor)."""

    @classmethod
    @abstractmethod
    def validate_rank(cls, shape: Sequence[int], rank: int | Sequence[int], t: int | Sequence[int] = 1,
                      clip: bool = True) -> tuple[int, ...]:
        """Check ``rank`` for a tensor of ``shape`` (ValueError saying what is valid) and return the
        full rank tuple; with ``clip``, lowered to what the shape can use."""

    @staticmethod
    @abstractmethod
    def param_count(shape: Sequence[int], rank: Sequence[int], t: int | Sequence[int] = 1) -> int:
        """Parameters of the format for ``shape`` at ``rank`` (validated ranks)."""

    @classmethod
    @abstractmethod
    def random(cls, shape: Sequence[int], rank: int | Sequence[int], t: int | Sequence[int] = 1, *,
               std: float = 1.0, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               generator: torch.Generator | None = None, clip: bool = True) -> "FactorizedTensor":
        """A random tensor of the format whose dense entries have root-mean-square ``std``."""

    @abstractmethod
    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the dense tensor (differentiable with respect to the factors)."""

    @abstractmethod
    def reconstruction_macs(self) -> int:
        """Multiply-adds :meth:`to_tensor` spends (the cost of rebuilding the dense tensor once)."""

    @property
    @abstractmethod
    def factors(self) -> list[torch.Tensor]:
        """The factor tensors (their sizes are given in each format's class docstring)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor."""

    @property
    @abstractmethod
    def rank(self) -> tuple[int, ...]:
        """The ranks, as a tuple of ints (multiples of ``t`` for the semi-tensor formats)."""

    @property
    @abstractmethod
    def t(self) -> int | tuple[int, ...]:
        """The STP factor (an int, or one int per mode for Tucker)."""

    @property
    def is_semi_tensor(self) -> bool:
        """True when any STP factor is above 1."""
        t = self.t
        return any(v > 1 for v in t) if isinstance(t, tuple) else t > 1

    @property
    def format(self) -> str:
        """Format name: ``family`` when ``t == 1``, otherwise ``semi_name``."""
        return self.name_for_t(self.t)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters held by the factors."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_numel(self) -> int:
        """Number of entries of the dense tensor."""
        return math.prod(self.shape)

    @property
    def compression_ratio(self) -> float:
        """Dense entries divided by parameters (above 1 means smaller than dense)."""
        return self.dense_numel / self.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self.factors[0].dtype

    @property
    def device(self) -> torch.device:
        """The device the factors are on."""
        return self.factors[0].device

    def forward(self) -> torch.Tensor:
        """The dense tensor (:meth:`to_tensor`), so the tensor can be called like a module."""
        return self.to_tensor()

    def extra_repr(self) -> str:
        return f"format={self.format!r}, shape={self.shape}, rank={self.rank}, t={self.t}"
