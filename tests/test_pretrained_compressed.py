"""Shipped compressed networks: a card that records the factorization rebuilds the network."""

from __future__ import annotations

import importlib
import importlib.resources
import json

import pytest
import torch

import stpnet
from stpnet.models import model_card, pretrained, resnet20
from stpnet.models.pretrained import PretrainedError, write_pretrained
from stpnet.app.pipeline import load_trained

pretrained_module = importlib.import_module("stpnet.models.pretrained")


def _card_fields(name: str, report) -> dict:
    base = model_card("resnet20-cifar10").to_dict()
    for key in ("sha256", "params"):
        base.pop(key)
    return {**base, "name": name, "test_accuracy": 0.5,
            "compression": {"format": "stt", "t": 2, "layout": None,
                            "ranks": {k: list(v) for k, v in report.ranks.items()}},
            "latency": {"fused_over_dense": {"1": 0.5}, "command": "test"}}


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A compressed ResNet-20 written as a shipped network into a private weights folder."""
    torch.manual_seed(0)
    small, report = stpnet.compress(resnet20(), "stt", compression=9, t=2)
    small.eval()
    card = write_pretrained(small, _card_fields("resnet20-cifar10-teststt9x", report), tmp_path)
    monkeypatch.setattr(pretrained_module, "_weights_dir", lambda: tmp_path)
    return small, card, tmp_path


def test_a_compressed_card_rebuilds_the_network_exactly(shipped):
    small, card, _ = shipped
    before = torch.random.get_rng_state()
    model, loaded_card = pretrained("resnet20-cifar10-teststt9x")
    assert torch.equal(torch.random.get_rng_state(), before)  # the rebuild leaves the caller's stream alone
    assert not model.training and loaded_card == card
    assert loaded_card.compression["format"] == "stt" and loaded_card.latency["command"] == "test"
    assert sum(p.numel() for p in model.parameters()) == card.params < 40_000
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), small(x))
    # the CLI's loader takes the name too, with the factorization in its spec
    again, spec, _ = load_trained("resnet20-cifar10-teststt9x")
    assert spec.format == "stt" and spec.ranks == {k: tuple(v) for k, v in card.compression["ranks"].items()}
    with torch.no_grad():
        assert torch.equal(again.eval()(x), small(x))


def test_a_tampered_compressed_network_is_refused(shipped):
    _, _, folder = shipped
    weights = folder / "resnet20-cifar10-teststt9x.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="SHA-256"):
        pretrained("resnet20-cifar10-teststt9x")


def test_a_dense_card_without_the_optional_fields_still_loads(tmp_path):
    card = model_card("resnet20-cifar10").to_dict()
    card.pop("compression", None)
    card.pop("latency", None)
    assert type(model_card("resnet20-cifar10")).from_dict(json.loads(json.dumps(card))).compression is None


@pytest.mark.slow
def test_the_demo_shows_shipped_compressed_networks_first(shipped, tmp_path):
    import shutil

    from stpnet.app.demo import run_compression_demo, shipped_compressed

    _, card, folder = shipped
    packaged = importlib.resources.files("stpnet.models.weights")
    for suffix in (".pt", ".json"):  # the dense network the demo starts from, beside the shipped one
        shutil.copy(str(packaged / f"resnet20-cifar10{suffix}"), folder / f"resnet20-cifar10{suffix}")
    assert shipped_compressed() == ("resnet20-cifar10-teststt9x",)
    rows, _ = run_compression_demo(formats=(), out_dir=tmp_path / "demo")
    assert [r["format"] for r in rows] == ["dense", "resnet20-cifar10-teststt9x"]
    assert rows[1]["full_test_accuracy"] == card.test_accuracy and rows[1]["params"] == card.params
    assert 0.0 <= rows[1]["accuracy"] <= 1.0
