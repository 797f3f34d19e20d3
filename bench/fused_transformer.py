"""Inference latency of fused transformers against dense: the ViT and the language model, batch 1 and 32.

For each network (``vit``: ``stpnet.models.vit_tiny``, 4 ``nn.TransformerEncoderLayer`` blocks run
through PyTorch's encoder fast path in eval; ``lm``: the GPT-style model of
``bench/language_model.py``, HuggingFace GPT-2 where ``transformers`` is installed, else its own
``TinyGPT``), random weights (the structure alone sets the time), each format and factor, and each
batch: ``stpnet.compress(dense, fmt, compression=X)`` (attention projections, MLP and embeddings
included), then ``stpnet.fuse(small, example=x)`` for that batch. Dense, factorized and fused are
timed in one process in alternating blocks (``bench/latency.py``'s ``time_in_blocks``: every
model a warm-up and a block of calls in each of ``--rounds`` rounds, the median per model), forward only under
``no_grad``, ``--threads`` intra-op threads. ``fused`` checks its cached weights' bits on every
call (``watch='bits'``, the default); ``fused_versions`` is ``fuse(..., watch='versions')``, the
serving mode that checks version counters only. Printed: the ratios to dense, dense
milliseconds, and the forms ``fuse`` chose (``--profile``: the fused model's top operators).

Run (from the repository root; ratios are only meaningful with nothing else running):
    .venv/bin/python bench/fused_transformer.py                      # vit and lm, stt 3x, batch 1 and 32
    .venv/bin/python bench/fused_transformer.py --models vit --formats stt tt tucker --repeats 60
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

import torch

import stpnet
from stpnet.models import build_model

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)
from latency import time_in_blocks  # bench/latency.py

SEMI = {"sttu", "stt", "str"}


def network(name: str, arch: str) -> tuple[torch.nn.Module, callable, callable]:
    """The dense network, a function making an input batch, and one running a model to its output tensor."""
    torch.manual_seed(0)
    if name == "vit":
        return build_model("vit-tiny").eval(), lambda b: torch.randn(b, 3, 32, 32), lambda m, x: m(x)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from language_model import ModelConfig, build, logits_of, resolve_arch

    config = ModelConfig()
    dense = build(resolve_arch(arch), config).eval()
    return dense, lambda b: torch.randint(0, 256, (b, config.context)), logits_of


def forms(model: torch.nn.Module) -> dict[str, int]:
    """How many layers run in each form (fused layers by form, kept factorized layers by path)."""
    from stpnet.deploy.fused import FusedLayer
    from stpnet.nn import FactorizedLayer

    count = collections.Counter()
    for m in model.modules():
        if isinstance(m, FusedLayer):
            count[f"{type(m).__name__}:{m.form}"] += 1
        elif isinstance(m, FactorizedLayer):
            count[f"{type(m).__name__}:{m.forward_path}"] += 1
    return dict(count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit", "lm"], choices=["vit", "lm"])
    parser.add_argument("--arch", default="auto", choices=["auto", "hf", "own"], help="the language model's (lm)")
    parser.add_argument("--formats", nargs="+", default=["stt"])
    parser.add_argument("--factors", nargs="+", type=float, default=[3.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per model, over all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (each a block per model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print the fused model's top operators")
    parser.add_argument("--json", type=Path, help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"# {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}")
    for name in args.models:
        dense, make, run = network(name, args.arch)
        for fmt in args.formats:
            for factor in args.factors:
                small, report = stpnet.compress(dense, fmt, compression=factor, t=2 if fmt in SEMI else None)
                small.eval()
                for batch in args.batches:
                    x = make(batch)
                    with torch.no_grad():
                        fused = stpnet.fuse(small, example=x).eval()
                        served = stpnet.fuse(small, example=x, watch="versions").eval()
                        models = {"dense": dense, "factorized": small, "fused": fused, "fused_versions": served}
                        times = time_in_blocks({k: (lambda v, m=m, run=run: run(m, v)) for k, m in models.items()}, x,
                                               args.repeats, rounds=args.rounds)
                    row = {"model": name, "format": fmt, "factor": factor, "batch": batch,
                           "compression": round(sum(p.numel() for p in dense.parameters()) / report.params, 2),
                           "dense_ms": round(times["dense"] * 1e3, 3),
                           "factorized_ratio": round(times["factorized"] / times["dense"], 3),
                           "fused_ratio": round(times["fused"] / times["dense"], 3),
                           "fused_versions_ratio": round(times["fused_versions"] / times["dense"], 3),
                           "forms": forms(fused), "forms_versions": forms(served),
                           "repeats": args.repeats, "rounds": args.rounds, "threads": args.threads,
                           "cpu": cpu_model(), "torch": torch.__version__}
                    print(f"{name:>4} {fmt:>6} {factor:g}x batch {batch:>3}: dense {row['dense_ms']:.3f} ms, "
                          f"factorized {row['factorized_ratio']:.3f}x, fused {row['fused_ratio']:.3f}x, "
                          f"fused watch='versions' {row['fused_versions_ratio']:.3f}x  {row['forms']}",
                          flush=True)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    if args.profile:
                        with torch.no_grad(), torch.profiler.profile() as prof:
                            for _ in range(5):
                                fused(x)
                        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
