"""How much accuracy a trained network keeps when compressed, before and after each recovery step.

Starts from the shipped trained ResNet-20 (``stpnet.models.pretrained('resnet20-cifar10')``, or
``--dense NAME_OR_CHECKPOINT``, e.g. ``--dense resnet32-cifar10`` once it ships: its steps are
recorded and resumed apart, its runs and metrics in a sub-folder named after it, and ``--report``
prints one table per network) and compresses it to a whole-model factor (9x in all six formats; 20x in
STT, TT, STR, TR). Semi-tensor and classic rows at the same factor have the same parameter count
(within the rank granularity), so each semi-tensor row has its equal-parameter classic control
beside it. For every configuration it records the test accuracy on the full CIFAR-10 (JPEG q75)
test set:

- ``plain``: straight after the decomposition (uniform rule: every layer the same compression);
- ``bn``: plain, then BatchNorm recalibration on the calibration images;
- ``recovered``: the recipe's ranks (``--recipe``, see RECIPES: v2 uniform, v1 allocated by
  weight error; v4 also chooses each layer's t in {1, 2, 4} for the semi-tensor formats) and
  data-aware fitting (100 L-BFGS iterations per layer; the BatchNorm
  statistics stay the dense network's, which the fit targets), with no gradient-descent epoch;
  ``recovered+bn``: then BatchNorm recalibration;
- ``ft1``, ``ft5``, ``ft15``: the recovered network fine-tuned N epochs with the dense network as
  teacher (distillation alpha 0.9, T 4), SGD Nesterov, cosine from ``--lr``, batch 128, bf16 on CPU
  (15 epochs for the STT/TT pairs only, at 9x and 20x: the targets' rows); v5 first sets each
  BatchNorm's statistics to the fitted network's own keeping its function (v4 and v5 fit the same
  network: only the fine-tune differs); v6 is v5 on the uniform rule's ranks (t = 2).

``--long N`` runs only an N-epoch distilled fine-tune (step ``ftN``) of the seed-0 STT/TT 9x pair
(or what ``--only`` selects): how far a longer fine-tune takes the same recovered networks.

The ablation (``--ablation``) on STT 9x adds: rank allocation by weight error and by activation
error, each fitted (against the recipe's ranks), and 5 epochs of fine-tuning without the teacher.

Each fine-tuning run lives in its own run directory (a checkpoint per epoch), so an interrupted
sweep resumes; every finished step appends one JSON line to ``results/recover/runs.jsonl`` and a
rerun skips what is there. ``--time-limit`` stops cleanly after the step that crosses it.

Run (from the repository root):
    .venv/bin/python bench/recover.py --time-limit 120            # the plan, resumable
    .venv/bin/python bench/recover.py --only 'stt-9x-*' --ablation
    .venv/bin/python bench/recover.py --recipe v1 --long 40                # STT/TT 9x, 40 epochs
    .venv/bin/python bench/recover.py --recipe v5 --factor 8.734 --only 'tucker-*'   # one format at a factor
    .venv/bin/python bench/recover.py --recipe v5 --factor 5 --only 'stt-*' --epochs 5   # 5x, 5 epochs only
    .venv/bin/python bench/recover.py --report                     # the table from runs.jsonl
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stpnet.compress import compress
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.app.pipeline import calibration_images, load_trained, normalized_like, train_spec
from stpnet.recovery import recalibrate_batchnorm, recover
from stpnet.train import TrainConfig, evaluate

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DATA = benchmark_data_path("cifar10-jpeg.tar.gz")
SEMI = {"sttu": "tucker", "stt": "tt", "str": "tr"}


#: How the ``recovered`` network is made and fine-tuned. v1: rank allocation by the largest
#: normalised weight error, fine-tuning weight decay 5e-4. v2: uniform ranks (which recovered more
#: before fine-tuning in a first look), and no weight decay on the fine-tuned factors.
_V4 = {"allocation": "weight", "ft_weight_decay": 5e-4, "fit_unit": "block", "fit_steps": 200, "ft_features": 1.0,
       "t_choices": (1, 2, 4)}
RECIPES = {"v1": {"allocation": "weight", "ft_weight_decay": 5e-4},
           "v2": {"allocation": "uniform", "ft_weight_decay": 0.0},
           "v3": {"allocation": "weight", "ft_weight_decay": 5e-4, "fit_unit": "block", "fit_steps": 200,
                  "ft_features": 1.0},
           "v4": _V4,
           "v5": {**_V4, "ft_bn_keep_function": True},
           "v6": {**_V4, "allocation": "uniform", "ft_bn_keep_function": True}}
#: settings a recipe may leave out (fit_steps None: --fit-steps; t_choices: v4 chooses each layer's t
#: of a semi-tensor format among them in the allocation, the plain and bn rows keep t = 2;
#: ft_bn_keep_function: v5 moves every BatchNorm's statistics to the fitted network's own (on augmented
#: calibration images) and rescales its weight and bias to keep the function, before fine-tuning;
#: v6 is v5 on uniform ranks, t = 2: for Tucker and STTu it fitted 12 points better than v3, BENCHMARKS.md)
RECIPE_DEFAULTS = {"fit_unit": "layer", "fit_steps": None, "ft_features": 0.0, "t_choices": None,
                   "ft_bn_keep_function": False}


@dataclass(frozen=True)
class Config:
    format: str
    compression: float
    seed: int = 0
    recipe: str = "v2"

    @property
    def t(self) -> int | None:
        return 2 if self.format in SEMI else None

    @property
    def name(self) -> str:
        suffix = "" if self.recipe == "v1" else f"-{self.recipe}"  # v1 rows predate recipes
        return f"{self.format}-{self.compression:g}x-s{self.seed}{suffix}"

    @property
    def settings(self) -> dict:
        return {**RECIPE_DEFAULTS, **RECIPES[self.recipe]}


def plan(seeds: int, recipe: str) -> list[tuple[Config, tuple[int, ...]]]:
    """(configuration, fine-tuning epochs) in the order that makes a partial sweep most useful."""
    out = [(Config("stt", 9, 0, recipe), (1, 5, 15)), (Config("tt", 9, 0, recipe), (1, 5, 15))]
    out += [(Config(f, 9, 0, recipe), (1, 5)) for f in ("tucker", "sttu", "tr", "str")]
    out += [(Config(f, 20, 0, recipe), (1, 5, 15) if f in ("stt", "tt") else (1, 5)) for f in ("stt", "tt", "str", "tr")]
    for seed in range(1, seeds):
        out += [(Config("stt", 9, seed, recipe), (1, 5, 15)), (Config("tt", 9, seed, recipe), (1, 5, 15))]
    return out


#: The formats ``--factor`` runs (what ``--only`` selects among them).
FACTOR_FORMATS = ("tucker", "sttu", "tt", "stt", "tr", "str")

#: The fine-tuning peak learning rate of every recipe (higher peaks did worse; BENCHMARKS.md).
DEFAULT_LR = 0.01

#: The fine-tuning batch of every recipe.
DEFAULT_BATCH = 128

#: The network rows without a ``source`` came from (the first sweeps recorded none).
DEFAULT_SOURCE = "resnet20-cifar10"


def done_steps(path: Path) -> set[tuple[str, str, str]]:
    """(source network, configuration, step) of every recorded row: a step is done per network."""
    if not path.exists():
        return set()
    rows = map(json.loads, filter(str.strip, path.read_text().splitlines()))
    return {(r.get("source", DEFAULT_SOURCE), r["config"], r["step"]) for r in rows}


class _OutOfTime(Exception):
    pass


class Sweep:
    def __init__(self, args):
        self.args = args
        self.out = ROOT / "results" / "recover"
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "runs.jsonl"
        self.done = done_steps(self.log)
        self.deadline = time.monotonic() + args.time_limit * 60 if args.time_limit else float("inf")
        source = args.dense or DEFAULT_SOURCE
        self.dense, self.spec, state = load_trained(source)
        self.dense.eval()
        self.source = str(source)
        self.data = normalized_like(load_dataset(str(DATA)), state)
        self.dense_params = sum(p.numel() for p in self.dense.parameters())
        # another network's runs live in their own folder (the same configuration names recur)
        self.runs = Path(args.runs) if self.source == DEFAULT_SOURCE else Path(args.runs) / Path(self.source).stem

    # ------------------------------------------------------------------ helpers
    def is_done(self, config: Config, step: str) -> bool:
        return (self.source, config.name, step) in self.done

    def accuracy(self, model) -> float:
        d = self.data
        return evaluate(model, d.test_x, d.test_y, d.mean, d.std, device=torch.device("cpu"))["accuracy"]

    def record(self, config: Config, step: str, **values) -> None:
        row = {"config": config.name, "format": config.format, "target": config.compression, "t": config.t,
               "seed": config.seed, "recipe": config.recipe, "step": step, "source": self.source, "cpu": cpu_model(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, **values}
        with self.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add((self.source, config.name, step))
        acc = values.get("test_accuracy")
        print(f"{config.name:>16} {step:<14} {acc:.4f}  {values.get('seconds', 0):.1f} s", flush=True)

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OutOfTime

    def calibration(self, seed: int) -> torch.Tensor:
        return calibration_images(self.data, self.args.calibration_images, seed)

    def compressed(self, config: Config, *, fit_steps: int = 0, fit_unit: str = "block", recalibrate_bn=False,
                   **options):
        """Compress the dense network for ``config``, then recover it on ``options['calibration']``
        when ``fit_steps`` or ``recalibrate_bn`` ask for it; the model, its report and the seconds."""
        start = time.perf_counter()
        t = None if options.get("t_choices") is not None else config.t
        small, report = compress(self.dense, config.format, compression=config.compression, t=t, **options)
        if fit_steps > 0 or recalibrate_bn:
            report = report.with_recovery(recover(small, self.dense, options["calibration"], fit_steps=fit_steps,
                                                  fit_unit=fit_unit, recalibrate_bn=recalibrate_bn))
        return small, report, time.perf_counter() - start

    # ------------------------------------------------------------------ steps
    def plain_and_bn(self, config: Config) -> None:
        if self.is_done(config, "plain") and self.is_done(config, "bn"):
            return
        small, report, seconds = self.compressed(config)
        params = report.params
        self.record(config, "plain", test_accuracy=self.accuracy(small), params=params,
                    compression=self.dense_params / params, seconds=seconds)
        start = time.perf_counter()
        recalibrate_batchnorm(small, self.calibration(config.seed))
        self.record(config, "bn", test_accuracy=self.accuracy(small), params=params,
                    compression=self.dense_params / params, seconds=seconds + time.perf_counter() - start)

    def recovered(self, config: Config, allocation=None, fit_steps=None, step="recovered", bn=False):
        """The recovered network (cached in its run directory) and its spec; with ``bn`` also the
        accuracy after BatchNorm recalibration on top (step ``<step>+bn``, not cached)."""
        if fit_steps is None:
            fit_steps = config.settings["fit_steps"] or self.args.fit_steps
        allocation = config.settings["allocation"] if allocation is None else allocation
        cache = self.runs / config.name / f"{step}.pt"
        small, report, seconds = None, None, 0.0
        if cache.exists():
            saved = torch.load(cache, weights_only=True)
            spec = ModelSpec.from_dict(saved["spec"])
            small = spec.build()
            small.load_state_dict(saved["model"])
        else:
            t_choices = config.settings["t_choices"] if config.format in SEMI and allocation != "uniform" else None
            small, report, seconds = self.compressed(config, allocation=allocation, fit_steps=fit_steps,
                                                     fit_unit=config.settings["fit_unit"],
                                                     calibration=self.calibration(config.seed),
                                                     recalibrate_bn=fit_steps == 0, t_choices=t_choices)
            spec = ModelSpec(self.spec.name, 3, 10, config.format, config.t if t_choices is None else report.t, None,
                             report.ranks)
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"spec": spec.to_dict(), "model": small.state_dict()}, cache)
        if not self.is_done(config, step):
            params = sum(p.numel() for p in small.parameters())
            fit = report.fit.to_dict()["layers"] if report is not None and report.fit is not None else None
            self.record(config, step, test_accuracy=self.accuracy(small), params=params,
                        compression=self.dense_params / params, seconds=seconds, allocation=allocation,
                        fit_steps=fit_steps, fit_unit=config.settings["fit_unit"],
                        ranks={k: list(v) for k, v in spec.ranks.items()}, fit=fit,
                        layer_t=spec.t if isinstance(spec.t, dict) else None)
        if bn and not self.is_done(config, step + "+bn"):
            with_bn = copy.deepcopy(small)
            start = time.perf_counter()
            recalibrate_batchnorm(with_bn, self.calibration(config.seed))
            params = sum(p.numel() for p in small.parameters())
            self.record(config, step + "+bn", test_accuracy=self.accuracy(with_bn), params=params,
                        compression=self.dense_params / params, seconds=seconds + time.perf_counter() - start)
        return small, spec

    def fine_tune(self, config: Config, epochs: int, distill: bool = True) -> None:
        lr = "" if self.args.lr == DEFAULT_LR else f"-lr{self.args.lr:g}"  # another peak: its own step
        batch = "" if self.args.batch_size == DEFAULT_BATCH else f"-b{self.args.batch_size}"  # so is another batch
        step = f"ft{epochs}{lr}{batch}" + ("" if distill else "-nodistill")
        if self.is_done(config, step):
            return
        small, spec = self.recovered(config)
        self.check_time()
        if config.settings["ft_bn_keep_function"]:
            images = calibration_images(self.data, self.args.calibration_images, config.seed, augment=True)
            recalibrate_batchnorm(small, images, keep_function=True)
        args = self.args
        weight_decay = config.settings["ft_weight_decay"]
        train_config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=weight_decay,
                                   schedule="cosine", seed=config.seed, amp=args.amp, distill_alpha=0.9 if distill else 0.0,
                                   distill_temperature=4.0,
                                   distill_features=config.settings["ft_features"] if distill else 0.0)

        def on_epoch(record):
            print(f"  {config.name} {step} epoch {record['epoch']}/{epochs}: test {record['test_accuracy']:.4f}, "
                  f"{record['epoch_time']:.1f} s", flush=True)
            if time.monotonic() > self.deadline and record["epoch"] < epochs:
                raise _OutOfTime

        run_dir = self.runs / config.name / step
        small, history = train_spec(spec, self.data, train_config, run_dir, model=small,
                                    teacher=self.dense if distill else None, on_epoch=on_epoch,
                                    device=torch.device("cpu"),
                                    extra_metadata={"source": self.source, "recovery": step})
        model = small.float().eval()
        params = sum(p.numel() for p in model.parameters())
        metrics = self.out / "metrics"
        if self.source != DEFAULT_SOURCE:
            metrics = metrics / Path(self.source).stem
        metrics.mkdir(parents=True, exist_ok=True)
        (metrics / f"{config.name}-{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        self.record(config, step, test_accuracy=self.accuracy(model), params=params,
                    compression=self.dense_params / params,
                    seconds=sum(r["epoch_time"] + r["eval_time"] for r in history), lr=args.lr,
                    batch_size=args.batch_size, amp=args.amp,
                    weight_decay=weight_decay, distill_features=train_config.distill_features,
                    bn_keep_function=config.settings["ft_bn_keep_function"],
                    last_epoch_test_accuracy_amp=history[-1]["test_accuracy"])

    def ablation(self) -> None:
        """STT 9x: what each component adds. Rank allocation by weight or by activation error
        instead of uniform ranks (both fitted, no fine-tuning), and 5 epochs without the teacher."""
        config = Config("stt", 9, 0, self.args.recipe)
        self.recovered(config, allocation="weight", step="alloc-weight+fit")
        self.check_time()
        self.recovered(config, allocation="activation", step="alloc-activation+fit")
        self.check_time()
        self.fine_tune(config, 5, distill=False)

    def long_fine_tunes(self) -> None:
        """``--long N``: only the N-epoch distilled fine-tune, of the configurations ``--only``
        selects (default: the seed-0 STT/TT 9x pair), each from its recovered network."""
        patterns = self.args.only or ["stt-9x-s0*", "tt-9x-s0*"]
        for config, _ in plan(self.args.seeds, self.args.recipe):
            if any(fnmatch.fnmatch(config.name, p) for p in patterns):
                self.check_time()
                self.fine_tune(config, self.args.long)

    def dense_row(self) -> None:
        config = Config("dense", 1, recipe="v1")  # the same row whatever the recipe
        if not self.is_done(config, "dense"):
            self.record(config, "dense", test_accuracy=self.accuracy(self.dense), params=self.dense_params,
                        compression=1.0, seconds=0.0)

    def run(self) -> None:
        self.dense_row()
        if self.args.long:
            self.long_fine_tunes()
            return
        if self.args.factor is None:
            configs = plan(self.args.seeds, self.args.recipe)
        else:
            configs = [(Config(f, self.args.factor, seed, self.args.recipe), tuple(self.args.epochs))
                       for seed in range(self.args.seeds) for f in FACTOR_FORMATS]
        for config, epochs in configs:
            if self.args.only and not any(fnmatch.fnmatch(config.name, p) for p in self.args.only):
                continue
            self.plain_and_bn(config)
            self.check_time()
            if not all(self.is_done(config, step) for step in ("recovered", "recovered+bn")):
                self.recovered(config, bn=True)  # otherwise only a fine-tune not yet run needs it
            for n in epochs:
                self.check_time()
                self.fine_tune(config, n)
        if self.args.ablation:
            self.ablation()


def report(path: Path) -> str:
    """One table per source network (the shipped ResNet-20 first)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        r.setdefault("source", DEFAULT_SOURCE)
    sources = sorted({r["source"] for r in rows}, key=lambda name: (name != DEFAULT_SOURCE, name))
    return "\n\n".join(_report_one(name, [r for r in rows if r["source"] == name]) for name in sources)


def _report_one(source: str, rows: list[dict]) -> str:
    dense = next((r["test_accuracy"] for r in rows if r["step"] == "dense"), None)
    steps = ["plain", "bn", "recovered", "recovered+bn", "ft1", "ft5", "ft15"]
    steps += sorted({r["step"] for r in rows if re.fullmatch(r"ft\d+", r["step"]) and r["step"] not in steps},
                    key=lambda step: int(step[2:]))
    by_config: dict[str, dict] = {}
    for r in rows:
        if r["step"] == "dense":
            continue
        key = (r["format"], r["target"], r.get("recipe", "v1"))
        by_config.setdefault(key, {}).setdefault(r["step"], []).append(r)
    lines = [f"dense {source}: {dense:.2%}" if dense is not None else f"dense {source}: not measured", "",
             "params and compression: the allocated network that is fitted and fine-tuned (plain and bn use "
             "the uniform rule, within 2% of it); accuracy on the 10,000 test images; time: wall seconds of "
             "all steps on this machine's cores", "",
             "| format | target | recipe | params | compression | " + " | ".join(steps) + " | time (s) |",
             "|---|---|---|---|---|" + "---|" * len(steps) + "---|"]
    for (fmt, target, recipe), by_step in sorted(by_config.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        any_row = (by_step.get("recovered") or next(iter(by_step.values())))[0]  # the network fine-tuned
        cells = []
        for s in steps:
            values = [r["test_accuracy"] for r in by_step.get(s, [])]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2%}")
            else:
                mean = sum(values) / len(values)
                sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
                cells.append(f"{mean:.2%} ± {sd:.2%} (n={len(values)})")
        seconds = sum(r.get("seconds", 0.0) for rs in by_step.values() for r in rs)
        lines.append(f"| {fmt} | {target:g}x | {recipe} | {any_row['params']:,} | {any_row['compression']:.2f}x | "
                     + " | ".join(cells) + f" | {seconds:.0f} |")
    extra = [r for r in rows if r["step"] in ("uniform+fit", "uniform+fit+bn", "alloc+bn", "alloc-weight+fit",
                                              "alloc-activation+fit", "ft5-nodistill")
             or re.fullmatch(r"ft\d+-(lr|b)\d.*", r["step"])]
    if extra:
        lines += ["", "Ablation, learning rates and batch sizes: " + "; ".join(
            f"{r['config']} {r['step']} {r['test_accuracy']:.2%}" for r in extra)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", help="dense checkpoint to start from (default: the shipped resnet20-cifar10)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "recover"), help="run directories")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 of the STT/TT 9x pair (default 2), or of every "
                        "--factor configuration (default 1)")
    parser.add_argument("--only", nargs="*", help="fnmatch patterns on configuration names, e.g. 'stt-9x-*'")
    parser.add_argument("--ablation", action="store_true", help="also the STT 9x ablation")
    parser.add_argument("--long", type=int, metavar="N",
                        help="only an N-epoch distilled fine-tune of the recovered networks --only selects "
                             "(default: the seed-0 STT/TT 9x pair): how far longer fine-tuning goes")
    parser.add_argument("--factor", type=float,
                        help="instead of the plan: each format at this whole-model factor, seeds 0..--seeds - 1, "
                             "fine-tuned --epochs (with --only), e.g. an allocated network at a uniform one's parameter count, "
                             "or a smaller factor: how much is lost at each size")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5], metavar="N",
                        help="with --factor: the fine-tuning lengths, each its own run (default: 1 5)")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="fine-tuning peak learning rate (another than the default is recorded as step ftN-lrX)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="fine-tuning batch (another than the default is recorded as step ftN-bB)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="v2", help="see RECIPES")
    parser.add_argument("--amp", default="bf16", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--time-limit", type=float, help="minutes; stop after the step that crosses it")
    parser.add_argument("--report", action="store_true", help="print the table from results/recover/runs.jsonl")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = 2 if args.factor is None else 1
    if args.report:
        print(report(ROOT / "results" / "recover" / "runs.jsonl"))
        return
    sweep = Sweep(args)
    try:
        sweep.run()
    except _OutOfTime:
        print("time limit reached; rerun the same command to continue", flush=True)


if __name__ == "__main__":
    main()
