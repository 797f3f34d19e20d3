"""The paper's CIFAR-10 comparison (Zhao et al. 2021), with equal-parameter classic controls.

Configurations, per protocol (``--budget``):
- the ResNet dense; Tucker/STTu, TT/STT and TR/STR at ranks {6, 10, 14} (t = 2 for the
  semi-tensor formats); for every semi-tensor configuration the classic format at the rank whose
  whole-model parameter count is closest (docs/formats-spec.md, section 8), and for TT R = 14 the STT rank with
  the closest count;
- the headline pairs (TT R = 14, STT R = 14 and their two controls) and the dense network with
  ``--seeds`` seeds (default 3);
- the Wide ResNet dense, TR R = 16 and STR R = 16.

Protocols:
- ``full``: ResNet-32 and WRN-28-10, the full 50,000 training images, 200 epochs, SGD lr 0.1
  (Nesterov momentum 0.9, weight decay 5e-4, cosine), batch 128, pad-4 crop + flip (a GPU job).
- ``cpu``: ResNet-20 and WRN-16-2 on a fixed 10,000-image training subset, few epochs (below),
  otherwise the same recipe with lr 0.05 and 1 warm-up epoch; for this 2-core machine.
Both clip gradients to global norm 5 (see BENCHMARKS.md, Fashion-MNIST: products of factors can
diverge under plain SGD) and train every factorized network from a fresh init (kaiming std).

Each configuration trains in its own run directory (a checkpoint per epoch), appends one JSON line
to ``results/paper/<budget>/runs.jsonl`` when it finishes, and copies its per-epoch metrics next to
it. A rerun skips finished configurations and resumes an interrupted one from its last epoch; the
script stops cleanly after the epoch that crosses ``--time-limit`` minutes.

Run:
    .venv/bin/python bench/paper.py --budget cpu [--time-limit 150]
    .venv/bin/python bench/paper.py --budget cpu --latency    # re-time inference (also decompressed), quiet
    .venv/bin/python bench/paper.py --budget cpu --report     # table + Pareto plots from the results
    .venv/bin/python bench/paper.py --budget full --only 'resnet32-tt-r14-*' 'resnet32-stt-r14-*' \\
        --epochs 10                                            # a short GPU slice
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from stpnet.compress import compress, decompress
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.models import build_model
from stpnet.app.pipeline import inference_latency, train_spec
from stpnet.train import TrainConfig, TrainingDivergedError

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

SEMI = {"sttu": "tucker", "stt": "tt", "str": "tr"}  # semi-tensor format -> classic counterpart
RANKS = (14, 10, 6)


@dataclass(frozen=True)
class Protocol:
    resnet: str
    wrn: str
    epochs: int
    wrn_epochs: int
    train_subset: int | None
    lr: float
    warmup_epochs: float
    grad_clip: float = 5.0
    batch_size: int = 128
    weight_decay: float = 5e-4


PROTOCOLS = {
    "full": Protocol("resnet32", "wrn-28-10", epochs=200, wrn_epochs=200, train_subset=None, lr=0.1,
                     warmup_epochs=0.0),
    "cpu": Protocol("resnet20", "wrn-16-2", epochs=5, wrn_epochs=3, train_subset=10_000, lr=0.05,
                    warmup_epochs=1.0),
}


@dataclass(frozen=True)
class Run:
    network: str
    format: str
    rank: int | None
    t: int | None
    seed: int
    role: str  # 'dense', 'grid', 'control' or 'wrn'
    layout: str | None = None

    @property
    def name(self) -> str:
        if self.format == "dense":
            return f"{self.network}-dense-s{self.seed}"
        return f"{self.network}-{self.format}-r{self.rank}-t{self.t}-s{self.seed}"

    @property
    def key(self) -> tuple:
        return self.network, self.format, self.rank, self.t


LATENCY_FIELDS = ("latency_b1", "latency_b128", "dense_latency_b1", "dense_latency_b128")
DECOMPRESSED_FIELDS = tuple(f"decompressed_{k}" for k in LATENCY_FIELDS)  # only from the --latency pass


def layout_for(fmt: str, tt_layout: str) -> str | None:
    return tt_layout if fmt in ("tt", "stt") else None


def build(run: Run) -> tuple[torch.nn.Module, ModelSpec]:
    """The model of ``run`` (fresh init seeded by ``run.seed``) and the spec that rebuilds it."""
    torch.manual_seed(run.seed)
    model = build_model(run.network)
    if run.format == "dense":
        return model, ModelSpec(run.network)
    model, report = compress(model, run.format, rank=run.rank, t=run.t, layout=run.layout, init="random",
                             inplace=True)
    return model, ModelSpec(run.network, 3, 10, run.format, run.t, run.layout, report.ranks)


def param_count(network: str, fmt: str, rank: int, t: int, layout: str | None, cache: dict) -> int:
    key = (network, fmt, rank, t, layout)
    if key not in cache:
        model, _ = build(Run(network, fmt, rank, t, 0, "size", layout))
        cache[key] = sum(p.numel() for p in model.parameters())
    return cache[key]


def closest_rank(network: str, fmt: str, t: int, target: int, layout: str | None, cache: dict,
                 max_rank: int = 40) -> int:
    """The rank (a multiple of t) of ``fmt`` whose whole-model parameter count is closest to ``target``."""
    candidates = range(t, max_rank + 1, t)
    return min(candidates, key=lambda r: (abs(param_count(network, fmt, r, t, layout, cache) - target), r))


def plan(protocol: Protocol, seeds: int, tt_layout: str) -> list[Run]:
    """Every run of the sweep, most informative first (so that a partial sweep is useful)."""
    net, cache = protocol.resnet, {}
    lay = lambda fmt: layout_for(fmt, tt_layout)  # noqa: E731
    runs = [Run(net, "dense", None, None, 0, "dense")]
    grid = [Run(net, fmt, r, 2 if fmt in SEMI else 1, 0, "grid", lay(fmt))
            for r in RANKS for fmt in ("tt", "stt", "tucker", "sttu", "tr", "str")]
    controls = {}  # semi-tensor grid run -> classic run of the closest parameter count
    for g in grid:
        if g.format in SEMI:
            target = param_count(net, g.format, g.rank, g.t, g.layout, cache)
            classic = SEMI[g.format]
            controls[g] = Run(net, classic, closest_rank(net, classic, 1, target, lay(classic), cache), 1, 0,
                              "control", lay(classic))
    tt14, stt14 = (next(g for g in grid if g.rank == 14 and g.format == f) for f in ("tt", "stt"))
    # TT R14 is classic: its control is the STT rank of the closest parameter count
    tt14_control = Run(net, "stt", closest_rank(net, "stt", 2, param_count(net, "tt", 14, 1, tt14.layout, cache),
                                                lay("stt"), cache), 2, 0, "control", lay("stt"))
    headline = [tt14, stt14, controls[stt14], tt14_control]
    ordered = runs + headline
    for seed in range(1, seeds):
        ordered += [replace(r, seed=seed) for r in [runs[0], *headline]]
    ordered += [g for g in grid if g not in headline] + list(controls.values())
    ordered += [Run(protocol.wrn, "dense", None, None, 0, "wrn"), Run(protocol.wrn, "tr", 16, 1, 0, "wrn"),
                Run(protocol.wrn, "str", 16, 2, 0, "wrn")]
    unique, seen = [], set()
    for r in ordered:
        # a control that coincides with a grid configuration is trained once
        if (r.key, r.seed) not in seen:
            seen.add((r.key, r.seed))
            unique.append(r)
    return unique


class _OutOfTime(Exception):
    pass


def train_one(run: Run, protocol: Protocol, data, args, out: Path, deadline: float) -> dict | None:
    """Train ``run`` (resuming), measure latency; return its record, or None when time ran out."""
    model, spec = build(run)
    wrn = run.network == protocol.wrn
    config = TrainConfig(epochs=args.epochs or (protocol.wrn_epochs if wrn else protocol.epochs),
                         batch_size=protocol.batch_size, lr=protocol.lr, weight_decay=protocol.weight_decay,
                         warmup_epochs=protocol.warmup_epochs, grad_clip=protocol.grad_clip, augment=True,
                         seed=run.seed, train_subset=protocol.train_subset)

    def on_epoch(record):
        print(f"  {run.name} epoch {record['epoch']}/{config.epochs}: test {record['test_accuracy']:.4f}, "
              f"{record['epoch_time']:.1f} s", flush=True)
        if time.monotonic() > deadline and record["epoch"] < config.epochs:
            raise _OutOfTime

    run_dir = Path(args.runs) / args.budget / run.name
    device = torch.device(args.device) if args.device != "auto" else None
    try:
        model, history = train_spec(spec, data, config, run_dir, model=model, device=device, on_epoch=on_epoch)
        outcome = {"test_accuracy": history[-1]["test_accuracy"],
                   "epoch_time": statistics.median(r["epoch_time"] for r in history),
                   "train_time": sum(r["epoch_time"] for r in history),
                   "eval_time": sum(r["eval_time"] for r in history)}
    except _OutOfTime:
        return None
    except TrainingDivergedError as exc:
        history, outcome = [], {"test_accuracy": None, "diverged": str(exc)}
    dense = build_model(run.network).to(next(model.parameters()).device)
    latency = measure_latency(model, dense)
    params = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for p in dense.parameters())
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        (out / "metrics").mkdir(parents=True, exist_ok=True)
        shutil.copy(metrics, out / "metrics" / f"{run.name}.jsonl")
    return {**asdict(run), "name": run.name, "params": params, "dense_params": dense_params,
            "compression": dense_params / params, **outcome, **latency, "epochs": config.epochs,
            "history": [r["test_accuracy"] for r in history], "config": config.to_dict(),
            "device": _device_name(next(model.parameters()).device), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def measure_latency(model: torch.nn.Module, dense: torch.nn.Module, rounds: int = 2,
                    prefix: str = "") -> dict[str, float]:
    """Inference latency of ``model`` and of ``dense`` at batch 1 and 128, measured alternately.

    The two are timed in turn ``rounds`` times and the faster time of each is kept (noise on a
    shared machine only ever adds time), so the ratio compares like with like. Keys:
    ``{prefix}latency_b{batch}`` and ``{prefix}dense_latency_b{batch}``.
    """
    latency: dict[str, float] = {}
    for batch in (1, 128):
        shape = (batch, 3, 32, 32)
        mine_key, ref_key = f"{prefix}latency_b{batch}", f"{prefix}dense_latency_b{batch}"
        for _ in range(rounds):
            mine, ref = inference_latency(model, shape), inference_latency(dense, shape)
            latency[mine_key] = min(mine, latency.get(mine_key, math.inf))
            latency[ref_key] = min(ref, latency.get(ref_key, math.inf))
    return latency


def latency_pass(args) -> None:
    """Re-measure the latency of every finished configuration in one quiet process.

    Latency depends only on the architecture, not on the trained values, so each configuration
    is rebuilt from its seed-0 plan entry. Written to ``latency.jsonl``; the report prefers it to
    the numbers taken during the sweep, where each configuration was timed once, right after its
    training, against a dense model timed at that moment.
    """
    out = Path(args.results) / args.budget
    names = {r["name"] for r in read_records(out / "runs.jsonl")}
    runs = [r for r in plan(PROTOCOLS[args.budget], args.seeds, args.tt_layout) if r.seed == 0 and r.name in names]
    if not runs:
        raise SystemExit(f"no finished configurations in {out / 'runs.jsonl'}; run the sweep first")
    device = torch.device("cpu" if args.device == "auto" else args.device)
    dense_models = {}
    with open(out / "latency.jsonl", "w") as f:
        for run in runs:
            model = build(run)[0].to(device)
            if run.network not in dense_models:
                dense_models[run.network] = build_model(run.network).to(device)
            latency = measure_latency(model, dense_models[run.network], rounds=args.latency_rounds)
            if run.format != "dense":  # the same network after stpnet.decompress (deployed at dense speed)
                latency.update(measure_latency(decompress(model), dense_models[run.network],
                                               rounds=args.latency_rounds, prefix="decompressed_"))
            f.write(json.dumps({"name": run.name, **latency, "device": _device_name(device),
                                "torch": torch.__version__}) + "\n")
            print(f"{run.name:32s} b1 {1e3 * latency['latency_b1']:7.2f} ms "
                  f"({latency['latency_b1'] / latency['dense_latency_b1']:.2f}x dense), "
                  f"b128 {1e3 * latency['latency_b128']:7.1f} ms "
                  f"({latency['latency_b128'] / latency['dense_latency_b128']:.2f}x)"
                  + (f"; decompressed b1 {latency['decompressed_latency_b1'] / latency['decompressed_dense_latency_b1']:.2f}x"
                     if "decompressed_latency_b1" in latency else ""), flush=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def sweep(args) -> None:
    protocol = PROTOCOLS[args.budget]
    out = Path(args.results) / args.budget
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "runs.jsonl"
    done = {r["name"] for r in read_records(records_path)}
    runs = [r for r in plan(protocol, args.seeds, args.tt_layout)
            if not args.only or any(fnmatch.fnmatch(r.name, p) for p in args.only)]
    todo = [r for r in runs if r.name not in done]
    print(f"{len(runs)} configurations, {len(runs) - len(todo)} finished, {len(todo)} to run", flush=True)
    if not todo:
        return
    started = time.monotonic()
    deadline = started + 60 * args.time_limit
    data = load_dataset(args.data)
    for run in todo:
        if time.monotonic() > deadline:
            break
        print(f"{run.name} ({run.role})", flush=True)
        record = train_one(run, protocol, data, args, out, deadline)
        if record is None:
            break
        with open(records_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    left = len([r for r in runs if r.name not in {x["name"] for x in read_records(records_path)}])
    print(f"stopped after {(time.monotonic() - started) / 60:.1f} min; {left} configurations left"
          + ("; rerun the same command to continue" if left else ""), flush=True)


def summarize(records: list[dict]) -> list[dict]:
    """One row per configuration: accuracy mean and spread over seeds, the rest from the first seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["network"], r["format"], r["rank"], r["t"]), []).append(r)
    rows = []
    for key, rs in groups.items():
        accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        first = rs[0]
        rows.append({**{k: first[k] for k in ("network", "format", "rank", "t", "role", "params", "compression",
                                              *LATENCY_FIELDS, "epochs")},
                     "accuracy": statistics.mean(accs) if accs else None,
                     "spread": statistics.stdev(accs) if len(accs) > 1 else None,
                     "min": min(accs) if accs else None, "max": max(accs) if accs else None,
                     **{k: first.get(k) for k in DECOMPRESSED_FIELDS},
                     "seeds": len(accs), "diverged": len(rs) - len(accs),
                     "epoch_time": statistics.median(r["epoch_time"] for r in rs if r.get("epoch_time")),
                     "device": first["device"]})
    return rows


def _control_of(row: dict, rows: list[dict]) -> str:
    """Which semi-tensor configuration a classic control matches in parameter count."""
    if row["role"] != "control":
        return ""
    semi = [r for r in rows if r["network"] == row["network"] and r["role"] == "grid" and
            (SEMI.get(r["format"]) == row["format"] or SEMI.get(row["format"]) == r["format"])]
    best = min(semi, key=lambda r: abs(r["params"] - row["params"]), default=None)
    return f"control of {best['format'].upper()} R{best['rank']}" if best else "control"


def _decompressed_ratio(row: dict, batch: int) -> float | None:
    """Latency of the network after ``stpnet.decompress`` over the dense latency timed beside it."""
    if row.get(f"decompressed_latency_b{batch}") is None:
        return None
    return row[f"decompressed_latency_b{batch}"] / row[f"decompressed_dense_latency_b{batch}"]


def _decompressed(row: dict) -> str:
    if _decompressed_ratio(row, 1) is None:
        return "-"
    return " / ".join(f"{_decompressed_ratio(row, b):.2f}" for b in (1, 128))


def _decompressed_summary(rows: list[dict]) -> str:
    """Median and range of the decompressed/dense latency ratios over every configuration."""
    parts = []
    for batch in (1, 128):
        ratios = [x for x in (_decompressed_ratio(r, batch) for r in rows) if x is not None]
        if ratios:
            parts.append(f"batch {batch}: median {statistics.median(ratios):.2f}x "
                         f"({min(ratios):.2f}-{max(ratios):.2f}x, {len(ratios)} configurations)")
    return f"Decompressed networks against dense, {'; '.join(parts)}.\n" if parts else ""


def table(rows: list[dict]) -> str:
    lines = []
    for network in dict.fromkeys(r["network"] for r in rows):
        net_rows = [r for r in rows if r["network"] == network]
        dense = next((r for r in net_rows if r["format"] == "dense"), None)
        order = {"dense": 0, "tucker": 1, "sttu": 2, "tt": 3, "stt": 4, "tr": 5, "str": 6}
        # dense first, then one block per family (Tucker/STTu, TT/STT, TR/STR) by compression
        net_rows.sort(key=lambda r: ((order[r["format"]] + 1) // 2, r["compression"], r["format"]))
        lines += [f"**{network}** ({net_rows[0]['device']})", "",
                  "| format | rank | t | role | params | compression | top-1 % (mean ± sd, n) | drop vs dense "
                  "| train s/epoch (x dense) | latency b1 ms (x dense) | latency b128 ms (x dense) "
                  "| decompressed b1 / b128 (x dense) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in net_rows:
            if r["accuracy"] is None:
                acc, drop = "diverged", "-"
            else:
                acc = f"{100 * r['accuracy']:.2f}"
                if r["seeds"] > 1:
                    acc += f" ± {100 * r['spread']:.2f} (n={r['seeds']}, {100 * r['min']:.2f}-{100 * r['max']:.2f})"
                drop = "-" if dense is None or r is dense else f"{100 * (dense['accuracy'] - r['accuracy']):+.2f}"
            speed = "" if dense is None else f" ({r['epoch_time'] / dense['epoch_time']:.2f})"
            lines.append(
                f"| {r['format'].upper()} | {r['rank'] or '-'} | {r['t'] or '-'} | "
                f"{_control_of(r, net_rows) or r['role']} | {r['params']:,} | {r['compression']:.2f}x | {acc} | "
                f"{drop} | {r['epoch_time']:.1f}{speed} | {1e3 * r['latency_b1']:.2f} "
                f"({r['latency_b1'] / r['dense_latency_b1']:.2f}) | {1e3 * r['latency_b128']:.1f} "
                f"({r['latency_b128'] / r['dense_latency_b128']:.2f}) | {_decompressed(r)} |")
        lines.append("")
    return "\n".join(lines)


def report(args) -> None:
    from stpnet.app.plot import plot_accuracy_vs_compression

    out = Path(args.results) / args.budget
    records = read_records(out / "runs.jsonl")
    if not records:
        raise SystemExit(f"no results in {out / 'runs.jsonl'}; run the sweep first")
    remeasured = {r["name"]: r for r in read_records(out / "latency.jsonl")}
    for r in records:  # latency is per architecture: the seed-0 re-measurement applies to every seed
        fresh = remeasured.get(replace(Run(**{f.name: r[f.name] for f in fields(Run)}), seed=0).name)
        if fresh:
            r.update({k: fresh[k] for k in LATENCY_FIELDS + DECOMPRESSED_FIELDS if k in fresh})
    rows = summarize(records)
    protocol = PROTOCOLS[args.budget]
    minutes = sum(r.get("train_time", 0) + r.get("eval_time", 0) for r in records) / 60
    source = ("Latency re-measured for every configuration in one quiet process (`--latency`, "
              "best of alternating model/dense timings)" if remeasured else
              "Latency measured after each run, in the sweep's process")
    text = (f"Protocol `{args.budget}`: {json.dumps(asdict(protocol))}; {len(records)} runs, "
            f"{minutes:.0f} min of training + evaluation in total. {source}.\n\n" + table(rows)
            + _decompressed_summary(rows))
    (out / "table.md").write_text(text)
    print(text)
    for network in dict.fromkeys(r["network"] for r in rows):
        points = [{"format": r["format"], "compression": r["compression"], "accuracy": r["accuracy"],
                   "error": r["spread"] or 0, "label": f"R{r['rank']}" if r["rank"] else ""}
                  for r in rows if r["network"] == network and r["accuracy"] is not None]
        path = plot_accuracy_vs_compression(points, out / f"pareto-{network}.png",
                                            title=f"CIFAR-10, {network}, protocol '{args.budget}'")
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--budget", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--data", default=str(benchmark_data_path("cifar10-jpeg.tar.gz")))
    parser.add_argument("--time-limit", type=float, default=150.0, help="minutes; stop after the epoch that crosses it")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the headline pairs and the dense network")
    parser.add_argument("--epochs", type=int, help="override the protocol's epochs (a short slice)")
    parser.add_argument("--only", nargs="*", help="run only configurations whose name matches these patterns")
    parser.add_argument("--tt-layout", choices=("paired", "sequential"), default="paired",
                        help="TT/STT tensorization (paired reproduces the paper's compression factors)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", default="results/paper")
    parser.add_argument("--runs", default="runs/paper")
    parser.add_argument("--report", action="store_true", help="write the table and plots from the results")
    parser.add_argument("--plan", action="store_true", help="list the configurations and their sizes, then stop")
    parser.add_argument("--latency", action="store_true",
                        help="re-measure the inference latency of every finished configuration (quiet machine)")
    parser.add_argument("--latency-rounds", type=int, default=3, help="alternations of model and dense per batch size")
    args = parser.parse_args()
    if args.plan:
        for run in plan(PROTOCOLS[args.budget], args.seeds, args.tt_layout):
            model, _ = build(run)
            n = sum(p.numel() for p in model.parameters())
            print(f"{run.name:32s} {run.role:8s} {n:>10,}")
    elif args.latency:
        latency_pass(args)
    elif args.report:
        report(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
