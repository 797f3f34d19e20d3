"""Export a (compressed) model for deployment: fused, then ONNX or TorchScript, checked on export."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .._atomic import atomic_path, check_output_path
from ..nn.base import FactorizedLayer
from ..functional.contract import conv1x1_mix
from .fold import fold_batchnorm as fold
from .fused import FusedLayer, fuse

__all__ = ["ExportResult", "export"]

FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how it checked it.

    Attributes
    ----------
    path : Path
    format : {'onnx', 'torchscript'}
    params : int
        Parameters of the exported model (after fusing).
    max_abs_difference : float or None
        Largest difference between the exported model's outputs (ONNX Runtime, or the reloaded
        TorchScript module) and the PyTorch model's on the example input (over all outputs); None
        when ONNX Runtime is not installed.
    input_names, output_names : tuple of str
        The graph's input and output names: ``x`` and ``y`` for a model taking and returning one
        tensor; otherwise the keywords of a dict example (``x0, x1, ...`` for a tuple) and the
        flattened outputs' paths (a dict's keys, a tuple's ``y0, y1, ...``, nested ones joined
        by dots; None entries dropped).
    """

    path: Path
    format: str
    params: int
    max_abs_difference: float | None
    input_names: tuple[str, ...] = ("x",)
    output_names: tuple[str, ...] = ("y",)


def export(model: nn.Module, path: str | Path,
           example: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *, fuse_layers: bool = True,
           fold_batchnorm: bool = False, dynamic_batch: bool = True, force: bool = False) -> ExportResult:
    """Write ``model`` to ``path`` as ONNX (``.onnx``) or TorchScript (``.pt``/``.ts``).

    The file is written to a temporary name in ``path``'s folder, checked from there, and renamed
    to ``path`` only once the check passes: an export that fails or differs leaves ``path`` as it
    was.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode on a copy; the model itself is not changed.
    path : str or Path
        The suffix chooses the format.
    example : torch.Tensor, tuple of tensors, or dict of tensors
        An input batch (for tracing and for the check): one tensor, the positional inputs, or
        keyword inputs by name (``{"input_ids": ..., "attention_mask": ...}``, as HuggingFace
        models take them). The model may return a tensor, or a dict (HuggingFace's
        ``ModelOutput`` included), dataclass or tuple of them, nested: the export's outputs are
        those tensors, flattened and named (:attr:`ExportResult.output_names`).
    fuse_layers : bool, default True
        Replace factorized layers by their fused form (:func:`stpnet.fuse`) first: the exported
        graph is then a fixed chain of standard ops on the compressed factors.
    fold_batchnorm : bool, default False
        Fold each BatchNorm that directly follows a convolution into it
        (:func:`stpnet.fold_batchnorm`); the export then has no BatchNorm for those layers.
        ONNX Runtime folds them itself; a TorchScript file gains from it.
    dynamic_batch : bool, default True
        ONNX only: the batch dimension (the first) of every input and output is symbolic.
    force : bool, default False
        Replace ``path`` even where it holds an stpnet checkpoint (a training checkpoint or a
        saved compressed model), which is otherwise refused: an export never destroys one by
        accident.

    Returns
    -------
    ExportResult
        With the largest difference between the exported file's outputs and ``model``'s own
        (before fusing and folding) on ``example``.

    Raises
    ------
    ValueError
        For an unknown suffix, an output path that is a folder or lies under a file, an stpnet
        checkpoint at ``path`` (without ``force``), an empty example, an example the model cannot
        run on, or an export whose outputs differ from the model's by more than 1e-3 relative to
        their scale (nothing is written then).
    ImportError
        For ``.onnx`` without the ``onnx`` package.
    """
    path = check_output_path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise ValueError(f"export writes {', '.join(sorted(FORMATS))} files; got {path.name!r}")
    if kind == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ImportError(f"writing {path.name} (ONNX) needs the onnx package (pip install onnx onnxruntime); "
                          "a .pt or .ts output writes TorchScript without it")
    if not force and _is_stpnet_checkpoint(path):
        raise ValueError(f"{path} holds an stpnet checkpoint, which the export would replace; choose another "
                         "output file (or force=True, --force, to replace it)")
    model = copy.deepcopy(model).eval()
    inputs, input_names, keywords = _example_inputs(example)
    empty = [name for name, value in zip(input_names, inputs) if value.numel() == 0]
    if empty:
        raise ValueError(f"the example input {empty[0]!r} has shape {tuple(inputs[input_names.index(empty[0])].shape)}"
                         ", with no elements: give a batch of at least one input of the size the model serves")
    with torch.no_grad():
        try:
            outputs = _call(model, inputs, keywords)
        except (RuntimeError, ValueError, IndexError) as exc:
            shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in zip(input_names, inputs))
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the model cannot run on the example ({shapes}): {first}") from None
        output_names, expected = zip(*_flatten_outputs(outputs))
    if fuse_layers and any(isinstance(m, FactorizedLayer) for m in model.modules()):
        model = fuse(model, inplace=True)
    if fold_batchnorm:
        model = fold(model, inplace=True)
    if kind == "onnx":
        for module in model.modules():
            if isinstance(module, FusedLayer):
                module.mix = conv1x1_mix  # 1x1 stages as Conv nodes, which ONNX Runtime runs faster
    params = sum(p.numel() for p in model.parameters())
    model = _FlatOutputs(model, keywords)
    with atomic_path(path) as partial:
        difference = _write_and_check(model, partial, kind, inputs, input_names, output_names, expected,
                                      dynamic_batch)
    return ExportResult(path, kind, params, difference, tuple(input_names), tuple(output_names))


def _is_stpnet_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a file stpnet wrote as a checkpoint: a training checkpoint (a dict
    with a ``'model'`` entry) or a saved compressed model (:mod:`stpnet.saving`). An earlier export
    (a TorchScript archive, an ONNX file) is not one."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                return False  # a TorchScript archive (an earlier export): torch.load would load it as one
    except (OSError, zipfile.BadZipFile):
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is not a checkpoint
        return False
    return isinstance(state, dict) and ("model" in state or state.get("format") == "stpnet-compressed-model")


def _write_and_check(model: nn.Module, path: Path, kind: str, inputs, input_names, output_names, expected,
                     dynamic_batch: bool) -> float | None:
    """Write ``model`` to ``path`` and return the largest difference of the written file's outputs
    from ``expected`` (None where ONNX Runtime is missing); raise if it is too large."""
    difference: float | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "onnx":
            axes = {name: {0: "batch"} for name, value in (*zip(input_names, inputs), *zip(output_names, expected))
                    if value.ndim} if dynamic_batch else None
            torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=axes)
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            if ort is not None:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                got = session.run(None, {n: v.detach().cpu().numpy() for n, v in zip(input_names, inputs)})
                difference = _max_difference([torch.from_numpy(g) for g in got], expected)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(model, inputs)
            torch.jit.save(traced, str(path))
            with torch.no_grad():
                got = torch.jit.load(str(path))(*inputs)
                difference = _max_difference(got if isinstance(got, (tuple, list)) else [got], expected)
    scale = max((float(e.abs().max()) for e in expected if e.numel() and e.is_floating_point()), default=0.0) or 1.0
    if difference is not None and difference > 1e-3 * scale:
        raise ValueError(f"the exported {kind} model differs from the PyTorch model by {difference:.3g} "
                         f"(output scale {scale:.3g}); it was not written")
    return difference


# ------------------------------------------------------------------ inputs and flattened outputs
def _example_inputs(example: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...], tuple[str, ...] | None]:
    """The positional tensors to trace with, their graph names, and the keywords they stand for
    (None: passed positionally)."""
    if isinstance(example, torch.Tensor):
        return (example,), ("x",), None
    if isinstance(example, Mapping):
        if not example or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in example.items()):
            raise ValueError("a dict example must map keyword names (str) to tensors, e.g. {'input_ids': ids}")
        return tuple(example.values()), tuple(example), tuple(example)
    if isinstance(example, (tuple, list)) and example and all(isinstance(v, torch.Tensor) for v in example):
        names = ("x",) if len(example) == 1 else tuple(f"x{i}" for i in range(len(example)))
        return tuple(example), names, None
    raise ValueError(f"example must be a tensor, a non-empty tuple of tensors or a dict of keyword tensors, got "
                     f"{type(example).__name__}")


def _call(model: nn.Module, inputs: tuple[torch.Tensor, ...], keywords: tuple[str, ...] | None) -> Any:
    return model(**dict(zip(keywords, inputs))) if keywords is not None else model(*inputs)


def _flatten_outputs(value: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model's output in order, with their names: a tensor is ``y``; a dict's
    (or ``ModelOutput``'s) entries are named by their keys, a dataclass's by its fields, a tuple's
    ``y0, y1, ...``; nested names join with dots; None entries are dropped."""
    if isinstance(value, torch.Tensor):
        return [(name or "y", value)]
    if value is None:
        return []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, (tuple, list)):
        items = [(str(i) if name else f"y{i}", v) for i, v in enumerate(value)]
    else:
        raise ValueError(f"the model returned a {type(value).__name__}{f' at {name!r}' if name else ''}; export "
                         "needs tensors, or dicts, dataclasses or tuples of them (for a HuggingFace model, pass "
                         "use_cache=False so no cache object is returned)")
    out = []
    for key, item in items:
        out.extend(_flatten_outputs(item, f"{name}.{key}" if name else str(key)))
    if not out and not name:
        raise ValueError("the model returned no tensor to export")
    return out


def _max_difference(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    if len(got) != len(expected):
        raise ValueError(f"the exported model returns {len(got)} outputs, the PyTorch model {len(expected)}")
    return max((float((g.detach().cpu().to(e.dtype) - e.detach().cpu()).abs().max()) if e.numel() else 0.0
                for g, e in zip(got, expected)), default=0.0)


class _FlatOutputs(nn.Module):
    """``model`` taking its inputs positionally (passed on as keywords where the example named
    them) and returning its output's tensors flattened (one tensor, or a tuple)."""

    def __init__(self, model: nn.Module, keywords: tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.keywords = keywords

    def forward(self, *inputs: torch.Tensor):
        tensors = [t for _, t in _flatten_outputs(_call(self.model, inputs, self.keywords))]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)
