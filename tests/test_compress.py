"""Whole-model compression: eligibility, target size, rebuild from ranks, and the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stpnet
from stpnet.compress import eligible_layers
from stpnet.model_spec import ModelSpec
from stpnet.models import build_model
from stpnet.nn import FactorizedLayer


@pytest.fixture(scope="module")
def resnet32():
    torch.manual_seed(0)
    return build_model("resnet32")


def test_default_keeps_first_conv_and_classifier(resnet32):
    names = eligible_layers(resnet32)
    assert "conv1" not in names and "fc" not in names
    assert len(names) == 30  # the 30 3x3 convolutions of the residual blocks
    assert eligible_layers(resnet32, include=["conv1", "layer1.*"])[0] == "conv1"
    assert not any(n.startswith("layer3") for n in eligible_layers(resnet32, exclude=["layer3.*"]))


@pytest.mark.parametrize("fmt,init", [("stt", "random"), ("tt", "random"), ("str", "random"), ("sttu", "random"),
                                      ("stt", "decompose"), ("tr", "decompose")])
@pytest.mark.parametrize("target", [5.0, 12.0])
def test_target_compression_within_five_percent(resnet32, fmt, init, target):
    model, report = stpnet.compress(resnet32, fmt, compression=target, init=init)
    params = sum(p.numel() for p in model.parameters())
    assert report.params == params and report.dense_params == 464154
    assert abs(report.compression / target - 1) < 0.05
    assert sum(isinstance(m, FactorizedLayer) for m in model.modules()) == 30


def test_unreachable_target_is_refused(resnet32):
    with pytest.raises(ValueError, match="unreachable"):
        stpnet.compress(resnet32, "stt", compression=5000.0)


def test_full_rank_decomposition_keeps_the_function():
    torch.manual_seed(1)
    model = build_model("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    small, report = stpnet.compress(model, "tt", rank=10_000, init="decompose", input_shape=(1, 3, 16, 16))
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), model(x), atol=1e-4)
    assert report.macs is not None and report.dense_macs is not None


def test_rank_mapping_rebuilds_the_same_architecture(resnet32):
    model, report = stpnet.compress(resnet32, "stt", compression=8.0, init="decompose")
    spec = ModelSpec("resnet32", 3, 10, "stt", None, None, report.ranks)
    rebuilt = ModelSpec.from_dict(spec.to_dict()).build()
    rebuilt.load_state_dict(model.state_dict())  # same parameter shapes, strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), model.eval()(x), atol=1e-5)


def test_report_counts_and_macs():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.Linear(64, 10))
    small, report = stpnet.compress(model, "stt", rank=4, init="random", input_shape=(1, 3, 8, 8))
    rows = {r.name: r for r in report.layers}
    assert rows["0"].format == "dense" and rows["5"].format == "dense"
    assert rows["2"].format == "stt" and rows["4"].format == "stt"
    assert rows["0"].dense_macs == 16 * 3 * 9 * 64
    assert rows["2"].dense_macs == 32 * 16 * 9 * 64
    assert rows["4"].dense_macs == 2048 * 64
    assert report.dense_params == sum(p.numel() for p in model.parameters())
    assert report.params == sum(p.numel() for p in small.parameters())
    assert report.macs < report.dense_macs
    assert "| **model** |" in report.to_markdown()
    assert report.to_dict()["compression"] == pytest.approx(report.compression)


def test_bad_requests():
    model = build_model("lenet5")
    with pytest.raises(ValueError, match="exactly one of rank"):
        stpnet.compress(model, "tt")
    with pytest.raises(ValueError, match="init must be one of"):
        stpnet.compress(model, "tt", rank=4, init="zeros")
    with pytest.raises(ValueError, match="does not have"):
        stpnet.compress(model, "tt", rank={"nope": 4})
    with pytest.raises(ValueError, match="no eligible layer"):
        stpnet.compress(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(3, 2)), "tt", rank=2)


@pytest.mark.parametrize("fmt,t", [("stt", 2), ("tr", None), ("sttu", 2)])
def test_decompress_keeps_the_function_and_restores_dense_layers(fmt, t):
    torch.manual_seed(0)
    dense_count = sum(p.numel() for p in build_model("resnet20").parameters())
    small, _ = stpnet.compress(build_model("resnet20"), fmt, rank=6, t=t, init="random")
    small.eval()
    x = torch.randn(2, 3, 32, 32)
    plain = stpnet.decompress(small)
    assert not any(isinstance(m, FactorizedLayer) for m in plain.modules())
    assert any(isinstance(m, FactorizedLayer) for m in small.modules())  # the input is left as it was
    assert sum(p.numel() for p in plain.parameters()) == dense_count
    with torch.no_grad():
        assert torch.allclose(plain(x), small(x), rtol=1e-4, atol=1e-5)
    assert stpnet.decompress(small, inplace=True) is small
    assert not any(isinstance(m, FactorizedLayer) for m in small.modules())


# ------------------------------------------------------------------ shared and tied layers
def test_a_layer_used_twice_is_replaced_once_and_stays_shared():
    import stpnet

    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(8, 16), shared, nn.ReLU(), shared, nn.Linear(16, 4))
    x = torch.randn(3, 8)
    small, report = stpnet.compress(model, "tt", rank=4, include=["1"])
    assert small[1] is small[3] and type(small[1]).__name__ == "FactorizedLinear"
    assert sum(p.numel() for p in small.parameters()) == report.params
    dense = stpnet.decompress(small)
    assert dense[1] is dense[3] and isinstance(dense[1], nn.Linear)
    assert torch.allclose(dense(x), small(x), atol=1e-5)


def test_tied_weights_are_kept_dense_with_a_warning_or_refused():
    import stpnet

    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.relu(self.body(self.emb(idx))))

    model = TiedHead()
    with pytest.warns(UserWarning, match=r"\['emb', 'head'\] share their weight"):
        small, report = stpnet.compress(model, "tt", rank=2, keep_classifier=False)
    assert isinstance(small.head, nn.Linear) and small.head.weight is small.emb.weight
    assert isinstance(small.emb, nn.Embedding)
    assert report.kept_tied == ("emb", "head") and "tied to another module: emb, head" in report.to_markdown()
    assert report.compression > 1
    with pytest.raises(ValueError, match="tied parameters"):
        stpnet.compress(model, "tt", rank={"head": 2})
