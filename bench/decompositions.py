"""Benchmark: stpnet decompositions vs TensorLy, and stpnet.stp vs the `semi-tensor-product` package.

Run from the repository root:

    .venv/bin/python bench/decompositions.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/decompositions.py --quick    # fewer repeats
    .venv/bin/python bench/decompositions.py --output tables.md

Part 1 decomposes three synthetic tensors (fixed seeds) with stpnet and with TensorLy at the same
ranks and settings, and with stpnet's semi-tensor formats (STTu, STT, STR). Part 2 times the
semi-tensor product of matrices against ``stp.sp`` (the PyPI package ``semi-tensor-product``,
which builds the Kronecker products explicitly).

Fairness notes
--------------
* TensorLy runs on its ``pytorch`` backend with the same torch tensor as stpnet: both then call
  the same LAPACK SVD through ``torch.linalg.svd``. On this machine the pytorch backend was faster
  than the numpy one for every TensorLy call in this script (pass ``--tl-backend numpy`` to see).
* TensorLy's ``tucker`` runs HOOI sweeps by default. ``n_iter_max=0`` returns its HOSVD
  initialisation unchanged (the loop in ``partial_tucker`` does not run), so "HOSVD" rows use
  stpnet ``n_iter=0`` vs TensorLy ``n_iter_max=0``; "HOOI" rows use stpnet ``n_iter=K`` vs TensorLy
  ``n_iter_max=K, tol=0`` (``tol=0`` disables TensorLy's early stop, so both do K sweeps; stpnet
  stops early only if the error changes by < 1e-12 between sweeps).
* TT and TR are the SVD algorithms in both libraries (no ALS), at the same rank caps.
* Timings: ``time.perf_counter``, one warm-up call each, then the repeats with the two libraries
  interleaved (so drift hits both), median reported (the check table also gives the ratio of the
  minima). NumPy-based code (``stp.sp``, TensorLy's numpy backend) is timed in separate blocks
  instead: see ``bench_blocks``.
* The machine may be shared: each section reports the CPU time other processes used meanwhile.
  Numbers taken while that is high are not meaningful (2 torch threads on 2 cores degrade badly
  when a core is taken away).
* Because stpnet and TensorLy run the same algorithm at the same ranks, their errors agree (the
  "equal err" column checks it); the time ratio at the same rank is then the ratio at equal error.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import stpnet
from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

try:
    import tensorly as tl
    from tensorly.decomposition import tensor_ring, tensor_train, tucker
except ImportError:  # pragma: no cover - the bench extra is required
    sys.exit("tensorly is required: pip install -e '.[bench]'")
try:
    import stp as stp_pkg
    from stp import sp as stp_sp
except ImportError:  # pragma: no cover
    sys.exit("semi-tensor-product is required: pip install -e '.[bench]'")


# ----------------------------------------------------------------------------- helpers


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Warm each callable up once, then run them interleaved ``repeats`` times.

    Returns (median seconds per name, last result per name, minimum seconds per name).
    """
    results = {name: fn() for name, fn in fns.items()}  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dt, results[name] = timed(fn)
            times[name].append(dt)
    return ({k: statistics.median(v) for k, v in times.items()}, results,
            {k: min(v) for k, v in times.items()})


def bench_blocks(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Time each callable in its own block: one warm-up call, then ``repeats`` calls.

    Used where NumPy (OpenBLAS) and torch (MKL/OpenMP) calls would otherwise alternate: on a
    2-core machine the BLAS threads that one library leaves spinning after a call slow the next
    call of the other library by up to 10-50x, which would measure the thread hand-over rather
    than the product.
    """
    med, results, best = {}, {}, {}
    for name, fn in fns.items():
        results[name] = fn()  # warm-up
        times = []
        for _ in range(repeats):
            dt, results[name] = timed(fn)
            times.append(dt)
        med[name] = statistics.median(times)
        best[name] = min(times)
    return med, results, best


class CpuMeter:
    """CPU time used by *other* processes while a section ran (from /proc/stat and os.times).

    The benchmark machine may be shared; this makes contention visible next to the numbers.
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        busy = None
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def report(self) -> str:
        wall0, busy0, own0 = self.start
        wall1, busy1, own1 = self._read()
        wall = wall1 - wall0
        if busy0 is None or busy1 is None or wall <= 0:
            return f"{wall:.1f} s wall"
        other = max(busy1 - busy0 - (own1 - own0), 0.0)
        cores = len(os.sched_getaffinity(0))
        return (f"{wall:.1f} s wall; other processes used {other:.1f} CPU-s "
                f"({100 * other / (wall * cores):.0f}% of {cores} cores) meanwhile")


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def rel_err(X: torch.Tensor, Y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(X - Y.to(X.dtype)) / torch.linalg.vector_norm(X))


# --------------------------------------------------------------------------- test data
def gaussian_tensor(dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(64, 64, 64, generator=g, dtype=torch.float64).to(dtype)


def conv_kernel() -> torch.Tensor:
    """A 256x256x3x3 (out, in, kh, kw) kernel: low rank plus noise, kaiming scale.

    The (out) x (in*3*3) matricization is U diag(s) V^T with random orthonormal U, V and a
    decaying spectrum s_j = exp(-j / 24), j < 256, plus Gaussian noise of relative Frobenius norm
    0.1; then scaled so that the entries have the kaiming-normal std sqrt(2 / (in*3*3)).
    """
    g = torch.Generator().manual_seed(2021)
    out_c, in_c, k = 256, 256, 3
    cols = in_c * k * k
    U = torch.linalg.qr(torch.randn(out_c, out_c, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, out_c, generator=g, dtype=torch.float64)).Q
    s = torch.exp(-torch.arange(out_c, dtype=torch.float64) / 24)
    W = (U * s) @ V.T
    noise = torch.randn(out_c, cols, generator=g, dtype=torch.float64)
    W = W + 0.1 * noise * (torch.linalg.vector_norm(W) / torch.linalg.vector_norm(noise))
    W = W * (math.sqrt(2.0 / cols) / W.std())
    return W.reshape(out_c, in_c, k, k)


def tensorize_sequential(W: torch.Tensor) -> torch.Tensor:
    """TT 'sequential' layout of docs/formats-spec.md, section 9: modes [I_1, I_2, I_3, k*k, O_1, O_2, O_3].

    Exactly: W (out=256, in=256, 3, 3) -> permute to (in, kh, kw, out) -> reshape to
    (4, 8, 8, 9, 4, 8, 8), row-major, so in = i1*64 + i2*8 + i3 (256 = 4*8*8), the spatial
    index is kh*3 + kw, and out = o1*64 + o2*8 + o3 (256 = 4*8*8).
    """
    return W.permute(1, 2, 3, 0).reshape(4, 8, 8, 9, 4, 8, 8).contiguous()


def tt_plus_noise(dtype) -> torch.Tensor:
    """A 16x16x16x16 tensor of TT rank 8 plus Gaussian noise of relative Frobenius norm 0.01."""
    g = torch.Generator().manual_seed(7)
    X = stpnet.TTTensor.random((16, 16, 16, 16), rank=8, dtype=torch.float64, generator=g).to_tensor().detach()
    N = torch.randn(X.shape, generator=g, dtype=torch.float64)
    X = X + 0.01 * N * (torch.linalg.vector_norm(X) / torch.linalg.vector_norm(N))
    return X.to(dtype)


# ------------------------------------------------------------------- decomposition runs
def tl_params(factors) -> int:
    return sum(math.prod(f.shape) for f in factors)


def tl_backend_tensor(X: torch.Tensor, backend: str):
    return X if backend == "pytorch" else X.numpy()


def tl_to_torch(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def decomposition_suite(name: str, X: torch.Tensor, specs: dict, repeats: int, backend: str):
    """Run one tensor's table. Returns (markdown table, list of target-check rows)."""
    Xtl = tl_backend_tensor(X, backend)
    rows, checks = [], []
    dense = X.numel()

    # --- classic formats: stpnet vs tensorly at the same settings
    for fmt, rank, n_iter, label in specs["classic"]:
        if fmt == "tucker":
            s_fn = lambda: stpnet.decompose(X, "tucker", rank=rank, n_iter=n_iter)  # noqa: E731
            t_fn = lambda: tucker(Xtl, list(rank), n_iter_max=n_iter, init="svd", tol=0)  # noqa: E731
            t_dense = lambda r: tl_to_torch(tl.tucker_to_tensor(r))  # noqa: E731
            t_factors = lambda r: [r[0], *r[1]]  # noqa: E731
            t_rank = lambda r: tuple(int(s) for s in r[0].shape)  # noqa: E731
        elif fmt == "tt":
            s_fn = lambda: stpnet.decompose(X, "tt", rank=rank)  # noqa: E731
            t_fn = lambda: tensor_train(Xtl, rank)  # noqa: E731
            t_dense = lambda r: tl_to_torch(tl.tt_to_tensor(r))  # noqa: E731
            t_factors = lambda r: list(r)  # noqa: E731
            t_rank = lambda r: tuple(int(f.shape[2]) for f in r[:-1])  # noqa: E731
        else:
            s_fn = lambda: stpnet.decompose(X, "tr", rank=rank)  # noqa: E731
            t_fn = lambda: tensor_ring(Xtl, rank)  # noqa: E731
            t_dense = lambda r: tl_to_torch(tl.tr_to_tensor(r))  # noqa: E731
            t_factors = lambda r: list(r)  # noqa: E731
            t_rank = lambda r: tuple(int(f.shape[0]) for f in r)  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # NumPy-backend TensorLy uses OpenBLAS threads: time it in blocks (see bench_blocks)
            runner = bench_interleaved if backend == "pytorch" else bench_blocks
            med, res, best = runner({"stpnet": s_fn, "tensorly": t_fn}, repeats)
        s_res, t_res = res["stpnet"], res["tensorly"]
        s_err = stpnet.relative_error(X, s_res)
        t_err = rel_err(X, t_dense(t_res))
        t_np = tl_params(t_factors(t_res))
        ratio = med["stpnet"] / med["tensorly"]
        eps = 1e-6 if X.dtype == torch.float64 else 1e-3
        same_err = abs(s_err - t_err) <= eps * max(t_err, 1e-6)
        algo = label
        rows.append(["stpnet", fmt, algo, str(s_res.rank), "1", str(s_res.num_params),
                     f"{s_res.compression_ratio:.1f}", f"{s_err:.6f}", fmt_time(med["stpnet"]),
                     f"{ratio:.2f}"])
        rows.append(["tensorly", fmt, algo, str(t_rank(t_res)), "-", str(t_np), f"{dense / t_np:.1f}",
                     f"{t_err:.6f}", fmt_time(med["tensorly"]), ""])
        checks.append([name, fmt, algo, str(s_res.rank), f"{s_err:.6f}", f"{t_err:.6f}",
                       "yes" if same_err else "NO", fmt_time(med["stpnet"]), fmt_time(med["tensorly"]),
                       f"{ratio:.2f}", f"{best['stpnet'] / best['tensorly']:.2f}",
                       ("met" if ratio <= 1.0 else "missed") if fmt in ("tucker", "tt") else "(no target)"])

    # --- stpnet only: semi-tensor formats (and param-matched classic rows, docs/formats-spec.md, section 8)
    for fmt, rank, t, n_iter, label in specs["semi"]:
        fn = lambda: stpnet.decompose(X, fmt, rank=rank, t=t, n_iter=n_iter)  # noqa: E731
        med, res, _ = bench_interleaved({"s": fn}, repeats)
        r = res["s"]
        err = stpnet.relative_error(X, r)
        t_str = str(r.t if not isinstance(r.t, tuple) else "x".join(map(str, r.t)))
        rows.append(["stpnet", fmt, label, str(r.rank), t_str, str(r.num_params),
                     f"{r.compression_ratio:.1f}", f"{err:.6f}", fmt_time(med["s"]), ""])

    headers = ["library", "format", "algorithm", "rank", "t", "params", "compression", "rel. error",
               "median time", "stpnet/tensorly"]
    return markdown_table(headers, rows), checks


def decomposition_benchmarks(args, out: list[str]):
    repeats = args.repeats
    dtypes = [torch.float64] + ([torch.float32] if args.float32 else [])
    all_checks = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        W = conv_kernel().to(dtype)
        tensors = [
            (
                f"Gaussian 64x64x64 ({dname}, seed 1234)",
                gaussian_tensor(dtype),
                {
                    "classic": [
                        ("tucker", (16, 16, 16), 0, "HOSVD"),
                        ("tucker", (16, 16, 16), 5, "HOSVD+5 HOOI"),
                        ("tt", 16, 0, "TT-SVD"),
                        ("tr", 8, 0, "TR-SVD"),
                    ],
                    "semi": [
                        ("sttu", (16, 16, 16), 2, 0, "ST-HOSVD"),
                        ("sttu", (16, 16, 16), 2, 5, "ST-HOSVD+5 HOOI"),
                        ("sttu", (16, 16, 16), 4, 0, "ST-HOSVD"),
                        ("stt", 16, 2, 0, "STT-SVD"),
                        ("tt", 8, 1, 0, "TT-SVD, params ~ stt t=2"),
                        ("stt", 16, 4, 0, "STT-SVD"),
                        ("str", 8, 2, 0, "STR-SVD"),
                        ("str", 8, 4, 0, "STR-SVD"),
                    ],
                },
            ),
            (
                f"conv kernel 256x256x3x3 low-rank+noise ({dname}, seed 2021); Tucker on (256,256,3,3), "
                "TT/TR on sequential (4,8,8,9,4,8,8)",
                None,  # two tensorizations, handled below
                None,
            ),
            (
                f"TT rank 8 16x16x16x16 + 1% noise ({dname}, seed 7)",
                tt_plus_noise(dtype),
                {
                    "classic": [
                        ("tucker", (8, 12, 12, 8), 0, "HOSVD"),
                        ("tucker", (8, 12, 12, 8), 5, "HOSVD+5 HOOI"),
                        ("tt", 8, 0, "TT-SVD"),
                        ("tr", (2, 8, 8, 8, 2), 0, "TR-SVD"),
                    ],
                    "semi": [
                        ("sttu", (8, 12, 12, 8), 2, 0, "ST-HOSVD"),
                        ("stt", 8, 2, 0, "STT-SVD"),
                        ("tt", 4, 1, 0, "TT-SVD, params ~ stt t=2"),
                        ("stt", 16, 2, 0, "STT-SVD"),
                        ("stt", 16, 4, 0, "STT-SVD"),
                        ("str", (4, 8, 8, 8, 4), 2, 0, "STR-SVD"),
                        ("tr", (2, 8, 8, 8, 2), 1, 20, "TR-SVD+ALS n_iter=20 (default n_restarts=3)"),
                    ],
                },
            ),
        ]
        for title, X, specs in tensors:
            meter = CpuMeter()
            if X is None:
                # conv kernel: Tucker-2-style on the 4-way kernel (docs/formats-spec.md, section 9: Tucker/STTu
                # on the channel modes, spatial modes kept in the core at full size 3x3), TT/TR on
                # the 7-way sequential tensorization.
                tables = []
                checks = []
                tab, chk = decomposition_suite(
                    "conv 4-way", W.contiguous(),
                    {
                        "classic": [
                            ("tucker", (64, 64, 3, 3), 0, "HOSVD"),
                            ("tucker", (64, 64, 3, 3), 5, "HOSVD+5 HOOI"),
                        ],
                        "semi": [
                            ("sttu", (64, 64, 3, 3), (2, 2, 1, 1), 0, "ST-HOSVD"),
                            ("sttu", (64, 64, 3, 3), (2, 2, 1, 1), 5, "ST-HOSVD+5 HOOI"),
                            ("sttu", (64, 64, 3, 3), (4, 4, 1, 1), 0, "ST-HOSVD"),
                        ],
                    },
                    repeats, args.tl_backend,
                )
                tables.append("Tucker on the 4-way kernel (out, in, kh, kw):\n\n" + tab)
                checks += chk
                Xs = tensorize_sequential(W)
                tab, chk = decomposition_suite(
                    "conv 7-way seq", Xs,
                    {
                        "classic": [
                            ("tt", 14, 0, "TT-SVD"),
                            ("tr", (2, 2, 12, 12, 12, 12, 12, 2), 0, "TR-SVD"),
                        ],
                        "semi": [
                            ("stt", 14, 2, 0, "STT-SVD"),
                            ("tt", 7, 1, 0, "TT-SVD, params ~ stt t=2"),
                            ("stt", 16, 4, 0, "STT-SVD"),
                            ("str", (4, 4, 12, 12, 12, 12, 12, 4), 2, 0, "STR-SVD"),
                        ],
                    },
                    repeats, args.tl_backend,
                )
                tables.append("TT / TR on the sequential tensorization (4,8,8,9,4,8,8):\n\n" + tab)
                checks += chk
                body = "\n\n".join(tables)
            else:
                body, checks = decomposition_suite(title.split(" (")[0], X, specs, repeats, args.tl_backend)
            emit(out, f"### {title}\n\n{body}\n\n({meter.report()})\n")
            all_checks += [[dname, *c] for c in checks]

    headers = ["dtype", "tensor", "format", "algorithm", "rank", "err stpnet", "err tensorly", "equal err",
               "stpnet", "tensorly", "ratio (medians)", "ratio (minima)", "target: median ratio <= 1.0"]
    emit(out, "### Equal-error check (same algorithm, same ranks: equal error, so the time ratio is at "
              "equal error)\n\n" + markdown_table(headers, all_checks) + "\n")


# ------------------------------------------------------------------------------ STP runs
def stp_benchmarks(args, out: list[str]):
    rng = np.random.default_rng(42)
    cases = [
        ((64, 256), (32, 64)),      # n = 8 p
        ((256, 1024), (64, 256)),   # n = 16 p  (the size the summary table quotes)
        ((1024, 2048), (128, 512)),  # n = 16 p, largest where the Kronecker form still fits easily
        ((128, 64), (512, 128)),    # p = 8 n   (the other fast path)
        ((64, 96), (64, 64)),       # neither divides: lcm case
    ]
    rows, verdict = [], ""
    meter = CpuMeter()
    for (m, n), (p, q) in cases:
        A = rng.standard_normal((m, n)).astype(np.float32)
        B = rng.standard_normal((p, q)).astype(np.float32)
        At, Bt = torch.from_numpy(A), torch.from_numpy(B)
        reps = args.stp_repeats if m * n < 1_000_000 else max(2, args.stp_repeats // 4)
        med, res, _ = bench_blocks(
            {
                "stpnet_np": lambda: stpnet.stp(A, B),
                "stpnet_torch": lambda: stpnet.stp(At, Bt),
                "stp.sp": lambda: stp_sp(A, B),
            },
            reps,
        )
        ref = res["stp.sp"]
        ok_np = np.allclose(res["stpnet_np"], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
        ok_t = np.allclose(res["stpnet_torch"].numpy(), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
        rows.append([
            f"{m}x{n} ⋉ {p}x{q}", f"{res['stpnet_np'].shape[0]}x{res['stpnet_np'].shape[1]}",
            fmt_time(med["stpnet_np"]), fmt_time(med["stpnet_torch"]), fmt_time(med["stp.sp"]),
            f"{med['stp.sp'] / med['stpnet_np']:.1f}x", f"{med['stp.sp'] / med['stpnet_torch']:.1f}x",
            f"{res['stpnet_np'].dtype} / {ref.dtype}", "yes" if (ok_np and ok_t) else "NO", str(reps),
        ])
        if (m, n, p, q) == (256, 1024, 64, 256):
            sn, st = med["stp.sp"] / med["stpnet_np"], med["stp.sp"] / med["stpnet_torch"]
            verdict = (f"Target (stpnet >= 10x faster than stp.sp at 256x1024 ⋉ 64x256 float32): "
                       f"numpy in/out {sn:.1f}x ({'met' if sn >= 10 else 'missed'}), "
                       f"torch in/out {st:.1f}x ({'met' if st >= 10 else 'missed'}).")
    headers = ["A ⋉ B (float32)", "result", "stpnet (numpy in/out)", "stpnet (torch in/out)", "stp.sp (numpy)",
               "speedup numpy", "speedup torch", "dtype stpnet / stp.sp", "allclose", "repeats"]
    emit(out, "### STP: stpnet.stp vs stp.sp (semi-tensor-product "
              f"{getattr(stp_pkg, '__version__', '0.0.4')})\n\n" + markdown_table(headers, rows)
         + f"\n\n{verdict}\n\nstp.sp builds np.kron(A, I) and np.kron(B, I) with float64 identities, so it "
         "computes and returns float64; stpnet keeps float32. Each function is timed in its own block "
         f"(warm-up, then the repeats), median.\n\n({meter.report()})\n")


def emit(out: list[str], text: str):
    print(text, flush=True)
    out.append(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--output", metavar="FILE", help="also write the markdown tables to FILE")
    ap.add_argument("--float32", action="store_true", help="also run the decompositions in float32")
    ap.add_argument("--tl-backend", choices=["pytorch", "numpy"], default="pytorch",
                    help="TensorLy backend (default pytorch: same SVD as stpnet, and faster here)")
    ap.add_argument("--skip-stp", action="store_true", help="skip the STP timing")
    ap.add_argument("--skip-decompositions", action="store_true", help="skip the decomposition tables")
    args = ap.parse_args(argv)
    args.repeats = 2 if args.quick else 7
    args.stp_repeats = 5 if args.quick else 30

    default_threads = torch.get_num_threads()
    torch.set_num_threads(default_threads)
    tl.set_backend(args.tl_backend)

    out: list[str] = []
    try:
        import importlib.metadata as md
        stp_version = md.version("semi-tensor-product")
    except Exception:
        stp_version = "?"
    stp_pkg.__version__ = stp_version
    emit(out, "\n".join([
        f"- CPU: {cpu_model()} ({len(__import__('os').sched_getaffinity(0))} cores visible), "
        f"torch threads: {torch.get_num_threads()}, no GPU used",
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"tensorly {tl.__version__} (backend {args.tl_backend}), semi-tensor-product {stp_version}, "
        f"stpnet {stpnet.__version__}",
        f"- mode: {'quick' if args.quick else 'full'}; decomposition repeats {args.repeats}, "
        f"STP repeats {args.stp_repeats} (median, after one warm-up)",
    ]) + "\n")

    meter = CpuMeter()
    if not args.skip_decompositions:
        decomposition_benchmarks(args, out)
    if not args.skip_stp:
        stp_benchmarks(args, out)
    emit(out, f"Total: {meter.report()}.\n")

    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
