"""The trained reference networks shipped in the package: integrity, accuracy, determinism, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stpnet.app.cli import main
from stpnet.data import load_embedded_cifar10
from stpnet.models import PretrainedError, build_model, model_card, pretrained, pretrained_names
from stpnet.models.pretrained import file_sha256
from stpnet.app.pipeline import load_trained
from stpnet.train import CheckpointError, evaluate

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "stpnet" / "models" / "weights"

#: SHA-256 of each shipped weights file, pinned here independently of the card beside it; and the
#: accuracy floor on the embedded 1,000-image CIFAR-10 test subset (a few points below what the
#: network scores there, BENCHMARKS.md). Compressed networks (``-stt9x``, ``-tt9x``) are pinned
#: the same way.
EXPECTED = {
    "resnet20-cifar10": ("c78dabdded34699c1e52c509b162d44d2c4ebbc4dd38434ad4566720d5b0a645", 0.86),
    "resnet32-cifar10": ("a59ab7d1efff4017bb2a8bcf2a7b81f451e1a57294fcddc70dd817826d38e93f", 0.87),
    "resnet20-cifar10-stt9x": ("981075ec8c524d31945c0f7e2823f61786bd934a4e35083b0721cb720798fc22", 0.83),
    "resnet20-cifar10-tt9x": ("194de0afb8399e2e5926245cd21d7909b360c03104a1fde929f58bdf06d33c88", 0.82),
}
SHIPPED = sorted(EXPECTED)
COMPRESSED = [name for name in SHIPPED if name.endswith("9x")]


def test_every_shipped_network_is_pinned_here():
    assert set(pretrained_names()) == set(EXPECTED)


@pytest.fixture(scope="module")
def subset():
    return load_embedded_cifar10()


@pytest.mark.parametrize("name", SHIPPED)
def test_file_matches_the_pinned_and_the_card_sha256(name):
    digest = file_sha256(WEIGHTS / f"{name}.pt")
    assert digest == EXPECTED[name][0]
    assert model_card(name).sha256 == digest


@pytest.mark.parametrize("name", SHIPPED)
def test_loads_in_eval_mode_with_its_card(name):
    model, card = pretrained(name)
    assert not model.training and all(not m.training for m in model.modules())
    assert card.name == name
    assert card.params == sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for p in build_model(card.architecture).parameters())
    assert len(card.mean) == len(card.std) == card.in_channels == 3
    assert card.test_samples == 10_000 and EXPECTED[name][1] < card.test_accuracy < 1.0
    assert next(model.parameters()).dtype == torch.float32
    if card.compression is None:
        assert card.params == dense_params
        assert card.training["command"].startswith("stpnet train ")
    else:  # a compressed network: its factorization, the command that trained it, its fused latency
        assert card.compression["format"] in name and card.params * 8.5 < dense_params
        assert card.training["command"].startswith("OMP_NUM_THREADS=1 python bench/full_schedule.py --rows ")
        assert set(card.latency["batch"]) == {"1", "128"}
        assert all(v["fused_over_dense"] > 0 for v in card.latency["batch"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_accuracy_on_the_embedded_test_subset(name, subset):
    model, card = pretrained(name)
    result = evaluate(model, subset.test_x, subset.test_y, card.mean, card.std, device=torch.device("cpu"))
    assert len(subset.test_y) == 1000
    assert result["accuracy"] >= EXPECTED[name][1]
    assert abs(result["accuracy"] - card.test_accuracy) <= 0.02  # the subset agrees with the full test set


@pytest.mark.parametrize("name", SHIPPED)
def test_eval_outputs_are_deterministic(name, subset):
    a, card = pretrained(name)
    b, _ = pretrained(name)
    x = subset.test_x[:64].float().div(255)
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        first, again, other = a(x), a(x), b(x)
    assert torch.equal(first, again) and torch.equal(first, other)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_corrupted_copy_is_refused(name, damage, tmp_path):
    copy = tmp_path / f"{name}.pt"
    shutil.copyfile(WEIGHTS / f"{name}.pt", copy)
    data = bytearray(copy.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:-100]
    else:
        data += b"\0"
    copy.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="SHA-256 check failed") as info:
        pretrained(name, path=copy)
    assert model_card(name).sha256 in str(info.value)


def test_an_intact_copy_elsewhere_loads(tmp_path):
    name = SHIPPED[0]
    copy = tmp_path / "mirror.pt"
    shutil.copyfile(WEIGHTS / f"{name}.pt", copy)
    model, _ = pretrained(name, path=copy)
    reference, _ = pretrained(name)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_a_missing_copy_is_refused(tmp_path):
    with pytest.raises(PretrainedError, match="missing"):
        pretrained(SHIPPED[0], path=tmp_path / "nothing.pt")


@pytest.mark.parametrize("bad", ["resnet20", "resnet20-imagenet", "", None, 20])
def test_unknown_name_lists_the_available_ones(bad):
    with pytest.raises(ValueError, match="available: .*resnet20-cifar10"):
        pretrained(bad)


def test_load_trained_takes_a_name_and_says_what_is_valid(tmp_path):
    model, spec, state = load_trained(SHIPPED[0])
    assert spec.name == model_card(SHIPPED[0]).architecture and spec.format == "dense"
    assert state["metadata"]["preprocessing"]["mean"] == list(model_card(SHIPPED[0]).mean)
    with pytest.raises(CheckpointError, match="not the name of a shipped network.*resnet20-cifar10"):
        load_trained(tmp_path / "missing.pt")


@pytest.mark.slow
def test_cli_eval_and_report_accept_a_name(capsys):
    assert main(["eval", SHIPPED[0], "--data", "cifar10-subset"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_samples"] == 1000 and out["test_accuracy"] >= EXPECTED[SHIPPED[0]][1]
    assert main(["report", SHIPPED[0]]) == 0
    assert "params" in capsys.readouterr().out.lower()


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPRESSED)
def test_cli_eval_and_export_take_a_shipped_compressed_name(name, tmp_path, capsys):
    card = model_card(name)
    assert main(["eval", name, "--data", "cifar10-subset"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_samples"] == 1000 and abs(out["test_accuracy"] - card.test_accuracy) <= 0.02
    assert main(["export", name, "--output", str(tmp_path / "m.pt")]) == 0
    exported = torch.jit.load(str(tmp_path / "m.pt"))
    model, _ = pretrained(name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-4)


def test_cli_compress_accepts_a_name(tmp_path, capsys):
    run = tmp_path / "c"
    code = main(["compress", SHIPPED[0], "--data", "cifar10-subset", "--format", "tt", "--rank", "8",
                 "--epochs", "0", "--run-dir", str(run)])
    assert code == 0
    assert "compressed to" in capsys.readouterr().out
    small, spec, _ = load_trained(run / "checkpoint.pt")
    assert spec.format == "tt"


@pytest.mark.slow
def test_compression_demo_semi_tensor_with_per_layer_t_and_kept_function(tmp_path):
    """The demo's semi-tensor path with each layer's t chosen and BatchNorm moved keeping the
    function: the fine-tuned checkpoint records each layer's t and reloads to the same accuracy."""
    from stpnet.app.demo import run_compression_demo
    from stpnet.app.pipeline import load_trained
    from stpnet.train import evaluate

    rows, _ = run_compression_demo(formats=("stt",), out_dir=tmp_path, fine_tune_epochs=1, fit_steps=2,
                                   calibration_size=32, train_subset=64, t_choices=(1, 2), bn_keep_function=True)
    stt = next(r for r in rows if r["format"] == "stt")  # after the shipped networks' rows
    assert 8.5 < stt["compression"] < 9.5
    small, spec, state = load_trained(tmp_path / "stt" / "checkpoint.pt")
    assert isinstance(spec.t, dict) and set(spec.t.values()) <= {1, 2}
    data = load_embedded_cifar10().with_normalization(state["metadata"]["preprocessing"]["mean"],
                                                      state["metadata"]["preprocessing"]["std"])
    reloaded = evaluate(small, data.test_x, data.test_y, data.mean, data.std, device=torch.device("cpu"))
    assert reloaded["accuracy"] == pytest.approx(stt["accuracy"], abs=1e-9)


def test_recovery_stage_plot_draws_missing_stages_as_empty(tmp_path):
    pytest.importorskip("matplotlib")
    from stpnet.app.plot import plot_recovery_stages

    networks = [{"format": "tt", "compression": 9.0, "params": 29959, "plain": 0.12, "accuracy": 0.68},
                {"format": "stt", "compression": 9.0, "params": 29938, "plain": 0.10, "accuracy": None}]
    path = plot_recovery_stages(networks, {"plain": "straight after compression", "accuracy": "fine-tuned"},
                                tmp_path / "sub" / "stages.png", dense_accuracy=0.885, title="t")
    assert path == tmp_path / "sub" / "stages.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compression_demo_small(tmp_path):
    from stpnet.app.demo import run_compression_demo, shipped_compressed

    rows, plot = run_compression_demo(formats=("tt",), out_dir=tmp_path, fine_tune_epochs=1, fit_steps=2,
                                      calibration_size=32, train_subset=64)
    shipped = shipped_compressed()
    assert [r["format"] for r in rows] == ["dense", *shipped, "tt"]
    dense, tt = rows[0], rows[-1]
    for row in rows[1:-1]:  # the shipped compressed networks, shown first with their card's accuracy
        card = model_card(row["format"])
        assert row["params"] == card.params and row["full_test_accuracy"] == card.test_accuracy
        assert abs(row["accuracy"] - card.test_accuracy) <= 0.02
    assert dense["accuracy"] >= EXPECTED[SHIPPED[0]][1]
    assert 8.5 < tt["compression"] < 9.5 and tt["params"] < dense["params"] / 8.5
    assert all(0 <= tt[k] <= 1 for k in ("plain", "recovered", "accuracy"))
    assert tt["plain"] < dense["accuracy"] - 0.3  # 9x without recovery loses most of it
    assert plot is not None and plot.stat().st_size > 1000
    # a rerun into the same folder fine-tunes its own network, never resumes the earlier run
    from stpnet.train import load_checkpoint

    first = load_checkpoint(tmp_path / "tt" / "checkpoint.pt")["model"]
    run_compression_demo(formats=("tt",), out_dir=tmp_path, fine_tune_epochs=1, fit_steps=4, calibration_size=32,
                         train_subset=64)
    second = load_checkpoint(tmp_path / "tt" / "checkpoint.pt")["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)
