"""Layer types (:mod:`stpnet.nn.layer_types`): each describes its torch layer correctly, and the
code that used to test layer classes asks them instead."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpnet
from stpnet.nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear
from stpnet.nn.convert import FACTORIZED_COUNTERPARTS, dense_geometry, dense_matrix, to_dense, why_not_factorizable
from stpnet.nn.layer_types import (LAYER_TYPES, LayerType, factorized_layer_type, layer_type, layer_type_named,
                                    takes_indices)

SRC = Path(stpnet.__file__).parent


class TransposedLinear(nn.Module):
    """A Linear storing its weight as (in, out), as HuggingFace's Conv1D does."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.nf = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class KeepsForward(nn.Linear):
    pass


class ChangesForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def samples():
    """(module, input batch) for each kind of layer, float64."""
    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    return {
        "linear": (nn.Linear(6, 5, **kw), torch.randn(3, 4, 6, **kw)),
        "conv1d": (nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=False, **kw), torch.randn(2, 4, 9, **kw)),
        "conv1d-same": (nn.Conv1d(4, 6, 3, padding="same", bias=False, **kw), torch.randn(2, 4, 9, **kw)),
        "conv1d-valid": (nn.Conv1d(4, 6, 3, padding="valid", bias=False, **kw), torch.randn(2, 4, 9, **kw)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1, dilation=1, bias=False, **kw), torch.randn(2, 4, 5, 5, **kw)),
        "conv2d-strided": (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), bias=False, **kw), torch.randn(2, 3, 7, 6, **kw)),
        "embedding": (nn.Embedding(10, 4, **kw), torch.randint(0, 10, (3, 7))),
        "linear_like": (TransposedLinear(6, 5), torch.randn(3, 4, 6, **kw)),
    }


def test_every_registered_type_is_a_layer_type_and_the_lookup_finds_it():
    assert list(LAYER_TYPES)[:5] == ["linear", "conv1d", "conv2d", "conv3d", "embedding"]
    assert {"linear_like", "multihead_attention"} <= set(LAYER_TYPES)
    for kind in LAYER_TYPES.values():
        assert isinstance(kind, LayerType) and kind.role in ("conv", "linear", "embedding", "attention")
    found = {name: layer_type(module).name for name, (module, _) in samples().items()}
    assert found == {"linear": "linear", "conv1d": "conv1d", "conv1d-same": "conv1d", "conv1d-valid": "conv1d",
                     "conv2d": "conv2d", "conv2d-strided": "conv2d", "embedding": "embedding",
                     "linear_like": "linear_like"}
    assert layer_type(nn.MultiheadAttention(8, 2)).name == "multihead_attention"
    assert layer_type(nn.ReLU()) is None and layer_type(nn.BatchNorm2d(3)) is None
    assert layer_type(KeepsForward(3, 2)).name == "linear"
    assert layer_type(ChangesForward(3, 2)) is None
    assert layer_type(ChangesForward(3, 2), keep_forward=False).name == "linear"
    assert "overrides the forward of nn.Linear" in why_not_factorizable(ChangesForward(3, 2))
    assert "groups=2" in why_not_factorizable(nn.Conv2d(4, 4, 3, groups=2))
    assert "no factorized counterpart" in why_not_factorizable(nn.MultiheadAttention(8, 2))
    assert FACTORIZED_COUNTERPARTS == {nn.Linear: FactorizedLinear, nn.Conv1d: FactorizedConv1d,
                                       nn.Conv2d: FactorizedConv2d, nn.Conv3d: stpnet.nn.FactorizedConv3d,
                                       nn.Embedding: FactorizedEmbedding}


@pytest.mark.parametrize("name", list(samples()))
def test_geometry_and_matrix_view_compute_the_layer(name):
    module, x = samples()[name]
    kind = layer_type(module)
    c_in, c_out, kernel = kind.geometry(module)
    W = kind.matrix(module)
    assert (c_in, c_out, kernel) == dense_geometry(module) and torch.equal(W, dense_matrix(module))
    assert tuple(W.shape) == (c_out, c_in, *kernel)
    with torch.no_grad():
        y = module(x)
        if kind.role == "embedding":  # the table as a map from one-hot tokens
            reference = F.one_hot(x, c_in).double() @ W.T
        elif kind.role == "linear":
            reference = x @ W.T + (module.bias.detach() if module.bias is not None else 0)
        else:
            reference = module._conv_forward(x, W, None)
    assert torch.allclose(y, reference)


@pytest.mark.parametrize("name", list(samples()))
def test_dense_macs_count_every_multiply_add(name):
    module, x = samples()[name]
    kind = layer_type(module)
    c_in, c_out, kernel = kind.geometry(module)
    with torch.no_grad():
        y = module(x)
    if kind.role == "embedding":
        expected = 0  # a gather
    elif kind.role == "linear":
        expected = math.prod(y.shape[:-1]) * c_in * c_out
    else:  # each output entry: C_in * prod(kernel) multiply-adds
        expected = y.numel() * c_in * math.prod(kernel)
    assert kind.dense_macs(module, x.shape) == expected


@pytest.mark.parametrize("name", [n for n in samples() if n != "conv3d"])
def test_input_gram_gives_the_output_energy_of_any_weight(name):
    """``sum ||M u||^2`` over the layer's inputs u equals ``<M G, M>``: checked against the layer's
    own output for random weights M."""
    module, x = samples()[name]
    kind = layer_type(module)
    G = kind.input_gram(module, x)
    c_in, c_out, kernel = kind.geometry(module)
    M = torch.randn(c_out, c_in * math.prod(kernel), dtype=torch.float64)
    energy = float((M.pow(2) * G).sum()) if G.ndim == 1 else float((M @ G * M).sum())
    with torch.no_grad():
        if kind.role == "embedding":
            out = F.one_hot(x, c_in).double() @ M.T
        elif kind.role == "linear":
            out = x @ M.T
        else:
            out = module._conv_forward(x, M.reshape(c_out, c_in, *kernel), None)
    assert energy == pytest.approx(float(out.pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("dense", [nn.Linear(8, 6), nn.Conv1d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2),
                                   nn.Embedding(12, 8, padding_idx=0)], ids=lambda m: type(m).__name__)
def test_to_dense_rebuilds_the_torch_layer_of_a_factorized_one(dense):
    layer = stpnet.nn.from_dense(dense, "tt", rank=4)
    kind = factorized_layer_type(layer)
    assert kind is layer_type(dense) and kind.factorized is type(layer)
    rebuilt = kind.to_dense(layer)
    assert type(rebuilt) is type(dense) and rebuilt.training == layer.training
    x = torch.randint(0, 12, (2, 5)) if kind.takes_indices else torch.randn(2, 4, 9) if dense.weight.ndim == 3 \
        else torch.randn(2, 4, 9, 9) if dense.weight.ndim == 4 else torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), layer(x), atol=1e-5)
        assert torch.allclose(to_dense(layer)(x), layer(x), atol=1e-5)


def test_embedding_flags_come_from_its_type():
    embedding = stpnet.nn.from_dense(nn.Embedding(12, 8), "tt", rank=4)
    assert takes_indices(embedding) and takes_indices(nn.Embedding(3, 2)) and not takes_indices(nn.Linear(2, 2))
    assert not factorized_layer_type(embedding).fusable
    assert stpnet.deploy.fused.fuse_layer(embedding) is embedding  # no fused form: the layer as it is
    assert factorized_layer_type(stpnet.nn.from_dense(nn.Conv2d(4, 8, 3), "tt", rank=4)).channel_dim == 1


def test_a_layer_type_stays_the_registered_object_through_copies_and_pickles():
    import copy
    import pickle

    kind = LAYER_TYPES["conv2d"]
    assert copy.deepcopy(kind) is kind and pickle.loads(pickle.dumps(kind)) is kind
    with pytest.raises(ValueError, match="unknown layer type 'pool'; valid layer types: linear, conv1d"):
        layer_type_named("pool")


def test_a_layer_type_needs_a_free_name_and_a_known_role():
    with pytest.raises(TypeError, match="layer type 'linear' is taken"):
        type("Again", (LayerType,), {"name": "linear", "role": "linear"})
    with pytest.raises(TypeError, match="role must be one of"):
        type("Odd", (LayerType,), {"name": "odd-role-type", "role": "pooling"})
    assert "odd-role-type" not in LAYER_TYPES


def test_the_callers_test_no_layer_class():
    """compress, the discovery, the allocation, the fit and fuse ask the layer types: no
    ``isinstance`` test against a torch or factorized layer class remains in them."""
    layer_classes = {"Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention",
                     "FactorizedLinear", "FactorizedConv1d", "FactorizedConv2d", "FactorizedConv3d",
                     "FactorizedEmbedding", "_FactorizedConvNd", "DENSE_TYPES"}
    for path in ("compress.py", "discovery.py", "recovery/allocate.py", "recovery/fit.py", "deploy/fused.py"):
        tree = ast.parse((SRC / path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node.args[1])
                         if isinstance(n, (ast.Attribute, ast.Name))}
                assert not names & layer_classes, f"{path}:{node.lineno} tests {names & layer_classes}"


@pytest.mark.parametrize("dense", [nn.Linear(8, 6, bias=False), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                                   nn.Conv1d(4, 8, 3, dilation=2, padding_mode="reflect", padding=2),
                                   nn.Embedding(12, 8, padding_idx=3)], ids=lambda m: type(m).__name__)
def test_constructor_args_are_what_the_dense_layer_gives(dense):
    layer = stpnet.nn.from_dense(dense, "tt", rank=4)
    kind = factorized_layer_type(layer)
    assert tuple(kind.constructor_args(layer)) == tuple(type(layer).dense_layer_args(dense))
