"""Which recovery settings should ``stpnet demo`` use? The compression demo under named settings.

Each variant runs :func:`stpnet.app.demo.run_compression_demo` (the shipped ResNet-20 compressed 9x,
recovered and fine-tuned on the embedded 5,000 CIFAR-10 (JPEG q75) training images, accuracy on
the embedded 1,000 test images) with every setting spelled out, so a row means the same thing
whatever the library's defaults are. One JSON line per format goes to
``results/demo/settings.jsonl`` with the settings, the accuracies and the seconds.

The seconds are only comparable between variants run under the same load; the demo's own time
budget (5 minutes on 2 cores) is measured with ``time ./run demo`` on an idle machine
(BENCHMARKS.md, "The demo").

Run (from the repository root):
    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_settings.py fit20 fit60-epochs3-keep-function --formats stt
    .venv/bin/python bench/demo_settings.py --list
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stpnet.app.demo import run_compression_demo

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "demo"

#: The base the variants change: 20 fitting steps, one epoch, BatchNorm left as it is.
FIT20 = {"fit_steps": 20, "calibration_size": 256, "fine_tune_epochs": 1, "bn_keep_function": False,
         "distill_features": 0.0, "t_choices": None}
VARIANTS = {
    "fit20": FIT20,
    "features": {**FIT20, "distill_features": 1.0},
    "keep-function": {**FIT20, "bn_keep_function": True},
    "fit60": {**FIT20, "fit_steps": 60},
    "fit120": {**FIT20, "fit_steps": 120},
    "epochs3": {**FIT20, "fine_tune_epochs": 3},
    "fit60-cal512": {**FIT20, "fit_steps": 60, "calibration_size": 512},
    "fit60-t124": {**FIT20, "fit_steps": 60, "t_choices": (1, 2, 4)},
    "fit60-keep-function": {**FIT20, "fit_steps": 60, "bn_keep_function": True},
    "fit60-epochs3": {**FIT20, "fit_steps": 60, "fine_tune_epochs": 3},
    "fit60-epochs2-keep-function": {**FIT20, "fit_steps": 60, "fine_tune_epochs": 2, "bn_keep_function": True},
    # the settings ``stpnet demo`` uses
    "fit60-epochs3-keep-function": {**FIT20, "fit_steps": 60, "fine_tune_epochs": 3, "bn_keep_function": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="names from VARIANTS (see --list)")
    parser.add_argument("--formats", nargs="+", default=["tt", "stt", "str"])
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args()
    if args.list or not args.variants:
        for name, settings in VARIANTS.items():
            print(f"{name}: {settings}")
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        settings = VARIANTS[name]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out_dir:
            rows, _ = run_compression_demo(tuple(args.formats), out_dir=out_dir, **settings)
        total = time.perf_counter() - start
        with (OUT / "settings.jsonl").open("a") as f:
            for row in rows[1:]:
                f.write(json.dumps({"variant": name, "settings": settings, **row, "threads": torch.get_num_threads(),
                                    "dense_accuracy": rows[0]["accuracy"], "total_seconds": total}) + "\n")
        for row in rows[1:]:
            print(f"{name:>20} {row['format']:>4}: plain {row['plain']:.1%}, recovered {row['recovered']:.1%}, "
                  f"final {row['accuracy']:.1%}, {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
