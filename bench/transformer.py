"""Compress a trained Vision Transformer in all six formats, embeddings and attention included.

1. Trains ``vit-tiny`` (``stpnet.models.vit_tiny``: 8x8 patches, width 128, 4 pre-norm blocks of
   ``nn.TransformerEncoderLayer``, ``nn.Embedding`` positions; 0.56 M parameters) on CIFAR-10
   (JPEG q75) through the ``stpnet train`` entry point: AdamW, cosine, bf16 on CPU. Resumable.
2. Compresses it with ``stpnet.compress(..., compression=X)`` for X in 3, 5, 10 and every format
   (t = 2 for the semi-tensor ones). The attention's packed q/k/v projection, its output
   projection, both feed-forward Linears and the position embedding are factorized; the patch
   embedding (first convolution) and the classifier stay dense, as by default. A semi-tensor row
   and its classic row at the same X have the same parameter count (within the rank
   granularity): each is the other's equal-parameter control.
3. For each: test accuracy straight after compression (``plain``), after data-aware fitting
   (``fit``: 100 L-BFGS iterations per layer on 512 training images), and after ``--ft-epochs``
   of fine-tuning with the dense network as teacher (``ft``); parameters; forward latency at
   batch 1 and 32 against dense, in the same process (alternating blocks, median of ``--repeats``),
   of the factorized and the fused network (``stpnet.fuse`` with an example of the batch timed, so
   each layer takes its fastest form; ``bench/fused_transformer.py`` times the fused network alone),
   with PyTorch's encoder fast path on (the default in eval: it runs on the weights it reads,
   rebuilt once) and off.

Every finished step appends a JSON line to ``results/transformer/runs.jsonl``; a rerun skips what
is there. ``--report`` prints the table.

Run (from the repository root):
    .venv/bin/python bench/transformer.py --time-limit 120 --no-latency   # beside other jobs
    .venv/bin/python bench/transformer.py --latency-only                 # on an idle machine
    .venv/bin/python bench/transformer.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stpnet.compress import compress
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.deploy.fused import fuse
from stpnet.app.pipeline import calibration_images, load_trained, normalized_like, train_spec
from stpnet.recovery import recover
from stpnet.train import TrainConfig, evaluate

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)
from latency import time_in_blocks  # bench/latency.py

ROOT = Path(__file__).resolve().parents[1]
DATA = benchmark_data_path("cifar10-jpeg.tar.gz")
FORMATS = ("tucker", "sttu", "tt", "stt", "tr", "str")
SEMI = {"sttu", "stt", "str"}
TRAIN = ["--model", "vit-tiny", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
         "--batch-size", "128", "--schedule", "cosine", "--warmup-epochs", "1", "--label-smoothing", "0.1",
         "--amp", "bf16", "--seed", "0"]


class _OutOfTime(Exception):
    pass


def latency_ratio(models: dict[str, torch.nn.Module], batch: int, repeats: int,
                  fastpath: bool = True) -> dict[str, float]:
    """Median forward seconds of each model on one random batch, timed in alternating blocks in the
    same process (``latency.time_in_blocks``), with PyTorch's encoder fast path on or off (on, the
    encoder layers run fused kernels on the weights they read, rebuilt once for a factorized layer)."""
    x = torch.randn(batch, 3, 32, 32)
    for model in models.values():
        model.eval()
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        return time_in_blocks(models, x, repeats)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class Sweep:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "runs.jsonl"
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()] if self.log.exists() else []
        self.done = {(r["config"], r["step"]) for r in rows}
        self.deadline = time.monotonic() + args.time_limit * 60 if args.time_limit else float("inf")
        self.runs = Path(args.runs)
        self.data = load_dataset(str(DATA))

    def record(self, config: str, step: str, **values) -> None:
        row = {"config": config, "step": step, "cpu": cpu_model(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, **values}
        with self.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add((config, step))
        print(f"{config:>12} {step:<6} " + " ".join(f"{k}={v}" for k, v in values.items() if k != "ranks"), flush=True)

    def accuracy(self, model) -> float:
        d = self.data
        return evaluate(model, d.test_x, d.test_y, d.mean, d.std, device=torch.device("cpu"))["accuracy"]

    def dense(self):
        run_dir = self.runs / "dense"
        checkpoint = run_dir / "checkpoint.pt"
        if ("dense", "train") not in self.done:
            from stpnet.app.cli import main as cli

            start = time.perf_counter()
            subset = ["--train-subset", str(self.args.train_subset)] if self.args.train_subset else []
            if cli(["train", *TRAIN, *subset, "--epochs", str(self.args.epochs), "--data", str(DATA), "--run-dir",
                    str(run_dir), "--quiet"]) != 0:
                raise SystemExit("training the dense ViT failed (see the message above)")
            model, _, _ = load_trained(checkpoint)
            self.record("dense", "train", test_accuracy=self.accuracy(model.float().eval()),
                        params=sum(p.numel() for p in model.parameters()), epochs=self.args.epochs,
                        seconds=round(time.perf_counter() - start, 1))
        model, spec, state = load_trained(checkpoint)
        self.data = normalized_like(self.data, state)
        return model.float().eval(), spec

    def latencies(self, model, dense) -> dict[str, float]:
        """Seconds per call at batch 1 and 32 of the factorized (``b1``), fused (``fused_b1``) and
        dense (``dense_b1``) networks, with the encoder fast path on, and off (``..._nofast``)."""
        fused = {batch: fuse(model, example=torch.randn(batch, 3, 32, 32)).eval() for batch in (1, 32)}
        out = {}
        for fastpath, suffix in ((True, ""), (False, "_nofast")):
            for batch in (1, 32):
                models = {"": model, "fused_": fused[batch], "dense_": dense}
                seconds = latency_ratio(models, batch, self.args.repeats, fastpath)
                out.update({f"{name}b{batch}{suffix}": seconds[name] for name in models})
        return out

    def latency_row(self, dense, name: str, fmt: str, factor: float, dense_params: int) -> None:
        """Time the compressed network's structure (latency does not depend on the factor values, so
        the plain compression stands in for the fitted one) in its own step, for runs that were
        made with ``--no-latency`` while another job shared the machine."""
        if (name, "latency") in self.done:
            return
        small, report = compress(dense, fmt, compression=factor, t=2 if fmt in SEMI else None,
                                 attention=self.args.attention)
        self.record(name, "latency", format=fmt, target=factor, params=report.params,
                    compression=dense_params / report.params, attention=self.args.attention,
                    **self.latencies(small, dense))

    def run(self) -> None:
        dense, spec = self.dense()
        dense_params = sum(p.numel() for p in dense.parameters())
        calibration = calibration_images(self.data, 512, 0)
        for factor in self.args.factors:
            for fmt in self.args.formats:
                name = f"{fmt}-{factor:g}x" + ("" if self.args.attention == "packed" else f"-{self.args.attention}")
                if self.args.latency_only:
                    self.latency_row(dense, name, fmt, factor, dense_params)
                    continue
                if (name, "ft") in self.done:
                    continue
                if time.monotonic() > self.deadline:
                    raise _OutOfTime
                t = 2 if fmt in SEMI else None
                start = time.perf_counter()
                plain, report = compress(dense, fmt, compression=factor, t=t, attention=self.args.attention)
                params = report.params
                common = {"format": fmt, "target": factor, "params": params, "compression": dense_params / params,
                          "attention": self.args.attention}
                if (name, "plain") not in self.done:
                    self.record(name, "plain", test_accuracy=self.accuracy(plain), **common,
                                seconds=round(time.perf_counter() - start, 1))
                start = time.perf_counter()
                fitted, report = compress(dense, fmt, compression=factor, t=t, attention=self.args.attention)
                report = report.with_recovery(recover(fitted, dense, calibration, fit_steps=100, fit_unit="layer"))
                fit_seconds = time.perf_counter() - start
                if (name, "fit") not in self.done:
                    self.record(name, "fit", test_accuracy=self.accuracy(fitted), **common,
                                seconds=round(fit_seconds, 1),
                                ranks={k: list(v) for k, v in report.ranks.items()},
                                **({} if self.args.no_latency else self.latencies(fitted, dense)))
                small_spec = ModelSpec(spec.name, 3, 10, fmt, t, None, report.ranks)
                config = TrainConfig(epochs=self.args.ft_epochs, batch_size=128, lr=self.args.ft_lr, weight_decay=0.05,
                                     optimizer="adamw", schedule="cosine", amp="bf16", seed=0, distill_alpha=0.9,
                                     distill_temperature=4.0, train_subset=self.args.train_subset)
                tuned, history = train_spec(small_spec, self.data, config, self.runs / name, model=fitted,
                                            teacher=dense, device=torch.device("cpu"))
                self.record(name, "ft", test_accuracy=self.accuracy(tuned.float().eval()), **common,
                            epochs=self.args.ft_epochs, lr=self.args.ft_lr,
                            seconds=round(fit_seconds + sum(r["epoch_time"] + r["eval_time"] for r in history), 1))


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dense = next((r for r in rows if r["config"] == "dense" and r["step"] == "train"), None)
    by = {}
    for r in rows:
        if r["config"] != "dense":
            by.setdefault((r["target"], r["format"] + ("" if r.get("attention", "packed") == "packed"
                                                       else f" ({r['attention']})")), {})[r["step"]] = r
    lines = [f"dense vit-tiny: {dense['test_accuracy']:.2%}, {dense['params']:,} parameters, {dense['epochs']} epochs"
             if dense else "dense: not trained yet", "",
             "| target | format | params | compression | plain | fit | fine-tuned | b1 / dense | b32 / dense | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (target, fmt), steps in sorted(by.items(), key=lambda kv: (kv[0][0], FORMATS.index(kv[0][1].split()[0]),
                                                                  kv[0][1])):
        any_row = next(iter(steps.values()))
        cells = [f"{steps[s]['test_accuracy']:.2%}" if s in steps else "-" for s in ("plain", "fit", "ft")]
        timed = steps.get("latency") or (steps["fit"] if "b1" in steps.get("fit", {}) else None)
        speed = [f"{timed[k] / timed['dense_' + k]:.2f}" if timed else "-" for k in ("b1", "b32")]
        seconds = sum(r.get("seconds", 0) for r in steps.values() if r["step"] != "latency")
        lines.append(f"| {target:g}x | {fmt} | {any_row['params']:,} | {any_row['compression']:.2f}x | "
                     + " | ".join(cells + speed) + f" | {seconds:.0f} |")
    timed = [(key, steps["latency"]) for key, steps in sorted(by.items(), key=lambda kv: (
        kv[0][0], FORMATS.index(kv[0][1].split()[0]), kv[0][1])) if "fused_b1" in steps.get("latency", {})]
    if timed:
        first = timed[0][1]
        lines += ["", "Time / dense in the same run (median of the blocks); fast path: PyTorch's encoder fast path "
                  f"on (the default in eval) or off. Dense ms per call: fast path b1 {first['dense_b1'] * 1e3:.2f}, "
                  f"b32 {first['dense_b32'] * 1e3:.2f}; off b1 {first['dense_b1_nofast'] * 1e3:.2f}, "
                  f"b32 {first['dense_b32_nofast'] * 1e3:.2f}.", "",
                  "| target | format | fast b1 factorized | fast b1 fused | fast b32 factorized | fast b32 fused "
                  "| off b1 factorized | off b1 fused | off b32 factorized | off b32 fused |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (target, fmt), r in timed:
            cells = [f"{r[f'{kind}b{b}{mode}'] / r[f'dense_b{b}{mode}']:.2f}"
                     for mode in ("", "_nofast") for b in (1, 32) for kind in ("", "fused_")]
            lines.append(f"| {target:g}x | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "transformer"), help="run directories")
    parser.add_argument("--epochs", type=int, default=12, help="dense training epochs")
    parser.add_argument("--factors", type=float, nargs="*", default=[3, 5, 10])
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--attention", choices=("packed", "separate"), default="packed",
                        help="q/k/v projection as one factorized matrix or three (rows get a '-separate' suffix)")
    parser.add_argument("--time-limit", type=float, help="minutes; stop after the configuration that crosses it")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--train-subset", type=int, help="train and fine-tune on this many images (quick checks)")
    parser.add_argument("--out", default=str(ROOT / "results" / "transformer"), help="where runs.jsonl goes")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the timing (for runs that share the machine); time later with --latency-only")
    parser.add_argument("--latency-only", action="store_true",
                        help="only time each configuration (a 'latency' step); run with nothing else on the machine")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.out) / "runs.jsonl"))
        return
    try:
        Sweep(args).run()
    except _OutOfTime:
        print("time limit reached; rerun the same command to continue", flush=True)
        sys.exit(0)


if __name__ == "__main__":
    main()
