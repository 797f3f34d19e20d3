"""Compress a small GPT-style language model trained on real text; compare with a whitened-SVD baseline.

1. **Corpus**: the Python standard library's ``.py`` sources of the running interpreter (every
   machine has them; nothing to download), ``site-packages`` left out. Files are split into
   train and validation by a hash of their path relative to the library root (deterministic:
   1 file in ``--val-every``), and read as bytes: the tokens are the 256 byte values. The Python
   version, file counts, byte counts and a digest of the corpus are recorded with every row.
2. **Model**: GPT-2's architecture (pre-LayerNorm blocks, learned positions, GELU MLP,
   causal attention, an untied byte-level output head so the embedding can be compressed on its
   own). With ``--arch hf`` (the default when ``transformers`` is importable: ``--arch auto``)
   it is HuggingFace's ``GPT2LMHeadModel`` built from a config, whose projections are ``Conv1D``
   layers (weights stored transposed) that stpnet compresses as Linear layers; with ``--arch
   own`` it is :class:`TinyGPT` below, the same computation in plain PyTorch. Trained here with
   AdamW and a cosine schedule: the default size (width 192, 4 blocks of 4 heads, context 128,
   1.9 M parameters; 2000 steps of 32 x 128 tokens, about 8 M bytes, a quarter of the train
   split) is sized for 10-40 minutes on 2 CPU cores.
3. **Compression**: ``stpnet.compress(..., compression=X)`` for X in 2, 3, 5 and every format
   (t = 2 for the semi-tensor ones), with the token/position embeddings excluded (only the
   attention and MLP matrices) and included. The output head stays dense (the classifier). For
   each: validation perplexity straight after compression (``plain``), after data-aware fitting
   (``fit``: :func:`stpnet.recovery.fit_to_activations`, ``--fit-steps`` L-BFGS iterations per
   block on ``--calibration`` training windows), and after a short distilled fine-tune of the
   fitted model (``ft``: ``--ft-steps`` AdamW steps on the dense model's soft targets mixed with
   the labels).
4. **Baseline** at equal parameters, with no fine-tuning, on the same calibration windows:
   SVD-LLM's truncation-aware data whitening (Wang et al. 2025, "SVD-LLM: Truncation-aware
   singular value decomposition for large language model compression"), :func:`whitened_svd`,
   applied to every attention/MLP matrix with ranks chosen so the whole model meets X; plain
   truncated SVD of the same matrices at the same ranks for reference.
5. **Latency** (``--latency``, on an otherwise idle machine): forward seconds per call of one
   sequence (batch 1) and of 32 sequences of ``--context`` tokens, dense against the compressed
   model factorized and fused (``stpnet.fuse`` with an example of that batch, so each layer takes
   its fastest form), timed in alternating blocks in one process (``bench/latency.py``); the
   structure alone sets the time, so the plain compression stands in for the fitted one.

Every finished step appends a JSON line to ``results/language_model/runs.jsonl`` (a rerun with
the same settings skips what is there); ``--report`` prints the table.

Run (from the repository root):
    .venv/bin/python bench/language_model.py                       # train, then the whole sweep
    .venv/bin/python bench/language_model.py --factors 3 --formats stt tt --embedding excluded
    .venv/bin/python bench/language_model.py --smoke --out /tmp/lm  # a minute or two, end to end
    .venv/bin/python bench/language_model.py --latency --factors 3    # on an idle machine
    .venv/bin/python bench/language_model.py --report
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import stpnet
from stpnet.nn import linear_view
from stpnet.recovery import fit_to_activations

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)
from latency import time_in_blocks  # bench/latency.py

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("tucker", "sttu", "tt", "stt", "tr", "str", "cp")
SEMI = {"sttu", "stt", "str"}
VOCAB = 256  # byte values
FT_STEPS = 100  # the short fine-tune's default length
FIT_STEPS = 30  # L-BFGS iterations per block of the data-aware fit, by default


# ----------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Corpus:
    """The standard library's sources as byte tokens, split by file."""

    train: torch.Tensor  # uint8
    validation: torch.Tensor  # uint8
    info: dict


def stdlib_corpus(val_every: int = 20, root: str | None = None) -> Corpus:
    """Every ``.py`` file under the interpreter's standard library (``site-packages`` excluded),
    in path order; a file goes to validation when the SHA-256 of its relative path, as an
    integer, is divisible by ``val_every``. Files are joined with a newline."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.rglob("*.py") if "site-packages" not in p.relative_to(base).parts
                   and "__pycache__" not in p.relative_to(base).parts and p.is_file())
    parts: dict[str, list[bytes]] = {"train": [], "validation": []}
    digest = hashlib.sha256()
    for path in files:
        rel = path.relative_to(base).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + data)
        split = "validation" if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % val_every == 0 else "train"
        parts[split].append(data)
    tokens = {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8) for k, v in parts.items()}
    info = {"python": sys.version.split()[0], "stdlib": str(base), "files": len(files),
            "train_files": len(parts["train"]), "validation_files": len(parts["validation"]),
            "train_bytes": int(tokens["train"].numel()), "validation_bytes": int(tokens["validation"].numel()),
            "corpus_sha256": digest.hexdigest()[:16], "val_every": val_every, "tokens": "bytes"}
    return Corpus(tokens["train"], tokens["validation"], info)


def windows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` windows of ``length + 1`` tokens (inputs and next-token targets): at random
    offsets with ``generator``, else consecutive and non-overlapping from the start."""
    if generator is None:
        count = min(count, (tokens.numel() - 1) // length)
        starts = torch.arange(count) * length
    else:
        starts = torch.randint(0, tokens.numel() - length - 1, (count,), generator=generator)
    index = starts[:, None] + torch.arange(length + 1)[None, :]
    return tokens[index].long()


# ------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelConfig:
    width: int = 192
    blocks: int = 4
    heads: int = 4
    context: int = 128


class Block(nn.Module):
    """A GPT-2 block: pre-LayerNorm causal self-attention and a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    """GPT-2's architecture at a small size, untied output head; ``forward(ids) -> logits``."""

    def __init__(self, config: ModelConfig, vocab: int = VOCAB):
        super().__init__()
        self.wte = nn.Embedding(vocab, config.width)
        self.wpe = nn.Embedding(config.context, config.width)
        self.h = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.blocks))
        self.ln_f = nn.LayerNorm(config.width)
        self.lm_head = nn.Linear(config.width, vocab, bias=False)
        self.apply(self._init)
        for block in self.h:  # GPT-2's scaled init of the residual projections
            for proj in (block.attn_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.blocks))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def resolve_arch(arch: str) -> str:
    if arch != "auto":
        return arch
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "own"
    return "hf"


def build(arch: str, config: ModelConfig) -> nn.Module:
    """A fresh model (the base that :func:`stpnet.load` rebuilds a saved one on)."""
    if arch == "own":
        return TinyGPT(config)
    import transformers

    hf = transformers.GPT2Config(vocab_size=VOCAB, n_positions=config.context, n_embd=config.width,
                                 n_layer=config.blocks, n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, tie_word_embeddings=False, use_cache=False, bos_token_id=0,
                                 eos_token_id=0)
    return transformers.GPT2LMHeadModel(hf)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def embedding_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]


def matrix_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The attention and MLP matrices (Linear or Conv1D inside the blocks), by name."""
    return {n: m for n, m in model.named_modules()
            if ".h." in f".{n}" and (isinstance(m, nn.Linear) or linear_view(m) is not None)}


@torch.no_grad()
def state_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state dict: every key and its tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, batch: int = 16) -> float:
    """exp of the mean next-token cross-entropy over the windows ``data`` (N, T + 1)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, data.shape[0], batch):
        chunk = data[start:start + batch]
        logits = logits_of(model, chunk[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: nn.Module, tokens: torch.Tensor, *, steps: int, batch: int, context: int, lr: float, seed: int,
          teacher: nn.Module | None = None, alpha: float = 0.5, warmup: int = 100, log_every: int = 100) -> float:
    """AdamW with a cosine schedule on random windows; with ``teacher``, the loss mixes the
    teacher's soft targets (KL, weight ``alpha``) with the labels (``1 - alpha``). Returns seconds."""
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    if teacher is not None:
        teacher.eval()
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, min(warmup, max(1, steps // 10)))
        chunk = windows(tokens, batch, context, generator)
        logits = logits_of(model, chunk[:, :-1])
        flat = logits.reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, chunk[:, 1:].reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                target = F.log_softmax(logits_of(teacher, chunk[:, :-1]).reshape(flat.shape), dim=-1)
            kl = F.kl_div(F.log_softmax(flat, dim=-1), target, log_target=True, reduction="batchmean")
            loss = alpha * kl + (1 - alpha) * loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return time.perf_counter() - start


# ------------------------------------------------------------------------ the whitened-SVD baseline
def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int,
                 damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's truncation-aware whitening: the rank-``rank`` ``W' = A B`` minimising
    ``||X W'^T - X W^T||_F`` for the calibration inputs ``X`` with ``X^T X = gram``.

    With the Cholesky factor ``S`` of ``gram`` (``gram = S S^T``, lower triangular),
    ``||X D^T||_F = ||D S||_F``; so ``W' S`` is the truncated SVD ``U_k Σ_k V_k^T`` of ``W S``
    and ``W' = U_k Σ_k V_k^T S^{-1}``. A singular ``gram`` gets ``damping`` times its mean
    diagonal added (repeatedly x10 until the factorization succeeds).

    Parameters
    ----------
    weight : (out, in) tensor
    gram : (in, in) tensor, symmetric positive semi-definite
    rank : int

    Returns
    -------
    (A, B) : (out, rank) and (rank, in) tensors, in float64
    """
    W = weight.detach().double()
    G = gram.detach().double()
    scale = float(G.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    lam = 0.0
    while True:
        S, info = torch.linalg.cholesky_ex(G + lam * scale * eye)
        if int(info) == 0:
            break
        lam = damping if lam == 0 else lam * 10
        if lam > 1:
            raise ValueError("the calibration Gram matrix is not positive definite even with damping")
    U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    k = min(rank, sigma.numel())
    A = U[:, :k] * sigma[:k]
    B = torch.linalg.solve_triangular(S, Vh[:k], upper=False, left=False)  # V_k^T S^{-1}
    return A, B


def plain_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated SVD ``W ≈ A B`` (no data)."""
    U, sigma, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    k = min(rank, sigma.numel())
    return U[:, :k] * sigma[:k], Vh[:k]


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module], calibration: torch.Tensor,
                batch: int = 16) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of every layer's inputs over the calibration windows."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        for start in range(0, calibration.shape[0], batch):
            logits_of(model, calibration[start:start + batch, :-1])
    finally:
        for h in handles:
            h.remove()
    return grams


def low_rank_ranks(layers: dict[str, nn.Module], dense_params: int, target: float) -> dict[str, int]:
    """Per-layer ranks for one weight compression ``f`` shared by the matrices (rank
    ``in * out / (f (in + out))``, each matrix stored as two factors of ``k (in + out)``
    entries), ``f`` found by bisection so that the whole model holds at most
    ``dense_params / target`` parameters."""
    geometry = {}
    for n, m in layers.items():
        view = linear_view(m)
        i, o = (m.in_features, m.out_features) if view is None else (view.in_features, view.out_features)
        geometry[n] = (i, o)
    matrices = sum(i * o for i, o in geometry.values())
    budget = dense_params / target - (dense_params - matrices)
    if budget <= 0:
        raise ValueError(f"{target}x is unreachable by compressing the attention/MLP matrices only")

    def ranks(f):
        return {n: max(1, int(i * o / (f * (i + o)))) for n, (i, o) in geometry.items()}

    def size(r):
        return sum(r[n] * (i + o) for n, (i, o) in geometry.items())

    lo, hi = 0.01, 1e4
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if size(ranks(mid)) > budget else (lo, mid)
    return ranks(hi)


@torch.no_grad()
def low_rank_model(dense: nn.Module, ranks: dict[str, int], grams: dict[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``dense`` whose listed matrices are replaced by their rank-``ranks[name]``
    approximation (whitened with ``grams``, or plain SVD without); the weights are set in place
    (the function of the two-factor form), the count is that of the factors."""
    model = copy.deepcopy(dense)
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        view = linear_view(layer)
        W = layer.weight if view is None else view.weight
        A, B = whitened_svd(W, grams[name], rank) if grams is not None else plain_svd(W, rank)
        approx = (A @ B).to(W.dtype)
        if view is None:
            layer.weight.copy_(approx)
        else:  # Conv1D: weight stored (in, out)
            layer.weight.copy_(approx.T)
    return model


def low_rank_params(dense: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int]) -> int:
    total = sum(p.numel() for p in dense.parameters())
    for n, m in layers.items():
        view = linear_view(m)
        i, o = (m.in_features, m.out_features) if view is None else (view.in_features, view.out_features)
        total += ranks[n] * (i + o) - i * o
    return total


# ------------------------------------------------------------------------------------------ sweep
class Sweep:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "runs.jsonl"
        self.arch = resolve_arch(args.arch)
        self.config = ModelConfig(args.width, args.blocks, args.heads, args.context)
        self.corpus = stdlib_corpus(args.val_every)
        settings = {"arch": self.arch, **asdict(self.config), "steps": args.steps, "batch": args.batch, "lr": args.lr,
                    "seed": args.seed, "corpus": self.corpus.info["corpus_sha256"], "val_every": args.val_every}
        self.run_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.settings = settings
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        self.rows = rows
        self.done = {(r.get("run"), r["config"], r["step"]) for r in rows}
        self.validation = windows(self.corpus.validation, args.val_windows, args.context)
        self.calibration = windows(self.corpus.train, args.calibration, args.context,
                                   torch.Generator().manual_seed(args.seed + 1))
        self.deadline = time.monotonic() + args.time_limit * 60 if args.time_limit else float("inf")

    def record(self, config: str, step: str, **values) -> None:
        row = {"run": self.run_id, "config": config, "step": step, **values, "settings": self.settings,
               "corpus": self.corpus.info, "validation_tokens": int(self.validation[:, 1:].numel()),
               "calibration_windows": int(self.calibration.shape[0]), "cpu": cpu_model(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
        with self.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add((self.run_id, config, step))
        shown = {k: v for k, v in values.items() if k not in ("ranks",)}
        print(f"{config:>28} {step:<6} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def is_done(self, config: str, step: str) -> bool:
        return (self.run_id, config, step) in self.done

    def dense(self) -> nn.Module:
        """The trained dense model: from the checkpoint (written by stpnet.save, outside the tree)
        or trained now (seeded: on another machine of the same kind the same weights). Its
        weights' digest goes into the log with the first row; a model whose digest differs from
        the logged one (retrained where the arithmetic differs) is refused, so rows measured on
        two different dense models never share a table."""
        checkpoint = Path(self.args.runs) / f"dense-{self.run_id}.pt"
        if checkpoint.exists():
            return self.checked(stpnet.load(checkpoint, build(self.arch, self.config)))
        torch.manual_seed(self.args.seed)
        model = build(self.arch, self.config)
        args = self.args
        print(f"training {self.arch} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
              f"{self.corpus.info['train_bytes']:,} bytes of Python {self.corpus.info['python']} sources", flush=True)
        seconds = train(model, self.corpus.train, steps=args.steps, batch=args.batch, context=args.context, lr=args.lr,
                        seed=args.seed, warmup=args.warmup, log_every=args.log_every)
        self.checked(model)
        stpnet.save(model, checkpoint)
        self.record("dense", "train", perplexity=round(perplexity(model, self.validation), 4),
                    params=sum(p.numel() for p in model.parameters()), seconds=round(seconds, 1),
                    tokens_seen=args.steps * args.batch * args.context)
        return model.eval()

    def checked(self, model: nn.Module) -> nn.Module:
        """``model`` if its weights are those the log's rows were measured on (logged on first use)."""
        digest = state_digest(model)
        logged = [r for r in self.rows if r.get("run") == self.run_id and "dense_sha256" in r]
        if logged and logged[0]["dense_sha256"] != digest:
            raise SystemExit(f"the dense model's weights (SHA-256 {digest[:16]}...) differ from those the rows of run "
                             f"{self.run_id} in {self.log} were measured on ({logged[0]['dense_sha256'][:16]}...): it "
                             "was retrained where the arithmetic differs; write to another --out")
        if not logged:
            self.record("dense", "digest", dense_sha256=digest)
        return model

    def run(self) -> None:
        checkpoint = Path(self.args.runs) / f"dense-{self.run_id}.pt"
        if self.args.latency and not checkpoint.exists():  # the structure alone sets the time
            torch.manual_seed(self.args.seed)
            dense = build(self.arch, self.config).eval()
        else:
            dense = self.dense()
        dense_params = sum(p.numel() for p in dense.parameters())
        if self.args.latency:
            for factor in self.args.factors:
                for embedding in self.args.embedding:
                    for fmt in self.args.formats:
                        self.latency(dense, dense_params, fmt, factor, embedding)
            return
        if not self.is_done("dense", "train"):  # trained in an earlier run with another output file
            self.record("dense", "train", perplexity=round(perplexity(dense, self.validation), 4), params=dense_params)
        layers = matrix_layers(dense)
        grams = None
        for factor in self.args.factors:
            if not self.args.no_baseline and not self.is_done(f"whitened-svd-{factor:g}x", "plain"):
                grams = grams if grams is not None else input_grams(dense, layers, self.calibration)
                ranks = low_rank_ranks(layers, dense_params, factor)
                params = low_rank_params(dense, layers, ranks)
                for method, g in (("whitened-svd", grams), ("svd", None)):
                    start = time.perf_counter()
                    model = low_rank_model(dense, ranks, g)
                    self.record(f"{method}-{factor:g}x", "plain", method=method, format=method, target=factor,
                                embedding="excluded", params=params, compression=dense_params / params,
                                perplexity=round(perplexity(model, self.validation), 4),
                                seconds=round(time.perf_counter() - start, 1), ranks=ranks)
            for embedding in self.args.embedding:
                for fmt in self.args.formats:
                    if time.monotonic() > self.deadline:
                        print("time limit reached", flush=True)
                        return
                    self.compressed(dense, dense_params, fmt, factor, embedding)

    def latency(self, dense: nn.Module, dense_params: int, fmt: str, factor: float, embedding: str) -> None:
        """Seconds per forward call at batch 1 and 32: dense, factorized, fused for that batch."""
        name = f"{fmt}-{factor:g}x-emb-{embedding}"
        if self.is_done(name, "latency"):
            return
        exclude = embedding_names(dense) if embedding == "excluded" else None
        try:
            small, report = stpnet.compress(dense, fmt, compression=factor, t=2 if fmt in SEMI else None,
                                            exclude=exclude)
        except ValueError as error:
            self.record(name, "latency", format=fmt, target=factor, embedding=embedding, error=str(error))
            return
        small.eval()
        times = {}
        for batch in (1, 32):
            x = self.validation[:batch, :-1]
            fused = stpnet.fuse(small, example=x).eval()
            timed = time_in_blocks({"dense": lambda v: logits_of(dense, v), "factorized": lambda v: logits_of(small, v),
                                    "fused": lambda v: logits_of(fused, v)}, x, self.args.repeats)
            times.update({f"{k}_b{batch}": v for k, v in timed.items()})
        self.record(name, "latency", format=fmt, target=factor, embedding=embedding, params=report.params,
                    compression=dense_params / report.params, repeats=self.args.repeats, **times)

    def compressed(self, dense: nn.Module, dense_params: int, fmt: str, factor: float, embedding: str) -> None:
        args = self.args
        # another fit length or unit is a configuration of its own; another fine-tune length a step of its own
        variant = "" if (args.fit_steps, args.fit_unit) == (FIT_STEPS, "block") else f"-fit{args.fit_steps}{args.fit_unit}"
        name = f"{fmt}-{factor:g}x-emb-{embedding}{variant}"
        ft_step = "ft" if args.ft_steps == FT_STEPS else f"ft{args.ft_steps}"
        if self.is_done(name, ft_step):
            return
        t = 2 if fmt in SEMI else None
        exclude = embedding_names(dense) if embedding == "excluded" else None
        start = time.perf_counter()
        try:
            small, report = stpnet.compress(dense, fmt, compression=factor, t=t, exclude=exclude)
        except ValueError as error:
            self.record(name, ft_step, format=fmt, target=factor, embedding=embedding, error=str(error))
            return
        common = {"format": fmt, "target": factor, "embedding": embedding, "variant": variant.lstrip("-"),
                  "params": report.params,
                  "compression": dense_params / report.params}
        if not self.is_done(name, "plain"):
            self.record(name, "plain", **common, perplexity=round(perplexity(small, self.validation), 4),
                        seconds=round(time.perf_counter() - start, 1),
                        ranks={k: list(v) for k, v in report.ranks.items()})
        start = time.perf_counter()
        fit = fit_to_activations(small, dense, self.calibration[:, :-1], steps=args.fit_steps, unit=args.fit_unit)
        fit_seconds = time.perf_counter() - start
        if not self.is_done(name, "fit"):
            self.record(name, "fit", **common, perplexity=round(perplexity(small, self.validation), 4),
                        seconds=round(fit_seconds, 1), fit_steps=args.fit_steps, fit_unit=args.fit_unit,
                        fit_error_after=round(max((f.error_after for f in fit.layers), default=0.0), 4))
        seconds = train(small, self.corpus.train, steps=args.ft_steps, batch=args.batch, context=args.context,
                        lr=args.ft_lr, seed=args.seed + 2, teacher=dense, alpha=0.5, warmup=max(1, args.ft_steps // 10),
                        log_every=0)
        if args.save_compressed:
            stpnet.save(small, Path(args.runs) / f"{name}-{self.run_id}.pt")
        self.record(name, ft_step, **common, perplexity=round(perplexity(small, self.validation), 4),
                    seconds=round(seconds, 1), ft_steps=args.ft_steps, ft_lr=args.ft_lr)


# ----------------------------------------------------------------------------------------- report
def _perplexity_cells(steps: dict) -> list[str]:
    """The plain, fit and fine-tuned perplexities of one configuration, ``-`` where not measured."""
    return [f"{steps[s]['perplexity']:.3f}" if "perplexity" in steps.get(s, {}) else "-" for s in ("plain", "fit", "ft")]


def summary_tables(ordered: list[tuple[tuple, dict]]) -> list[str]:
    """One table per embedding setting: a row per method, a column per target holding
    ``plain / fit / fine-tuned`` perplexities (default settings only; variants stay in the long table)."""
    targets = sorted({key[0] for key, _ in ordered})
    lines = []
    for emb in ("excluded", "included"):
        cells: dict[str, dict[float, str]] = {}
        for (target, fmt, e, variant), steps in ordered:
            if e != emb or variant:
                continue
            values = _perplexity_cells(steps)
            while len(values) > 1 and values[-1] == "-":
                values.pop()
            cells.setdefault(fmt, {})[target] = " / ".join(values)
        if not cells:
            continue
        title = "embeddings dense" if emb == "excluded" else "embeddings compressed"
        lines += ["", f"Perplexity, {title}: plain / fit / fine-tuned ({FT_STEPS} steps)", "",
                  "| method | " + " | ".join(f"{t:g}x" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for fmt, by_target in cells.items():
            lines.append(f"| {fmt} | " + " | ".join(by_target.get(t, "") for t in targets) + " |")
    return lines


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return "no results yet"
    run = rows[-1]["run"]  # the latest run's settings
    rows = [r for r in rows if r["run"] == run]
    dense = next((r for r in rows if r["config"] == "dense" and r["step"] == "train"), None)
    info, settings = rows[-1]["corpus"], rows[-1]["settings"]
    lines = [f"corpus: Python {info['python']} standard library, {info['files']} files "
             f"({info['train_files']} train / {info['validation_files']} validation), {info['train_bytes']:,} / "
             f"{info['validation_bytes']:,} bytes, byte tokens; validation perplexity on "
             f"{rows[-1]['validation_tokens']:,} tokens; calibration {rows[-1]['calibration_windows']} windows of "
             f"{settings['context']}",
             f"model: {settings['arch']} GPT-2 architecture, width {settings['width']}, {settings['blocks']} blocks, "
             f"{settings['heads']} heads, context {settings['context']}; {settings['steps']} steps of "
             f"{settings['batch']} x {settings['context']} tokens; {rows[-1]['cpu']}, {rows[-1]['threads']} threads",
             f"dense: perplexity {dense['perplexity']:.3f}, {dense['params']:,} parameters"
             + (f", trained in {dense['seconds'] / 60:.1f} min" if dense and "seconds" in dense else "")
             if dense else "dense: not trained yet", "",
             f"| target | method | embedding | params | compression | plain | fit | fine-tuned ({FT_STEPS} steps) "
             "| fine-tuned longer |",
             "|---|---|---|---|---|---|---|---|---|"]
    by: dict[tuple, dict] = {}
    for r in rows:
        if r["config"] != "dense":
            by.setdefault((r["target"], r["format"], r["embedding"], r.get("variant", "")), {})[r["step"]] = r
    order = ("whitened-svd", "svd", *FORMATS)
    ordered = sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][2] != "excluded", order.index(kv[0][1]), kv[0][3]))
    for (target, fmt, emb, variant), steps in ordered:
        fmt = f"{fmt} ({variant})" if variant else fmt
        measured = {k: v for k, v in steps.items() if k != "latency"}
        if not measured:
            continue
        anyrow = next(iter(measured.values()))
        if "error" in anyrow:
            lines.append(f"| {target:g}x | {fmt} | {emb} | - | - | {anyrow['error'][:60]} | | | |")
            continue
        cells = _perplexity_cells(steps)
        longer = sorted((r["ft_steps"], r["perplexity"]) for k, r in steps.items()
                        if k.startswith("ft") and k != "ft" and "perplexity" in r)
        cells.append(", ".join(f"{p:.3f} ({n} steps)" for n, p in longer) or "-")
        lines.append(f"| {target:g}x | {fmt} | {emb} | {anyrow['params']:,} | {anyrow['compression']:.2f}x | "
                     + " | ".join(cells) + " |")
    lines += summary_tables(ordered)
    timed = [(key, steps["latency"]) for key, steps in ordered if "dense_b1" in steps.get("latency", {})]
    if timed:
        first = timed[0][1]
        lines += ["", f"Latency / dense in the same run (median of alternating blocks); dense ms per call: batch 1 "
                  f"{first['dense_b1'] * 1e3:.2f}, batch 32 {first['dense_b32'] * 1e3:.2f}.", "",
                  "| target | format | embedding | b1 factorized | b1 fused | b32 factorized | b32 fused |",
                  "|---|---|---|---|---|---|---|"]
        for (target, fmt, emb, _), r in timed:
            cells = [f"{r[f'{kind}_b{b}'] / r[f'dense_b{b}']:.2f}" for b in (1, 32) for kind in ("factorized", "fused")]
            lines.append(f"| {target:g}x | {fmt} | {emb} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("auto", "hf", "own"), default="auto",
                        help="hf: transformers' GPT2LMHeadModel (Conv1D layers); own: TinyGPT; auto: hf if importable")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2000, help="dense training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=20, help="1 file in this many goes to validation")
    parser.add_argument("--val-windows", type=int, default=512, help="validation windows of --context tokens")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows from the train split")
    parser.add_argument("--factors", type=float, nargs="*", default=[2, 3, 5])
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--embedding", nargs="*", default=["excluded", "included"], choices=("excluded", "included"))
    parser.add_argument("--fit-steps", type=int, default=FIT_STEPS,
                        help="L-BFGS iterations per unit (another value, or --fit-unit layer, is a configuration of its own)")
    parser.add_argument("--fit-unit", choices=("block", "layer"), default="block")
    parser.add_argument("--ft-steps", type=int, default=FT_STEPS,
                        help=f"distilled fine-tune steps (a length other than {FT_STEPS} is recorded as a step of its own)")
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--save-compressed", action="store_true", help="stpnet.save every fine-tuned model")
    parser.add_argument("--time-limit", type=float, help="minutes; stop before the next configuration after it")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--latency", action="store_true",
                        help="instead of perplexities, time dense / factorized / fused at batch 1 and 32 (on the "
                             "trained model's checkpoint if there is one, else on a freshly initialised one)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per model and batch (--latency)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "language_model"), help="checkpoints")
    parser.add_argument("--out", default=str(ROOT / "results" / "language_model"), help="where runs.jsonl goes")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny configuration (a minute or two) that runs every step end to end")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.out) / "runs.jsonl"))
        return
    if args.smoke:
        args.width, args.blocks, args.heads, args.context = 64, 2, 2, 64
        args.steps, args.batch, args.val_windows, args.calibration = 150, 16, 64, 16
        args.fit_steps, args.ft_steps, args.log_every, args.warmup = 5, 10, 50, 20
        args.factors = args.factors if args.factors != [2, 3, 5] else [3]
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    Sweep(args).run()
    print(report(Path(args.out) / "runs.jsonl"))


if __name__ == "__main__":
    main()
