"""The language-model benchmark's SVD-LLM baseline (bench/language_model.py: truncation-aware
whitened SVD) against a direct computation of the optimum it claims."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from language_model import low_rank_ranks, plain_svd, stdlib_corpus, whitened_svd, windows  # noqa: E402


def _data(seed: int, n: int, d_in: int, d_out: int):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in,
                                                                                          dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mixing  # correlated, badly scaled inputs
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return X, W


@pytest.mark.parametrize("seed,n,d_in,d_out,k", [(0, 200, 12, 8, 3), (1, 64, 10, 16, 4), (2, 300, 20, 6, 1)])
def test_whitened_svd_is_the_eckart_young_optimum_of_the_layer_outputs(seed, n, d_in, d_out, k):
    X, W = _data(seed, n, d_in, d_out)
    A, B = whitened_svd(W, X.T @ X, k)
    assert A.shape == (d_out, k) and B.shape == (k, d_in)
    approx = A @ B
    assert torch.linalg.matrix_rank(approx) == k
    # direct: the best rank-k approximation of the outputs Y = X W^T is Y's truncated SVD
    # (Eckart-Young); X has full column rank, so the W' reaching it is X's least-squares solution
    Y = X @ W.T
    U, s, Vh = torch.linalg.svd(Y, full_matrices=False)
    Y_k = U[:, :k] * s[:k] @ Vh[:k]
    torch.testing.assert_close(X @ approx.T, Y_k, rtol=1e-6, atol=1e-8)
    direct = torch.linalg.lstsq(X, Y_k).solution.T
    torch.testing.assert_close(approx, direct, rtol=1e-6, atol=1e-8)
    loss = torch.linalg.norm(X @ approx.T - Y)
    torch.testing.assert_close(loss, s[k:].square().sum().sqrt())
    # and no other rank-k matrix does better: plain SVD, and random perturbations of the optimum
    P, Q = plain_svd(W, k)
    assert torch.linalg.norm(X @ (P @ Q).T - Y) >= loss
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(20):
        dA = A + 1e-2 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        dB = B + 1e-2 * torch.randn(B.shape, generator=g, dtype=B.dtype)
        assert torch.linalg.norm(X @ (dA @ dB).T - Y) >= loss


def test_a_singular_gram_is_damped_and_stays_near_optimal():
    X, W = _data(3, 6, 10, 5)  # fewer samples than inputs: X^T X is singular
    A, B = whitened_svd(W, X.T @ X, 2)
    Y = X @ W.T
    s = torch.linalg.svdvals(Y)
    optimum = s[2:].square().sum().sqrt()
    loss = torch.linalg.norm(X @ (A @ B).T - Y)
    assert bool(torch.isfinite(A).all() and torch.isfinite(B).all())
    assert float(loss) <= float(optimum) * 1.01 + 1e-6


def test_at_full_rank_the_whitened_svd_is_exact():
    X, W = _data(4, 100, 8, 8)
    A, B = whitened_svd(W, X.T @ X, 8)
    torch.testing.assert_close(A @ B, W, rtol=1e-6, atol=1e-8)


def test_equal_parameter_ranks_meet_the_target():
    from torch import nn

    layers = {"a": nn.Linear(64, 192), "b": nn.Linear(64, 64), "c": nn.Linear(64, 256)}
    dense = sum(m.weight.numel() + m.bias.numel() for m in layers.values()) + 5000  # + other parameters
    ranks = low_rank_ranks(layers, dense, 3.0)
    total = dense - sum(m.weight.numel() for m in layers.values()) + sum(
        ranks[n] * (m.in_features + m.out_features) for n, m in layers.items())
    assert total <= dense / 3.0 and total > dense / 3.0 * 0.9
    with pytest.raises(ValueError, match="unreachable"):
        low_rank_ranks(layers, dense * 10, 3.0)


def test_the_benchmark_corpus_is_split_by_file_deterministically(tmp_path):
    for i in range(40):
        folder = tmp_path / ("site-packages" if i % 10 == 9 else f"pkg{i % 3}")
        folder.mkdir(exist_ok=True)
        (folder / f"m{i}.py").write_text(f"x = {i}\n" * (i + 1))
    first, again = stdlib_corpus(val_every=4, root=str(tmp_path)), stdlib_corpus(val_every=4, root=str(tmp_path))
    assert torch.equal(first.train, again.train) and torch.equal(first.validation, again.validation)
    info = first.info
    assert info["files"] == 36 and info["train_files"] + info["validation_files"] == 36  # site-packages left out
    assert 0 < info["validation_files"] < 36
    text = bytes(first.train.tolist()).decode()
    held_out = bytes(first.validation.tolist()).decode()
    for i in range(40):  # every file lies wholly in one split
        body = f"x = {i}\n" * (i + 1)
        assert (body in text) + (body in held_out) == (i % 10 != 9)  # one split; site-packages in none
    w = windows(first.train, 3, 5)
    assert w.shape == (3, 6) and torch.equal(w[1, :5], first.train[5:10].long())
