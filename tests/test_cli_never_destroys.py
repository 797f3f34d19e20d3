"""The command line and export never destroy a checkpoint: bad arguments, coinciding paths and
unwritable places are one line on stderr with exit status 2, nothing is created or changed; a run
directory is locked while a process uses it; exports are written atomically."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from stpnet.app.cli import LOCK_NAME, main
from stpnet.deploy.export import export
from stpnet.model_spec import ModelSpec
from stpnet.train import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with a tiny CIFAR-10 (36 training images), a ResNet-20 training checkpoint and an
    unrelated file, as a user's working folder might hold."""
    root = tmp_path_factory.mktemp("work")
    data = root / "cifar-10-batches-py"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 8 if i < 5 else 0) for i in range(1, 6)] + [("test_batch", 10)]:
        n = n or 4
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (data / name).write_bytes(pickle.dumps(batch))
    (data / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    spec = ModelSpec("resnet20", 3, 10)
    torch.manual_seed(0)
    run = root / "run"
    save_checkpoint({"model": spec.build().state_dict(), "epoch": 1,
                     "metadata": {"spec": spec.to_dict(), "preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3}}},
                    run / "checkpoint.pt")
    (root / "notes.txt").write_text("keep me\n")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def _assert_rejected(argv, root: Path, capsys, match: str | None = None) -> str:
    before = _snapshot(root)
    code, err = _run(argv, capsys)
    assert code == 2, f"{argv}: exit {code}, stderr {err!r}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"{argv}: not one line: {err!r}"
    assert "Traceback" not in err and err.startswith("stpnet"), err
    assert _snapshot(root) == before, f"{argv} changed or created files"
    if match is not None:
        assert match in err, err
    return err


# ---------------------------------------------------------------------------- export
def test_export_refuses_to_replace_its_own_checkpoint(workspace, capsys):
    ck = workspace / "run" / "checkpoint.pt"
    _assert_rejected(["export", ck, "--output", ck], workspace, capsys, "is the checkpoint being exported")
    other = workspace / "other.pt"
    other.write_bytes(ck.read_bytes())  # another training checkpoint
    try:
        _assert_rejected(["export", ck, "--output", other], workspace, capsys, "holds an stpnet checkpoint")
        code, _ = _run(["export", ck, "--output", other, "--force"], capsys)
        assert code == 0
        exported = torch.jit.load(str(other))  # replaced, by request, with a working TorchScript network
        assert exported(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    finally:
        other.unlink()


@pytest.mark.parametrize("argv,message", [
    (["--output", "/proc/e4.pt"], "cannot be written"),
    (["--output", "{root}/notes.txt/sub.onnx"], "is a file, not a folder"),
    (["--output", "{root}/run"], "is a folder"),
    (["--output", "{root}/m.pt", "--batch", "0"], "--batch must be >= 1"),
    (["--output", "{root}/m.pt", "--input-size", "0"], "degenerate"),
    (["--output", "{root}/m.pt", "--input-size", "3"], "degenerate"),
    (["--output", "{root}/m.pt", "--batch", "x"], "invalid int value"),
])
def test_export_argument_errors_are_one_line(workspace, capsys, argv, message):
    argv = [a.format(root=workspace) for a in argv]
    _assert_rejected(["export", workspace / "run" / "checkpoint.pt", *argv], workspace, capsys, message)


def test_export_to_onnx_without_the_onnx_package_is_one_line(workspace, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails, as where it is not installed
    _assert_rejected(["export", workspace / "run" / "checkpoint.pt", "--output", workspace / "x.onnx"], workspace,
                     capsys, "needs the onnx package")


def test_an_export_that_fails_its_check_leaves_the_previous_file(tmp_path, monkeypatch):
    import stpnet.deploy.export as export_module

    model = nn.Sequential(nn.Linear(4, 3)).eval()
    path = tmp_path / "m.pt"
    export(model, path, torch.randn(2, 4))
    before = path.read_bytes()
    monkeypatch.setattr(export_module, "_max_difference", lambda got, expected: 1e6)
    with pytest.raises(ValueError, match="it was not written"):
        export(model, path, torch.randn(2, 4))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left


def test_export_input_checks(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="file.pt is a file, not a folder"):
        export(model, tmp_path / "file.pt" / "sub.onnx", torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no elements"):
        export(model, tmp_path / "m.pt", torch.randn(0, 3, 8, 8))
    with pytest.raises(ValueError, match=r"cannot run on the example \(x \(1, 3, 5, 5\)\)"):
        export(model, tmp_path / "m.pt", torch.randn(1, 3, 5, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt"]


# ---------------------------------------------------------------------------- compress, run directories
def test_a_rejected_compress_creates_no_run_directory(workspace, capsys):
    ck = workspace / "run" / "checkpoint.pt"
    for extra in (["--rank", "0"], ["--compression", "0.5"], ["--rank", "2", "--epochs", "-1"],
                  ["--rank", "2", "--fit-steps", "1", "--calibration-images", "999999"]):
        err = _assert_rejected(["compress", ck, "--data", workspace / "cifar-10-batches-py", "--format", "tt",
                                "--run-dir", workspace / "new-run", *extra], workspace, capsys)
        assert not (workspace / "new-run").exists()
    assert "more than the 36 training images" in err


def test_a_default_calibration_batch_larger_than_the_data_is_reduced(workspace, capsys, tmp_path):
    code, err = _run(["compress", workspace / "run" / "checkpoint.pt", "--data", workspace / "cifar-10-batches-py",
                      "--format", "tt", "--rank", 2, "--fit-steps", 1, "--epochs", 0,
                      "--run-dir", tmp_path / "r"], capsys)
    assert code == 0, err
    report = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["metadata"]["made_by"]
    assert report["calibration_images"] == 36  # the default 512, reduced to the 36 training images


def test_a_second_process_on_a_run_directory_exits_2_naming_the_holder(workspace, tmp_path, capsys):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from stpnet.app.cli import run_dir_lock
        with run_dir_lock(Path(sys.argv[1])):
            print("locked", flush=True)
            time.sleep(120)
    """), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _assert_rejected(["compress", workspace / "run" / "checkpoint.pt", "--data",
                                workspace / "cifar-10-batches-py", "--format", "tt", "--rank", 2, "--epochs", 0,
                                "--run-dir", run_dir], tmp_path, capsys)
        assert f"in use by another stpnet process (pid {holder.pid})" in err
        err = _assert_rejected(["train", "--data", workspace / "cifar-10-batches-py", "--epochs", 1,
                                "--run-dir", run_dir, "--quiet"], tmp_path, capsys)
        assert f"(pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    code, err = _run(["compress", workspace / "run" / "checkpoint.pt", "--data", workspace / "cifar-10-batches-py",
                      "--format", "tt", "--rank", 2, "--epochs", 0, "--run-dir", run_dir], capsys)
    assert code == 0, err  # the holder is gone: its lock went with it
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / LOCK_NAME).exists()


# ---------------------------------------------------------------------------- fuzz
def _bad_arguments(root: Path) -> dict[str, list[list[str]]]:
    ck = str(root / "run" / "checkpoint.pt")
    notes = str(root / "notes.txt")
    return {
        "export": [["--output", ck], ["--output", "/proc/stpnet-fuzz.pt"], ["--output", f"{notes}/x.onnx"],
                   ["--output", str(root / "run")], ["--output", str(root / "m.txt")], ["--batch", "0"],
                   ["--batch", "-3"], ["--input-size", "0"], ["--input-size", "3"], ["--input-size", "-1"],
                   ["--batch", "99999999"], ["--input-size", "x"], ["--output", notes]],
        "eval": [["--batch-size", "0"], ["--batch-size", "-1"], ["--data", notes], ["--data", str(root / "nope")],
                 ["--device", "tpu"], ["--data", ck], ["--batch-size", "1.5"]],
        "compress": [["--run-dir", ck], ["--run-dir", "/proc/stpnet-fuzz"], ["--run-dir", f"{notes}/run"],
                     ["--rank", "0"], ["--rank", "-2"], ["--compression", "0.5"], ["--compression", "1"],
                     ["--calibration-images", "0"], ["--calibration-images", "999999", "--fit-steps", "2"],
                     ["--epochs", "-1"], ["--data", notes], ["--data", ck], ["--t", "0"], ["--n-iter", "-1"],
                     ["--batch-size", "0", "--epochs", "1"], ["--device", "cuda:7"], ["--fit-steps", "-4"]],
    }


def _valid(command: str, root: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The command's positional arguments and its valid options (each replaced by a bad one)."""
    ck, data = str(root / "run" / "checkpoint.pt"), str(root / "cifar-10-batches-py")
    if command == "export":
        return [ck], {"--output": [str(root / "fuzz-out.pt")]}
    if command == "eval":
        return [ck], {"--data": [data], "--batch-size": ["4"]}
    return [ck], {"--data": [data], "--format": ["tt"], "--rank": ["2"], "--epochs": ["0"],
                  "--run-dir": [str(root / "fuzz-run")]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_bad_arguments_exit_2_with_one_line_and_touch_nothing(workspace, capsys, data):
    command = data.draw(st.sampled_from(["export", "eval", "compress"]))
    bad = data.draw(st.lists(st.sampled_from(_bad_arguments(workspace)[command]), min_size=1, max_size=3))
    positional, options = _valid(command, workspace)
    for item in bad:  # a bad value replaces the valid one of its flag
        options.pop(item[0], None)
        if item[0] == "--rank":
            options.pop("--compression", None)
        if item[0] == "--compression":
            options.pop("--rank", None)
        options[item[0]] = item[1:]
        for i in range(2, len(item), 2):
            options[item[i]] = [item[i + 1]]
    argv = [command, *positional] + [x for flag, values in options.items() for x in (flag, *values[:1])]
    _assert_rejected(argv, workspace, capsys)
    assert not (workspace / "fuzz-run").exists() and not (workspace / "fuzz-out.pt").exists()
