"""Saving a compressed model of any architecture, and loading it back onto a freshly built base model.

:func:`save` writes one file holding the **compression plan** (for every factorized layer: its
name and aliases, its class, format, ranks, t, layout and tensorization, forward path and the
geometry of the dense layer it replaces; every attention that ``compress`` rewrote as
:class:`stpnet.nn.UnpackedMultiheadAttention`) and the model's **state dict**. :func:`load`
applies the plan to a base model the caller builds (a zoo model, their own class, a HuggingFace
model from ``from_config``) and loads the weights; the result computes exactly what the saved
model computed.

File format: ``torch.save`` of a dict of plain containers and tensors, read back with
``torch.load(weights_only=True)``, so loading runs no pickled code. The dict holds ``format``
(``'stpnet-compressed-model'``), ``version``, ``plan`` (a JSON string), ``state`` (name ->
tensor) and ``sha256``, the digest of the plan and of every tensor's name, dtype, shape and
bytes, checked on load: a corrupted or edited file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_path, check_output_path
from .nn._replace import set_submodule
from .nn.attention import UnpackedMultiheadAttention
from .nn.base import FactorizedLayer
from .deploy.fused import FusedLayer
from .nn.layer_types import LAYER_TYPES, factorized_layer_type

__all__ = ["save", "load", "compression_plan", "apply_plan", "SavedModelError", "FILE_FORMAT", "FILE_VERSION"]

FILE_FORMAT = "stpnet-compressed-model"
FILE_VERSION = 1

#: The factorized layer classes a plan can rebuild, by name: those of the layer types.
_LAYER_CLASSES = {kind.factorized.__name__: kind.factorized for kind in LAYER_TYPES.values()
                  if kind.factorized is not None}


class SavedModelError(ValueError):
    """A saved compressed model that cannot be loaded: not such a file, a corrupted or edited one,
    or one whose plan does not fit the base model."""


def _layer_args(layer: FactorizedLayer) -> list:
    """The positional constructor arguments of ``layer``'s class that give its dense geometry (what
    ``dense_layer_args`` returns for the dense layer it replaces), as JSON values."""
    return _jsonable(factorized_layer_type(layer).constructor_args(layer))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _constructor_t(layer: FactorizedLayer) -> int:
    """The layer's t as its constructor takes it (a Tucker-2 weight's per-mode t: the channel t)."""
    t = layer.t
    return max(t) if isinstance(t, (tuple, list)) else int(t)


def compression_plan(model: nn.Module) -> dict[str, Any]:
    """What :func:`save` records of ``model``'s structure: its factorized layers and unpacked
    attentions, as plain JSON values.

    Returns
    -------
    dict
        ``{"model_class": ..., "attention": [...], "layers": [...]}``; each layer entry holds
        ``name``, ``aliases`` (every name the module has; a shared layer is one entry), ``class``,
        ``args`` (its dense geometry), ``format``, ``rank``, ``t``, ``layout``, ``in_modes``,
        ``out_modes`` and ``forward_path``.

    Raises
    ------
    SavedModelError
        If the model holds fused layers (:func:`stpnet.fuse`), or a factorized layer of a class
        the plan cannot rebuild.
    """
    aliases: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    layers, attention = [], []
    for key, module in modules.items():
        names = aliases[key]
        if isinstance(module, FusedLayer):
            raise SavedModelError(f"layer {names[0]!r} is fused ({type(module).__name__}); save the model before "
                                  "stpnet.fuse(), and fuse after loading")
        if isinstance(module, UnpackedMultiheadAttention):
            attention.append({"name": names[0], "aliases": names, "packed": module.packed})
        elif isinstance(module, FactorizedLayer):
            if type(module).__name__ not in _LAYER_CLASSES or type(module) is not _LAYER_CLASSES[type(module).__name__]:
                raise SavedModelError(f"layer {names[0]!r} is a {type(module).__name__}; the plan rebuilds "
                                      f"{', '.join(_LAYER_CLASSES)}")
            tz = module.tensorization
            layers.append({"name": names[0], "aliases": names, "class": type(module).__name__,
                           "args": _layer_args(module), "format": module.format, "rank": list(module.rank),
                           "t": _constructor_t(module), "layout": tz.layout.name, "in_modes": list(tz.in_modes),
                           "out_modes": list(tz.out_modes), "forward_path": module.forward_path})
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}", "attention": attention,
            "layers": layers}


def _digest(plan_json: str, state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the plan and of every tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    digest.update(plan_json.encode())
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a compressed model (any architecture) to ``path``: its compression plan and state dict.

    Load it with :func:`load` onto a freshly built copy of the model it was compressed from.

    Parameters
    ----------
    model : nn.Module
        A model as :func:`stpnet.compress` returns it (fitted, fine-tuned, or not); a model without
        factorized layers is saved too (its plan is empty). Fused models are refused: save before
        :func:`stpnet.fuse`.
    path : str or PathLike
        The file to write (conventionally ``.pt``); written to a temporary file in the same
        folder and renamed, so an interrupted save leaves no partial file.

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    SavedModelError
        For a fused model or a factorized layer the plan cannot describe.
    ValueError
        If ``path`` is a folder or lies under a file.
    OSError
        If the folder cannot be written (``path`` is then left as it was).

    Examples
    --------
    >>> import torch, stpnet, tempfile, os
    >>> from torch import nn
    >>> build = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> small, _ = stpnet.compress(build(), "tt", rank=4)
    >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
    >>> _ = stpnet.save(small, path)
    >>> again = stpnet.load(path, build())
    >>> x = torch.randn(2, 16)
    >>> torch.equal(again(x), small(x))
    True
    """
    path = check_output_path(path, "save path")
    plan_json = json.dumps(compression_plan(model), sort_keys=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    payload = {"format": FILE_FORMAT, "version": FILE_VERSION, "plan": plan_json, "state": state,
               "sha256": _digest(plan_json, state)}
    with atomic_path(path, "save path") as partial:
        torch.save(payload, partial)
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked plan and state of a saved file."""
    if not path.is_file():
        raise FileNotFoundError(f"no saved model at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear error
        first = str(error).splitlines()[0][:200] if str(error) else ""
        raise SavedModelError(f"{path} is not a readable stpnet saved model (corrupted, truncated, or a file that "
                              f"needs code to load): {type(error).__name__}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise SavedModelError(f"{path} is not an stpnet saved model (stpnet.save writes a dict with "
                              f"format={FILE_FORMAT!r}); a plain state dict loads with model.load_state_dict")
    version = payload.get("version")
    if version != FILE_VERSION:
        raise SavedModelError(f"{path} has file version {version!r}; this stpnet reads version {FILE_VERSION}")
    plan_json, state, digest = payload.get("plan"), payload.get("state"), payload.get("sha256")
    if (not isinstance(plan_json, str) or not isinstance(state, dict) or not isinstance(digest, str)
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise SavedModelError(f"{path} is malformed: it needs a JSON plan, a state dict of tensors and a sha256")
    actual = _digest(plan_json, state)
    if actual != digest:
        raise SavedModelError(f"SHA-256 check failed for {path}: the file records {digest}, its contents give "
                              f"{actual}; it was corrupted or edited after saving")
    try:
        plan = json.loads(plan_json)
    except json.JSONDecodeError as error:
        raise SavedModelError(f"{path} has an unreadable plan: {error}") from None
    return plan, state


def _aliases_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if n and m is module]


def _base_module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SavedModelError(f"the plan names {what} {name!r}, which the base model does not have; load onto a "
                              "freshly built model of the architecture that was compressed") from None


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Give ``model`` (in place) the structure :func:`compression_plan` recorded: unpack the
    attentions and put a factorized layer of the recorded geometry, format, ranks, t and layout
    at every recorded name (weights not loaded; the global random state is left as it was).

    Raises
    ------
    SavedModelError
        If a recorded layer is missing from ``model`` or has another geometry there.
    """
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list) or not isinstance(
            plan.get("attention"), list):
        raise SavedModelError("the plan must be a dict with 'attention' and 'layers' lists")
    for entry in plan["attention"]:
        name = entry["name"]
        module = _base_module(model, name, "attention")
        if isinstance(module, UnpackedMultiheadAttention):
            if module.packed != entry["packed"]:
                raise SavedModelError(f"attention {name!r}: saved with packed={entry['packed']}, the base model's "
                                      f"has packed={module.packed}")
            continue
        if not isinstance(module, nn.MultiheadAttention):
            raise SavedModelError(f"attention {name!r} is a {type(module).__name__} in the base model, not an "
                                  "nn.MultiheadAttention: a different architecture")
        new = UnpackedMultiheadAttention.from_torch(module, packed=entry["packed"])
        for alias in _aliases_of(model, module):
            set_submodule(model, alias, new)
    with torch.random.fork_rng(devices=[]):  # the placeholder factors' random init leaves no trace
        for entry in plan["layers"]:
            _apply_layer(model, entry)
    return model


def _apply_layer(model: nn.Module, entry: dict[str, Any]) -> None:
    name = entry["name"]
    cls = _LAYER_CLASSES.get(entry.get("class"))
    if cls is None:
        raise SavedModelError(f"layer {name!r}: unknown class {entry.get('class')!r}; valid: "
                              f"{', '.join(_LAYER_CLASSES)}")
    base = _base_module(model, name, "layer")
    if isinstance(base, FactorizedLayer):
        raise SavedModelError(f"layer {name!r} is already factorized in the base model; load onto the dense model "
                              "that was compressed")
    try:
        args = _jsonable(cls.dense_layer_args(base))
    except (AttributeError, ValueError, TypeError):
        raise SavedModelError(f"layer {name!r} is a {type(base).__name__} in the base model, which a {cls.__name__} "
                              "cannot replace: a different architecture") from None
    if args != entry["args"]:
        raise SavedModelError(f"layer {name!r}: the saved {cls.__name__} replaced a layer with geometry "
                              f"{entry['args']}, the base model's {type(base).__name__} has {args}: a different "
                              "architecture")
    aliases = _aliases_of(model, base)
    if sorted(aliases) != sorted(entry["aliases"]):
        raise SavedModelError(f"layer {name!r} is shared under {sorted(entry['aliases'])} in the saved model, under "
                              f"{sorted(aliases)} in the base model: a different architecture")
    weight = getattr(base, "weight", None)
    factory = {"device": weight.device, "dtype": weight.dtype} if isinstance(weight, torch.Tensor) else {}
    try:
        new = cls(*cls.dense_layer_args(base), format=entry["format"], rank=tuple(entry["rank"]), t=entry["t"],
                  layout=entry["layout"], in_modes=entry["in_modes"], out_modes=entry["out_modes"],
                  forward_path=entry["forward_path"], **factory)
    except (ValueError, TypeError, KeyError) as error:
        raise SavedModelError(f"layer {name!r}: the plan's entry cannot be rebuilt: {error}") from None
    new.train(base.training)
    for alias in aliases:
        set_submodule(model, alias, new)


def load(path: str | os.PathLike, base_model: nn.Module, *, strict_class: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save` on ``base_model`` and load its weights.

    Parameters
    ----------
    path : str or PathLike
    base_model : nn.Module
        A freshly built model of the architecture that was compressed (a zoo model from
        :func:`stpnet.models.build_model`, the user's own class, a HuggingFace model from
        ``from_config``/``from_pretrained``); changed in place and returned. Its weights do not
        matter: all are replaced by the saved ones.
    strict_class : bool, default True
        Refuse a base model whose class has another name than the saved one's (the checks of
        the plan and the state dict catch a different architecture either way; this names the
        cause).

    Returns
    -------
    nn.Module
        ``base_model``, compressed as the saved model was and with its weights, in eval mode. Its
        outputs equal the saved model's exactly on the same device and dtype (a layer built with
        ``forward_path='measure'`` times its paths again after loading and may pick the other
        one, which agrees to rounding). ``requires_grad`` is not saved: every parameter of a
        rebuilt layer requires gradients.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    SavedModelError
        For a file that is not a saved model, is corrupted or was edited (SHA-256 mismatch), a
        plan naming layers the base model lacks or has with another geometry, or a state dict
        that does not match (a different architecture).
    """
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module (a freshly built model to load into), got "
                        f"{type(base_model).__name__}")
    path = Path(path)
    plan, state = _read(path)
    saved_class = str(plan.get("model_class"))
    own_class = f"{type(base_model).__module__}.{type(base_model).__qualname__}"
    # the class name, not its module: a class defined in a script is __main__.X there, and
    # module.X where another script imports it
    if strict_class and saved_class.rpartition(".")[2] != type(base_model).__qualname__.rpartition(".")[2]:
        raise SavedModelError(f"{path} holds a compressed {saved_class}, the base model is a {own_class}: a "
                              "different architecture (strict_class=False loads it if the structure matches)")
    apply_plan(base_model, plan)
    expected = base_model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SavedModelError(f"the saved weights do not fit the base model (a different architecture): missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise SavedModelError(f"the saved weights do not fit the base model (a different architecture): "
                              f"{'; '.join(wrong[:5])}")
    _match_strides(base_model, state)
    base_model.load_state_dict(state)
    return base_model.eval()


def _dense_permutation(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s strides lay its elements out densely, without overlap, in some order."""
    if tensor.numel() == 0 or any(stride <= 0 for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        return False
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) == tensor.numel()


def _match_strides(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter and buffer of ``model`` the memory layout (strides) of its saved tensor,
    keeping the Parameter objects (so ties stay): a factor saved as a transposed view then runs
    through the same kernels as in the saved model, which is what makes the outputs bit-identical."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors.items():
        saved = state.get(name)
        if (saved is None or tensor is None or saved.shape != tensor.shape or saved.stride() == tensor.stride()
                or not _dense_permutation(saved)):
            continue
        with torch.no_grad():
            tensor.data = torch.empty_strided(saved.shape, saved.stride(), dtype=tensor.dtype, device=tensor.device)
