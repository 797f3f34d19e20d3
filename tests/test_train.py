"""Training loop: schedules, checkpoints, metrics log, and exact resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from stpnet.data import ImageDataset
from stpnet.train import (CheckpointError, TrainConfig, Trainer, TrainingDivergedError, load_checkpoint, lr_at,
                          read_metrics)
from stpnet.train.loop import resolve_amp

SRC = str(Path(__file__).resolve().parents[1] / "src")

TINY = textwrap.dedent("""
    import torch
    from torch import nn
    from stpnet.data import ImageDataset

    def tiny_data():
        g = torch.Generator().manual_seed(5)
        x = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8)
        y = torch.arange(48) % 4
        return ImageDataset(x[:32], y[:32], x[32:], y[32:], ("a", "b", "c", "d"), "tiny")

    def tiny_model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
""")
namespace: dict = {}
exec(TINY, namespace)
tiny_data, tiny_model = namespace["tiny_data"], namespace["tiny_model"]
CONFIG = TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=11, warmup_epochs=0.5)


@pytest.mark.slow
def test_resume_after_a_real_kill_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = tiny_model()
    Trainer(uninterrupted, tiny_data(), CONFIG, tmp_path / "a", device="cpu").fit()

    script = tmp_path / "killed.py"
    script.write_text(TINY + textwrap.dedent(f"""
        import os, signal
        from stpnet.train import Trainer, TrainConfig
        def on_step(epoch, step, steps, loss):
            if epoch == 1 and step == 2:  # mid-way through the second epoch
                os.kill(os.getpid(), signal.SIGKILL)
        config = TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=11, warmup_epochs=0.5)
        Trainer(tiny_model(), tiny_data(), config, {str(tmp_path / "b")!r}, device="cpu", on_step=on_step).fit()
    """))
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1

    resumed = tiny_model()
    history = Trainer(resumed, tiny_data(), CONFIG, tmp_path / "b", device="cpu").fit()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    log = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_checkpoint_and_metrics_contents(tmp_path):
    history = Trainer(tiny_model(), tiny_data(), CONFIG, tmp_path, device="cpu", metadata={"k": 1}).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 3 and state["step"] == 12
    data = tiny_data()
    assert state["metadata"] == {"k": 1, "preprocessing": {"mean": list(data.mean), "std": list(data.std)}}
    assert state["config"]["seed"] == 11
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert history[-1]["test_accuracy"] == json.loads(lines[-1])["test_accuracy"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries
    # running again with more epochs continues the same run
    more = Trainer(tiny_model(), tiny_data(), TrainConfig(**{**CONFIG.to_dict(), "epochs": 4,
                                                             "milestones": (0.5, 0.75)}), tmp_path, device="cpu").fit()
    assert [r["epoch"] for r in more] == [1, 2, 3, 4]


def test_resume_refuses_other_settings_and_other_models(tmp_path):
    Trainer(tiny_model(), tiny_data(), TrainConfig(epochs=1, batch_size=8), tmp_path, device="cpu").fit()
    with pytest.raises(CheckpointError, match=r"other settings \(batch_size: 8 -> 16\)"):
        Trainer(tiny_model(), tiny_data(), TrainConfig(epochs=2, batch_size=16), tmp_path, device="cpu").fit()
    other = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    with pytest.raises(CheckpointError, match="does not match this model"):
        Trainer(other, tiny_data(), TrainConfig(epochs=2, batch_size=8), tmp_path, device="cpu").fit()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not readable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_learning_rate_schedules():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1)
    assert lr_at(0, 10, cfg) == pytest.approx(0.01)
    assert lr_at(9, 10, cfg) == pytest.approx(0.1)
    assert lr_at(10, 10, cfg) == pytest.approx(0.1)
    assert lr_at(55, 10, cfg) == pytest.approx(0.05)
    assert lr_at(100, 10, cfg) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_at(e * 10, 10, step) for e in (0, 4, 5, 7, 8)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear")


def test_training_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randint(0, 100, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 1] += 120  # bright class vs dark class
    data = ImageDataset(x[:48], y[:48], x[48:], y[48:], ("dark", "bright"), "toy")
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    history = Trainer(model, data, TrainConfig(epochs=5, batch_size=16, lr=0.05, augment=False), None,
                      device="cpu").fit()
    assert history[-1]["test_accuracy"] == 1.0


def _separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randint(0, 100, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 1] += 120
    return ImageDataset(x[:48], y[:48], x[48:], y[48:], ("dark", "bright"), "toy")


@pytest.mark.parametrize("clip", [1e-3, 0.05, None])
def test_grad_clip_bounds_the_step_to_the_clipped_gradient(clip):
    data = _separable_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    before = [p.detach().clone() for p in model.parameters()]
    # the reference gradient of the one full batch, computed independently of the trainer
    x = (data.train_x.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    nn.functional.cross_entropy(model(x), data.train_y).backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    model.zero_grad()
    lr = 0.5
    config = TrainConfig(epochs=1, batch_size=48, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant",
                         augment=False, grad_clip=clip)
    Trainer(model, data, config, None, device="cpu").fit()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    expected = lr * (grad_norm if clip is None else min(clip, grad_norm))
    assert clip is None or grad_norm > clip  # the clip is active in the clipped cases
    assert moved == pytest.approx(expected, rel=1e-4)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    data = _separable_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    Trainer(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.01, augment=False), tmp_path, device="cpu").fit()
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingDivergedError, match=r"loss became (nan|inf) at epoch 1, step \d+.*grad_clip"):
        Trainer(model, data, TrainConfig(epochs=1, batch_size=16, lr=1e30, augment=False), None, device="cpu").fit()
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_a_nan_from_the_last_step_of_an_epoch_is_caught_before_the_checkpoint(tmp_path):
    """One batch per epoch: the loss of that step is finite, the update it makes is not."""
    data = _separable_data()
    torch.manual_seed(0)
    model = _NaNGradient()
    config = TrainConfig(epochs=2, batch_size=len(data.train_y), lr=0.01, augment=False)
    with pytest.raises(TrainingDivergedError, match=r"\(root\) became NaN or infinite during epoch 1 "):
        Trainer(model, data, config, tmp_path, device="cpu").fit()
    assert not (tmp_path / "checkpoint.pt").exists()


class _NaNGradient(nn.Module):
    """Finite outputs and loss, but d/d(root) of 0 * sqrt(root) at root = 0 is 0 * inf = NaN."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(192, 2)
        self.root = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.linear(x.flatten(1)) + 0 * torch.sqrt(self.root)


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("lr", float("inf"), "lr must be a finite number > 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("momentum", float("nan"), "momentum must be a finite number >= 0"),
    ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0"),
    ("warmup_epochs", float("inf"), "warmup_epochs must be a finite number >= 0"),
])
def test_config_rejects_non_finite_numbers(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_checkpoint_that_runs_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="was refused.*may be unsafe"):
        load_checkpoint(evil)
    assert not marker.exists()


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_config_rejects_bad_values_and_unknown_settings():
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig settings \\['lr_max'\\]"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "lr_max": 1.0})
    assert TrainConfig.from_dict(TrainConfig(grad_clip=2.0).to_dict()) == TrainConfig(grad_clip=2.0)


def test_amp_modes_and_their_bool_spelling():
    assert TrainConfig().amp == "auto"
    assert TrainConfig(amp=True).amp == "auto" and TrainConfig(amp=False).amp == "off"
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "amp": False}).amp == "off"  # older checkpoints
    with pytest.raises(ValueError, match="amp must be one of \\('auto', 'bf16', 'fp16', 'off'\\)"):
        TrainConfig(amp="fp8")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cuda) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16 and resolve_amp("fp16", cpu) == torch.float16


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    """amp='bf16' autocasts on the CPU (the conv runs in bfloat16) and channels_last applies there too;
    the run trains, records the preprocessing it used, and resumes to the same weights."""
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=2, amp="bf16", channels_last=True)
    seen = []
    model = tiny_model()
    model[0].register_forward_hook(lambda mod, inp, out: seen.append((inp[0].is_contiguous(
        memory_format=torch.channels_last), out.dtype)))
    trainer = Trainer(model, tiny_data(), config, tmp_path / "run", device="cpu")
    history = trainer.fit()
    assert seen and all(cl and dtype == torch.bfloat16 for cl, dtype in seen)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(history) == 2 and all(0 <= r["test_accuracy"] <= 1 for r in history)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    data = tiny_data()
    assert state["metadata"]["preprocessing"] == {"mean": list(data.mean), "std": list(data.std)}
    assert state["config"]["amp"] == "bf16"
    # the same run in float32 differs (autocast really changed the arithmetic)
    plain = tiny_model()
    Trainer(plain, tiny_data(), TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=2, amp="off"), device="cpu").fit()
    assert not torch.equal(plain[0].weight, model[0].weight)


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = tiny_model()
    history = Trainer(model, tiny_data(), TrainConfig(epochs=2, batch_size=8, seed=3), Path(out_dir) / "run",
                      device="cpu").fit()
    params = {name: p.detach() for name, p in model.named_parameters()}
    torch.save({"state": params, "history": history}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_torchrun_style_two_process_training_on_cpu(tmp_path):
    """Two Gloo processes (as torchrun would start them) train one DDP model on sharded batches."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0["state"].values(), r1["state"].values()):
        assert torch.equal(a, b)  # gradients were averaged across the ranks (BN buffers stay local)
    assert r0["history"][-1]["test_accuracy"] == r1["history"][-1]["test_accuracy"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2  # written once, by rank 0
    # and they trained together: one process alone with the same seed and settings ends elsewhere
    alone = tiny_model()
    Trainer(alone, tiny_data(), TrainConfig(epochs=2, batch_size=8, seed=3), device="cpu").fit()
    assert any(not torch.equal(p.detach(), r0["state"][name]) for name, p in alone.named_parameters())
