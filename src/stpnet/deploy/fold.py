"""Folding inference-mode BatchNorm into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) s + beta`` with
``s = gamma / sqrt(var + eps)``; after a convolution ``x = W * u + b`` it is the same as the
convolution with its output channels scaled by ``s`` and bias ``(b - mean) s + beta``. Deployment
tools (ONNX Runtime, TensorRT, inductor with freezing) do this; :func:`fold_batchnorm` does it on a
PyTorch model in place of them, for dense convolutions (the weight is scaled) and for fused
factorized ones (:class:`stpnet.deploy.fused.FusedLayer`: the scale is kept as the layer's ``output_scale``
and folded into the weights it derives in inference, so its parameters stay the compressed
factors). Each folded BatchNorm is replaced by ``nn.Identity``: one pass over the activations less
per layer.

Which BatchNorm follows which convolution is read from the model's dataflow (``torch.fx``
symbolic tracing, with factorized and fused layers as leaves), not from module order: a pair is
folded only when the BatchNorm's sole input is the convolution's output, the convolution's output
goes nowhere else, and each is called once.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import fx, nn

from ..nn._replace import set_submodule
from ..nn.base import FactorizedLayer

__all__ = ["fold_batchnorm", "BatchNormFoldable"]

logger = logging.getLogger(__name__)

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_NORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


class BatchNormFoldable:
    """A layer :func:`fold_batchnorm` folds the BatchNorm after it into by scaling its output,
    not its weight, so that its parameters stay what they are (the fused factorized layers,
    :class:`stpnet.deploy.fused.FusedLayer`, derive from it).

    Such a layer has ``kernel_size`` (empty for a Linear), ``out_channels``, ``bias``, an
    ``output_scale`` (None, or one factor per output channel) that its forward applies, and
    ``_drop_cache()``, which forgets whatever it derived from them.
    """


class _LeafTracer(fx.Tracer):
    """Traces through containers and blocks; factorized and fused layers stay single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (FactorizedLayer, BatchNormFoldable)) or super().is_leaf_module(m, qualname)


def _spatial_dims(module: nn.Module) -> int | None:
    """The number of spatial dimensions of a foldable convolution, else None."""
    if isinstance(module, BatchNormFoldable):
        return len(module.kernel_size) or None  # a fused Linear: the BatchNorm1d axis is not known here
    return _CONVS.get(type(module))  # exact types: a subclass may change what forward computes


def _norm_dims(module: nn.Module) -> int | None:
    return _NORMS.get(type(module))


def _foldable_pairs(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) qualified names whose dataflow allows folding: each called once,
    the BatchNorm on the convolution's output only, that output used nowhere else, and neither
    module's tensors read directly (``conv.weight`` in another op would see the folded weight)."""
    calls: dict[str, int] = {}
    attributes: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attributes.add(node.target.rpartition(".")[0])  # the module the tensor belongs to
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or _norm_dims(modules[node.target]) is None or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv, norm = modules[source.target], modules[node.target]
        if _spatial_dims(conv) is None or calls[source.target] != 1 or calls[node.target] != 1:
            continue
        if any(owner == name or owner.startswith(name + ".") for owner in attributes
               for name in (source.target, node.target)):
            continue
        # BatchNorm1d also takes (N, C) inputs; after a convolution its input is (N, C, L)
        if _spatial_dims(conv) != _norm_dims(norm) or norm.num_features != conv.out_channels:
            continue
        if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
            continue  # it normalizes with batch statistics even in eval mode
        pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Module, norm: nn.Module) -> None:
    """Fold the eval-mode ``norm`` into ``conv`` (in place)."""
    ref = next(p for p in conv.parameters() if p is not conv.bias)  # for a fused layer: a factor
    scale = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) \
        / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    bias = torch.zeros_like(norm.running_mean) if conv.bias is None else conv.bias.detach()
    new_bias = ((bias - norm.running_mean) * scale + shift).to(dtype=ref.dtype, device=ref.device)
    scale = scale.to(dtype=ref.dtype, device=ref.device)
    if isinstance(conv, BatchNormFoldable):
        previous = torch.ones_like(scale) if conv.output_scale is None else conv.output_scale
        conv.output_scale = previous * scale
        conv._drop_cache()
    else:
        conv.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, *([1] * (conv.weight.ndim - 1))),
                                   requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_bias, requires_grad=ref.requires_grad)


def _fold_traced(model: nn.Module, prefix: str) -> tuple[list[tuple[str, str]], set[str]]:
    """Fold the pairs of ``model``; where it cannot be traced, of each child that can. Returns the
    folded (convolution, BatchNorm) names and the names of the BatchNorm calls the traced graphs
    showed (folded or not)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure: try the children one by one
        logger.debug("fold_batchnorm: %s not traceable (%s); trying its children", prefix or "model", error)
        folded, seen = [], set()
        for name, child in model.named_children():
            pairs, child_seen = _fold_traced(child, f"{prefix}{name}.")
            folded += pairs
            seen |= child_seen
        return folded, seen
    modules = dict(model.named_modules())
    seen = {prefix + node.target for node in graph.nodes
            if node.op == "call_module" and _norm_dims(modules[node.target]) is not None}
    pairs = _foldable_pairs(graph, modules)
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    for conv_name, norm_name in pairs:
        norm = modules[norm_name]
        _fold(modules[conv_name], norm)
        for name in aliases[id(norm)]:  # every name the forward might reach it by
            set_submodule(model, name, nn.Identity())
    return [(prefix + c, prefix + n) for c, n in pairs], seen


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold each eval-mode BatchNorm into the convolution whose output it normalizes.

    Parameters
    ----------
    model : nn.Module
        Any model; its dense ``nn.Conv1d/2d/3d`` and fused factorized convolutions
        (:func:`stpnet.fuse`) directly followed by a ``BatchNorm1d/2d/3d`` (with running
        statistics) are folded. A factorized (unfused) layer is left as it is: its weight is its
        factors, and training would move them; fuse it first.
    inplace : bool, default False
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    nn.Module
        The model with each folded BatchNorm replaced by ``nn.Identity``. It computes the
        eval-mode function of ``model`` (to float rounding) with one op less per folded pair; in
        training mode it no longer normalizes with batch statistics, so fold for deployment
        only. A dense convolution's ``weight`` and ``bias`` are the folded ones; a fused layer
        keeps its factors, gains the per-channel ``output_scale`` buffer, and its ``weight``
        and ``bias`` are the folded ones.

    Notes
    -----
    Pairs are found from the dataflow that ``torch.fx`` traces (see the module docstring). A
    model that does not trace is searched child by child, each child on its own: this assumes
    that the untraced code reaches a child's submodules only through the child. A warning names
    the BatchNorm layers that no traced graph reached (untraceable code, or never called).

    A folded model's ``state_dict`` loads into a model folded the same way (the fused layers'
    ``output_scale`` buffers, no BatchNorm entries), not into the unfolded one. The number of
    folded pairs is logged (``logging``, INFO).

    Examples
    --------
    >>> import stpnet
    >>> from stpnet.models import build_model
    >>> dense = build_model("resnet20").eval()
    >>> small, _ = stpnet.compress(dense, "stt", compression=9, t=2)
    >>> deployed = stpnet.fold_batchnorm(stpnet.fuse(small.eval()))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    norms = [name for name, m in model.named_modules() if _norm_dims(m) is not None]
    folded, seen = _fold_traced(model, "")
    unseen = [name for name in norms if name not in seen]
    if unseen:
        warnings.warn(f"fold_batchnorm: {len(unseen)} BatchNorm layer(s) were not reached by any graph torch.fx "
                      f"could trace (untraceable code, or never called) and were not folded: "
                      f"{', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''}", stacklevel=2)
    logger.info("fold_batchnorm: folded %d BatchNorm layers", len(folded))
    return model
