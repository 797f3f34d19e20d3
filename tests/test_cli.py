"""End-to-end runs of every CLI subcommand on tiny data, and its error handling."""

from __future__ import annotations

import importlib
import json
import pickle
import warnings

import numpy as np
import pytest
import torch

from stpnet.app.cli import main


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 in the official python-version layout (64 train, 40 test images)."""
    root = tmp_path_factory.mktemp("data") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 5)] + [("data_batch_5", 0), ("test_batch", 40)]:
        n = n or 8
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "airplane automobile bird cat deer dog frog horse ship truck".split()]}, f)
    return root


def run(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def dense_run(cifar_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dense")
    assert run("train", "--model", "resnet20", "--data", cifar_dir, "--epochs", 1, "--batch-size", 32,
               "--run-dir", run_dir, "--quiet") == 0
    return run_dir


def test_train_dense_and_compressed(dense_run, cifar_dir, tmp_path, capsys):
    assert (dense_run / "checkpoint.pt").exists() and (dense_run / "metrics.jsonl").exists()
    report = json.loads((dense_run / "report.json").read_text())
    assert report["report"]["params"] == 269722
    assert run("train", "--model", "resnet20", "--data", cifar_dir, "--format", "stt", "--rank", 4, "--epochs", 1,
               "--batch-size", 32, "--run-dir", tmp_path, "--quiet") == 0
    out = capsys.readouterr().out
    assert "resnet20 stt:" in out and "test accuracy" in out


def test_eval(dense_run, cifar_dir, capsys):
    assert run("eval", dense_run / "checkpoint.pt", "--data", cifar_dir) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_samples"] == 40 and 0 <= result["test_accuracy"] <= 1


def test_eval_of_nan_weights_prints_valid_json(dense_run, cifar_dir, tmp_path, capsys):
    from stpnet.train import load_checkpoint, save_checkpoint

    state = load_checkpoint(dense_run / "checkpoint.pt")
    state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(state, tmp_path / "nan.pt")
    assert run("eval", tmp_path / "nan.pt", "--data", cifar_dir) == 0
    text = capsys.readouterr().out
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert result["test_loss"] is None and "NaN" not in text


def test_nan_learning_rate_is_refused_before_training(cifar_dir, tmp_path, capsys):
    assert run("train", "--model", "lenet5", "--data", cifar_dir, "--epochs", 1, "--lr", "nan",
               "--run-dir", tmp_path / "r", "--quiet") == 2
    assert "lr must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_compress_hits_the_target(dense_run, cifar_dir, tmp_path, capsys):
    assert run("compress", dense_run / "checkpoint.pt", "--data", cifar_dir, "--format", "stt", "--compression",
               4, "--epochs", 1, "--batch-size", 32, "--run-dir", tmp_path, "--quiet") == 0
    report = json.loads((tmp_path / "report.json").read_text())["report"]
    assert abs(report["compression"] / 4 - 1) < 0.05
    assert run("eval", tmp_path / "checkpoint.pt", "--data", cifar_dir) == 0  # rebuilt from the spec
    assert run("report", tmp_path / "checkpoint.pt", "--latency", 1) == 0
    out = capsys.readouterr().out
    assert "| **model** |" in out and "inference latency, batch 1" in out


@pytest.mark.slow
def test_export_a_compressed_checkpoint(dense_run, cifar_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert run("compress", dense_run / "checkpoint.pt", "--data", cifar_dir, "--format", "str", "--compression",
               4, "--epochs", 0, "--run-dir", tmp_path / "c", "--quiet") == 0
    capsys.readouterr()
    assert run("export", tmp_path / "c" / "checkpoint.pt", "--output", tmp_path / "m.onnx", "--batch", 2) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and "fused" in out and "max |difference|" in out
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert run("export", tmp_path / "c" / "checkpoint.pt", "--output", tmp_path / "m.pt", "--no-fuse") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert loaded(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    # BatchNorm folded: the ONNX graph has no BatchNormalization left, the TorchScript file agrees
    onnx = pytest.importorskip("onnx")
    assert run("export", tmp_path / "c" / "checkpoint.pt", "--output", tmp_path / "f.onnx", "--fold-batchnorm") == 0
    assert "BatchNorm folded" in capsys.readouterr().out
    ops = {node.op_type for node in onnx.load(str(tmp_path / "f.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    plain_ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" in plain_ops
    assert run("export", tmp_path / "c" / "checkpoint.pt", "--output", tmp_path / "f.pt", "--fold-batchnorm") == 0
    assert run("export", tmp_path / "c" / "checkpoint.pt", "--output", tmp_path / "m.txt") == 2
    assert "export writes .onnx, .pt, .ts files" in capsys.readouterr().err


def test_decompose(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((6, 8, 10))
    np.save(tmp_path / "x.npy", X)
    assert run("decompose", tmp_path / "x.npy", "--format", "stt", "--rank", 4, "--output", tmp_path / "f.pt") == 0
    assert "stt" in capsys.readouterr().out
    saved = torch.load(tmp_path / "f.pt")
    assert saved["format"] == "stt" and saved["shape"] == (6, 8, 10)
    torch.save(torch.randn(4, 5, 6), tmp_path / "y.pt")
    assert run("decompose", tmp_path / "y.pt", "--format", "tucker", "--tol", 0.5) == 0


def test_report_of_a_zoo_model(capsys):
    assert run("report", "lenet5", "--input-shape", "1,1,28,28") == 0
    assert "61,706" in capsys.readouterr().out


@pytest.fixture
def short_test_split(monkeypatch):
    """The embedded CIFAR-10 subset with 200 of its 1,000 test images: the demo tests here check the
    CLI's tables and plots, not accuracies (tests/test_pretrained.py checks those on all 1,000)."""
    import stpnet.data

    full = stpnet.data.load_embedded_cifar10
    monkeypatch.setattr(stpnet.data, "load_embedded_cifar10", lambda *args, **kwargs: full(*args, **kwargs).subset(
        None, 200))


@pytest.mark.slow
@pytest.mark.usefixtures("short_test_split")
def test_compression_demo_table_names_its_epochs_and_draws_the_stages(tmp_path, capsys, monkeypatch):
    # the CLI's table and plot end to end, with the short fit of the library's own demo test
    demo = importlib.import_module(main.__module__.rpartition(".")[0] + ".demo")  # where the CLI imports it from
    full, calls = demo.run_compression_demo, []

    def short_fit(*args, **kwargs):
        calls.append(kwargs)
        return full(*args, **{**kwargs, "fit_steps": 2, "calibration_size": 32})

    monkeypatch.setattr(demo, "run_compression_demo", short_fit)
    assert run("demo", "--formats", "tt", "--epochs", 1, "--train-subset", 64, "--out-dir", tmp_path, "--quiet") == 0
    out = capsys.readouterr().out
    assert "after 1 distilled epoch " in out and "\ntt " in out and "\ndense " in out
    assert (tmp_path / "accuracy_by_stage.png").stat().st_size > 1000
    assert len(calls) == 1 and calls[0]["fine_tune_epochs"] == 1 and calls[0]["train_subset"] == 64


@pytest.mark.slow
@pytest.mark.usefixtures("short_test_split")
def test_demo_from_scratch_small(tmp_path, capsys):
    assert run("demo", "--from-scratch", "--epochs", 1, "--train-subset", 64, "--out-dir", tmp_path, "--quiet") == 0
    out = capsys.readouterr().out
    for fmt in ("dense", "tt", "stt"):
        assert f"\n{fmt} " in out
    assert (tmp_path / "accuracy_vs_compression.png").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["eval", "{tmp}/missing.pt"], "does not exist"),
    (["eval", "{tmp}/corrupt.pt"], "not readable"),
    (["train", "--data", "{tmp}/no-such-dir", "--run-dir", "{tmp}/r", "--epochs", "1"], "no-such-dir"),
    (["decompose", "{tmp}/x.txt", "--format", "tt", "--rank", "2"], "does not exist"),
    (["compress", "{dense}", "--format", "tt", "--run-dir", "{tmp}/c", "--data", "{data}"], "needs --rank or --compression"),
    (["train", "--data", "{data}", "--run-dir", "{tmp}/d", "--epochs", "1", "--batch-size", "8", "--lr", "1e30",
      "--schedule", "constant", "--quiet"],
     "loss became"),
    (["train", "--data", "{data}", "--run-dir", "{tmp}/g", "--grad-clip", "0", "--quiet"], "grad_clip must be > 0"),
    *[(["train", "--data", "{data}", "--run-dir", "{tmp}/dv", "--device", dev, "--quiet"],
       f"--device {dev!r} is not supported") for dev in ("bogus", "tpu", "meta", "mps")],
    (["eval", "{dense}", "--data", "{data}", "--device", "bogus"], "is not supported"),
    (["train", "--data", "{data}", "--run-dir", "{tmp}/afile", "--quiet"], "is a file, not a directory"),
    (["train", "--data", "{data}", "--run-dir", "/proc/stpnet-test/run", "--quiet"], "cannot be written"),
    (["decompose", "{tmp}/x.npy", "--format", "tt", "--rank", "2", "--output", "/proc/f.pt"], "cannot be written"),
    (["compress", "{dense}", "--format", "tt", "--rank", "2", "--run-dir", "{tmp}/afile", "--data", "{data}"],
     "is a file, not a directory"),
    (["decompose", "{tmp}/x.npy", "--format", "tt", "--rank", "2", "--output", "{tmp}/no/such/f.pt"],
     "does not exist"),
    (["decompose", "{tmp}/x.npy", "--format", "tt", "--rank", "2", "--output", "{tmp}"], "is a directory"),
    (["decompose", "{tmp}/complex.npy", "--format", "tt", "--rank", "2"], "complex tensor"),
    (["decompose", "{tmp}/sparse.pt", "--format", "tt", "--rank", "2"], "sparse"),
    (["eval", "{tmp}/evil.pt", "--data", "{data}"], "may be unsafe"),
    (["report", "{dense}", "--input-shape", "a,b"], "must be positive integers"),
    (["report", "resnet20", "--latency", "-1"], "batch sizes >= 1"),
    (["train", "--data", "{data}", "--run-dir", "{tmp}/ts", "--train-subset", "0", "--quiet"],
     "train_subset must be a positive number"),
])
def test_errors_give_a_clear_message_and_exit_code(args, message, tmp_path, dense_run, cifar_dir, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    (tmp_path / "afile").write_text("not a folder")
    np.save(tmp_path / "x.npy", np.ones((4, 4, 4)))
    np.save(tmp_path / "complex.npy", np.ones((4, 4, 4)) * (1 + 2j))
    torch.save(torch.eye(4).to_sparse(), tmp_path / "sparse.pt")
    torch.save({"model": {}, "payload": _Payload(str(tmp_path / "PWNED"))}, tmp_path / "evil.pt")
    before = (dense_run / "checkpoint.pt").read_bytes()
    args = [a.format(tmp=tmp_path, dense=dense_run / "checkpoint.pt", data=cifar_dir) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stpnet {args[0]}: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (dense_run / "checkpoint.pt").read_bytes() == before  # nothing written is lost
    assert not (tmp_path / "PWNED").exists()


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_compress_epochs_0_then_fine_tune_in_the_same_run_dir(dense_run, cifar_dir, tmp_path, capsys):
    common = ["compress", dense_run / "checkpoint.pt", "--format", "tt", "--rank", 4, "--data", cifar_dir,
              "--run-dir", tmp_path / "c0", "--batch-size", 32, "--quiet"]
    assert run(*common, "--epochs", 0) == 0
    assert run(*common, "--epochs", 1) == 0
    from stpnet.train import load_checkpoint

    assert load_checkpoint(tmp_path / "c0" / "checkpoint.pt")["epoch"] == 1


def test_report_takes_the_input_shape_from_the_checkpoint(tmp_path, capsys):
    root = tmp_path / "mnist"
    root.mkdir()
    import gzip
    import struct
    for prefix, n in (("train", 20), ("t10k", 10)):
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + np.random.default_rng(0).bytes(n * 784))
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(range(10)) * (n // 10))
    assert run("train", "--model", "lenet5", "--data", root, "--epochs", 1, "--run-dir", tmp_path / "l",
               "--quiet") == 0
    capsys.readouterr()
    assert run("report", tmp_path / "l" / "checkpoint.pt") == 0
    assert "input (1, 1, 28, 28)" in capsys.readouterr().out


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from stpnet.train import checkpoint as ck

    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(OSError, match="could not write checkpoint .*previous checkpoint is unchanged"):
        ck.save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_mismatched_checkpoint_and_data(dense_run, tmp_path, capsys):
    root = tmp_path / "mnist"
    root.mkdir()
    import gzip
    import struct
    for prefix, n in (("train", 20), ("t10k", 10)):
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + bytes(n * 784))
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(range(10)) * (n // 10))
    assert main(["eval", str(dense_run / "checkpoint.pt"), "--data", str(root)]) == 2
    assert "3 channels" in capsys.readouterr().err


def test_help_for_every_subcommand(capsys):
    for cmd in ("train", "compress", "eval", "decompose", "report", "demo"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        assert "usage: stpnet " + cmd in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "many"])
    assert info.value.code == 2
