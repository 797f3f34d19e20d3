"""Export a (compressed) model for deployment: fused, then ONNX or TorchScript, checked on export."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .nn.base import FactorizedLayer
from .functional.contract import conv1x1_mix
from .nn.fold import fold_batchnorm as fold
from .nn.fused import FusedLayer, fuse

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
        TorchScript module) and the PyTorch model's on the example input; None when ONNX Runtime
        is not installed.
    """

    path: Path
    format: str
    params: int
    max_abs_difference: float | None


def export(model: nn.Module, path: str | Path, example: torch.Tensor, *, fuse_layers: bool = True,
           fold_batchnorm: bool = False, dynamic_batch: bool = True) -> ExportResult:
    """Write ``model`` to ``path`` as ONNX (``.onnx``) or TorchScript (``.pt``/``.ts``).

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode on a copy; the model itself is not changed.
    path : str or Path
        The suffix chooses the format.
    example : torch.Tensor
        An input batch (for tracing and for the check).
    fuse_layers : bool, default True
        Replace factorized layers by their fused form (:func:`stpnet.fuse`) first: the exported
        graph is then a fixed chain of standard ops on the compressed factors.
    fold_batchnorm : bool, default False
        Fold each BatchNorm that directly follows a convolution into it
        (:func:`stpnet.fold_batchnorm`); the export then has no BatchNorm for those layers.
        ONNX Runtime folds them itself; a TorchScript file gains from it.
    dynamic_batch : bool, default True
        ONNX only: the batch dimension of the input and output is symbolic.

    Returns
    -------
    ExportResult
        With the largest difference between the exported file's outputs and ``model``'s own
        (before fusing and folding) on ``example``.

    Raises
    ------
    ValueError
        For an unknown suffix, or an export whose outputs differ from the model's by more than
        1e-3 relative to their scale.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise ValueError(f"export writes {', '.join(sorted(FORMATS))} files; got {path.name!r}")
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = model(example)
    if fuse_layers and any(isinstance(m, FactorizedLayer) for m in model.modules()):
        model = fuse(model, inplace=True)
    if fold_batchnorm:
        model = fold(model, inplace=True)
    if kind == "onnx":
        for module in model.modules():
            if isinstance(module, FusedLayer):
                module.mix = conv1x1_mix  # 1x1 stages as Conv nodes, which ONNX Runtime runs faster
    params = sum(p.numel() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    difference: float | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "onnx":
            axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes=axes)
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            if ort is not None:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                (got,) = session.run(None, {"x": example.detach().cpu().numpy()})
                difference = float((torch.from_numpy(got) - expected.cpu()).abs().max())
        else:
            with torch.no_grad():
                traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path))
            with torch.no_grad():
                difference = float((torch.jit.load(str(path))(example) - expected).abs().max())
    scale = float(expected.abs().max()) or 1.0
    if difference is not None and difference > 1e-3 * scale:
        raise ValueError(f"the exported {kind} model differs from the PyTorch model by {difference:.3g} "
                         f"(output scale {scale:.3g}); it was written to {path} but should not be used")
    return ExportResult(path, kind, params, difference)
