"""The STP primitives against the Kronecker definition, and every property in docs/formats-spec.md, section 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import stpnet
from conftest import kron_rstp, kron_stp, randn

dim = st.integers(1, 7)
seed = st.integers(0, 2**31 - 1)
ops = [(stpnet.stp, kron_stp), (stpnet.rstp, kron_rstp)]


def close(a, b, tol=1e-10):
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


@given(m=dim, n=dim, p=dim, q=dim, s=seed)
def test_any_sizes_equal_kronecker_definition(m, n, p, q, s):
    A, B = randn(m, n, seed=s), randn(p, q, seed=s + 1)
    for op, ref in ops:
        assert close(op(A, B), ref(A, B))


@given(m=dim, p=dim, q=dim, t=st.integers(2, 5), s=seed)
def test_fast_path_n_multiple_of_p(m, p, q, t, s):
    A, B = randn(m, t * p, seed=s), randn(p, q, seed=s + 1)
    expected = A @ torch.kron(B, torch.eye(t, dtype=A.dtype))  # A (B ⊗ I_t)
    assert close(stpnet.stp(A, B), expected)
    assert close(stpnet.rstp(A, B), kron_rstp(A, B))
    # entrywise form of docs/formats-spec.md, section 2: out[i, c*t+u] = sum_b A[i, b*t+u] B[b, c]
    out = stpnet.stp(A, B)
    i, c, u = m - 1, q - 1, t - 1
    assert torch.isclose(out[i, c * t + u], sum(A[i, b * t + u] * B[b, c] for b in range(p)))


@given(m=dim, n=dim, q=dim, t=st.integers(2, 5), s=seed)
def test_fast_path_p_multiple_of_n(m, n, q, t, s):
    A, B = randn(m, n, seed=s), randn(t * n, q, seed=s + 1)
    expected = torch.kron(A, torch.eye(t, dtype=A.dtype)) @ B  # (A ⊗ I_t) B
    assert close(stpnet.stp(A, B), expected)
    assert close(stpnet.rstp(A, B), kron_rstp(A, B))


@given(m=dim, n=dim, q=dim, s=seed)
def test_equal_inner_sizes_is_matrix_product(m, n, q, s):
    A, B = randn(m, n, seed=s), randn(n, q, seed=s + 1)
    for op, _ in ops:
        assert close(op(A, B), A @ B)


@given(m=dim, n=dim, p=dim, q=dim, r=dim, w=dim, s=seed)
def test_associative(m, n, p, q, r, w, s):
    A, B, C = randn(m, n, seed=s), randn(p, q, seed=s + 1), randn(r, w, seed=s + 2)
    for op, _ in ops:
        assert close(op(op(A, B), C), op(A, op(B, C)), 1e-9)


@given(m=dim, n=dim, p=dim, q=dim, s=seed)
def test_distributive(m, n, p, q, s):
    A, A2 = randn(m, n, seed=s), randn(m, n, seed=s + 3)
    B, C = randn(p, q, seed=s + 1), randn(p, q, seed=s + 2)
    for op, _ in ops:
        assert close(op(A, B + C), op(A, B) + op(A, C))
        assert close(op(A + A2, B), op(A, B) + op(A2, B))


@given(m=dim, n=dim, p=dim, q=dim, s=seed)
def test_transpose(m, n, p, q, s):
    A, B = randn(m, n, seed=s), randn(p, q, seed=s + 1)
    for op, _ in ops:
        assert close(op(A, B).T, op(B.T, A.T))


@given(m=dim, p=dim, s=seed)
def test_inverse(m, p, s):
    # well-conditioned invertible square factors
    A = torch.eye(m, dtype=torch.float64) * 3 + randn(m, m, seed=s)
    B = torch.eye(p, dtype=torch.float64) * 3 + randn(p, p, seed=s + 1)
    for op, _ in ops:
        assert close(torch.linalg.inv(op(A, B)), op(torch.linalg.inv(B), torch.linalg.inv(A)), 1e-8)


@given(m=dim, n=dim, s=seed)
def test_column_vectors_give_kronecker_product(m, n, s):
    x, y = randn(m, 1, seed=s), randn(n, 1, seed=s + 1)
    assert close(stpnet.stp(x, y), torch.kron(x, y))


@given(m=dim, n=dim, s=seed)
def test_swap_matrix(m, n, s):
    x, y = randn(m, 1, seed=s), randn(n, 1, seed=s + 1)
    W = stpnet.swap_matrix(m, n, dtype=torch.float64)
    assert close(W @ torch.kron(x, y), torch.kron(y, x))
    assert close(stpnet.stp(stpnet.stp(W, x), y), stpnet.stp(y, x))
    assert close(W @ W.T, torch.eye(m * n, dtype=torch.float64))  # a permutation


@given(b=st.integers(1, 3), m=dim, n=dim, p=dim, q=dim, s=seed)
def test_batch_dimensions_broadcast(b, m, n, p, q, s):
    A, B = randn(b, 1, m, n, seed=s), randn(2, p, q, seed=s + 1)
    for op, ref in ops:
        out = op(A, B)
        assert out.shape[:2] == (b, 2)
        for i in range(b):
            for j in range(2):
                assert close(out[i, j], ref(A[i, 0], B[j]))


@pytest.mark.parametrize("op", [stpnet.stp, stpnet.rstp])
@pytest.mark.parametrize("shapes", [((3, 6), (2, 4)), ((3, 2), (6, 4)), ((2, 4), (6, 3)), ((2, 3), (3, 2))])
def test_gradcheck(op, shapes):
    A = randn(2, *shapes[0], seed=1).requires_grad_()
    B = randn(*shapes[1], seed=2).requires_grad_()
    assert torch.autograd.gradcheck(op, (A, B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_numpy_round_trip(dtype):
    A, B = randn(3, 6, dtype=dtype), randn(4, 2, seed=1, dtype=dtype)
    out = stpnet.stp(A, B)
    assert out.dtype == dtype and out.device == A.device
    if dtype != torch.bfloat16:
        out_np = stpnet.stp(A.numpy(), B.numpy())
        assert isinstance(out_np, np.ndarray) and out_np.dtype == A.numpy().dtype
        np.testing.assert_allclose(out_np, out.numpy(), rtol=1e-5)


def test_mixed_dtypes_promote():
    out = stpnet.stp(randn(2, 4, dtype=torch.float32), randn(2, 3))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("shapes", [((64, 4096), (64, 64)), ((64, 64), (4096, 8)), ((6, 10), (4, 3))])
@pytest.mark.parametrize("op", [stpnet.stp, stpnet.rstp])
def test_no_kronecker_product_or_identity_is_built(monkeypatch, op, shapes):
    A, B = randn(*shapes[0]), randn(*shapes[1], seed=1)
    expected = (kron_stp if op is stpnet.stp else kron_rstp)(A, B)

    def forbidden(*args, **kwargs):
        raise AssertionError("the STP must not build Kronecker products or identity matrices")

    monkeypatch.setattr(torch, "kron", forbidden)
    monkeypatch.setattr(torch, "eye", forbidden)
    assert close(op(A, B), expected, 1e-9)


# ----------------------------------------------------------------- mode product


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), mode=st.integers(0, 3),
       t=st.integers(1, 3), J=st.integers(1, 4), s=seed)
def test_mode_product_entrywise(shape, mode, t, J, s):
    mode %= len(shape)
    P = shape[mode]
    shape[mode] = P * t
    X, U = randn(*shape, seed=s), randn(J, P, seed=s + 1)
    Y = stpnet.mode_product(X, U, mode)
    # reference: (U ⊗ I_t) applied to the mode-n fibres
    K = torch.kron(U, torch.eye(t, dtype=U.dtype))
    expected = torch.tensordot(K, X, dims=([1], [mode])).movedim(0, mode)
    assert close(Y, expected)


def test_mode_product_t1_is_ordinary_and_rules_hold():
    X = randn(4, 6, 8)
    U, V = randn(5, 3), randn(2, 5, seed=3)
    W = randn(3, 2, seed=4)
    assert close(stpnet.mode_product(X, randn(7, 6, seed=9), 1),
                 torch.einsum("jb,abc->ajc", randn(7, 6, seed=9), X))
    # different modes commute
    assert close(stpnet.mode_product(stpnet.mode_product(X, U, 1), W, 2),
                 stpnet.mode_product(stpnet.mode_product(X, W, 2), U, 1))
    # same mode and t: (X ⋉ U) ⋉ V = X ⋉ (V U)
    assert close(stpnet.mode_product(stpnet.mode_product(X, U, 1), V, 1), stpnet.mode_product(X, V @ U, 1))


def test_mode_product_gradcheck():
    X = randn(4, 6, 2).requires_grad_()
    U = randn(5, 3, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: stpnet.mode_product(a, b, 1), (X, U))
