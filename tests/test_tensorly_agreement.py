"""With t = 1, stpnet's decompositions agree with TensorLy's on the same inputs and ranks.

TensorLy (numpy backend, float64) is the reference: the reconstructed tensors must agree to 1e-6
relative, and so must the relative errors. Ranks are truncating (below what the data allows), so
the comparison checks the choice of subspaces, not only an exact reconstruction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stpnet

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import tensor_ring, tensor_train, tucker  # noqa: E402

RTOL = 1e-6


def _data(shape, seed, low_rank=None):
    """A float64 NumPy tensor: Gaussian, or a low-multilinear-rank tensor plus 10% noise."""
    rng = np.random.default_rng(seed)
    if low_rank is None:
        return rng.standard_normal(shape)
    X = rng.standard_normal(low_rank)
    for mode, size in enumerate(shape):
        U = rng.standard_normal((size, low_rank[mode]))
        X = np.moveaxis(np.tensordot(U, np.moveaxis(X, mode, 0), axes=(1, 0)), 0, mode)
    X /= np.linalg.norm(X)
    return X + 0.1 * rng.standard_normal(shape) / np.sqrt(X.size)


def _dense(Y) -> np.ndarray:
    return Y.to_tensor().detach().cpu().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _assert_agree(X: np.ndarray, Y, X_tl: np.ndarray) -> None:
    X_st = _dense(Y)
    assert X_st.shape == X_tl.shape == X.shape
    assert X_st.dtype == np.float64
    assert _rel(X_st, X_tl) < RTOL
    err_st = stpnet.relative_error(X, Y)
    err_tl = _rel(X_tl, X)
    assert err_st == pytest.approx(err_tl, rel=RTOL, abs=1e-12)
    return err_st


# --------------------------------------------------------------------------------------- Tucker

TUCKER_CASES = [
    ((6, 7, 8), (3, 4, 5), None),
    ((5, 6, 4, 3), (2, 3, 2, 2), None),
    ((9, 8, 7), (4, 3, 3), (4, 3, 3)),  # low rank + noise: truncation at a clear gap
    ((10, 4, 6), (5, 2, 6), None),  # one mode kept at full rank
]


@pytest.mark.parametrize("fmt", ["tucker", "sttu"])
@pytest.mark.parametrize("shape,rank,low_rank", TUCKER_CASES)
def test_tucker_hosvd_matches_tensorly(tl_numpy, shape, rank, low_rank, fmt):
    X = _data(shape, seed=1, low_rank=low_rank)
    # n_iter_max=0: tensorly returns its SVD initialization, i.e. the HOSVD
    T = tucker(X, list(rank), n_iter_max=0, init="svd", tol=0)
    Y = stpnet.decompose(X, fmt, rank=list(rank), t=1)
    assert Y.rank == rank and Y.t == (1,) * len(shape)
    err = _assert_agree(X, Y, tl.tucker_to_tensor(T))
    assert err > 1e-3  # the ranks truncate: not an exact fit


@pytest.mark.parametrize("n_iter", [1, 2, 5])
@pytest.mark.parametrize("shape,rank,low_rank", TUCKER_CASES)
def test_tucker_hooi_matches_tensorly(tl_numpy, shape, rank, low_rank, n_iter):
    X = _data(shape, seed=2, low_rank=low_rank)
    # tol=0 disables tensorly's early stop; stpnet stops only on an error change below 1e-12
    T, tl_errors = tucker(X, list(rank), n_iter_max=n_iter, init="svd", tol=0, return_errors=True)
    st_errors = []
    Y = stpnet.decompose(X, "tucker", rank=list(rank), n_iter=n_iter,
                         callback=lambda sweep, err: st_errors.append(err))
    err = _assert_agree(X, Y, tl.tucker_to_tensor(T))
    assert len(tl_errors) == n_iter
    assert 1 <= len(st_errors) <= n_iter
    np.testing.assert_allclose(st_errors, tl_errors[: len(st_errors)], rtol=RTOL, atol=1e-12)
    assert err == pytest.approx(tl_errors[-1], rel=RTOL, abs=1e-12)


def test_tucker_hooi_improves_on_hosvd(tl_numpy):
    """Sanity check that the HOOI comparison above compares something different from HOSVD."""
    X = _data((6, 7, 8), seed=3)
    e0 = stpnet.relative_error(X, stpnet.decompose(X, "tucker", rank=[3, 4, 5]))
    e3 = stpnet.relative_error(X, stpnet.decompose(X, "tucker", rank=[3, 4, 5], n_iter=3))
    assert e3 < e0 - 1e-6


# ------------------------------------------------------------------------------------------- TT

TT_CASES = [
    ((6, 7, 8), (3, 4), None),
    ((5, 6, 4, 3), (3, 5, 2), None),
    ((4, 5, 6, 7), (2, 6, 5), None),
    ((8, 6, 5, 4), (3, 3, 3), (3, 3, 3, 3)),
    ((10, 12), (4,), None),  # a matrix: truncated SVD
]


@pytest.mark.parametrize("fmt", ["tt", "stt"])
@pytest.mark.parametrize("shape,rank,low_rank", TT_CASES)
def test_tt_matches_tensorly(tl_numpy, shape, rank, low_rank, fmt):
    X = _data(shape, seed=4, low_rank=low_rank)
    T = tensor_train(X, [1, *rank, 1])
    X_tl = tl.tt_to_tensor(T)
    Y = stpnet.decompose(X, fmt, rank=list(rank), t=1)
    assert Y.rank == tuple(rank) == tuple(T.rank[1:-1])
    err = _assert_agree(X, Y, X_tl)
    assert err > 1e-3
    # the N+1 form with boundary ones is the same request
    Y2 = stpnet.decompose(X, fmt, rank=[1, *rank, 1], t=1)
    assert _rel(_dense(Y2), X_tl) < RTOL


def test_tt_oversized_rank_matches_tensorly(tl_numpy):
    X = _data((4, 5, 6), seed=5)
    T = tensor_train(X, [1, 100, 100, 1])
    Y = stpnet.decompose(X, "tt", rank=100)
    assert Y.rank == tuple(T.rank[1:-1]) == (4, 6)
    _assert_agree(X, Y, tl.tt_to_tensor(T))


# ------------------------------------------------------------------------------------------- TR

TR_CASES = [  # r_0 * r_1 <= first mode size, as tensorly requires
    ((12, 5, 6), (2, 3, 4), None),
    ((16, 4, 5, 3), (2, 4, 5, 3), None),
    ((9, 6, 7), (3, 3, 5), None),
    ((20, 5, 4, 6), (2, 2, 3, 2), (6, 4, 3, 3)),
]


@pytest.mark.parametrize("fmt", ["tr", "str"])
@pytest.mark.parametrize("shape,rank,low_rank", TR_CASES)
def test_tr_matches_tensorly(tl_numpy, shape, rank, low_rank, fmt):
    X = _data(shape, seed=6, low_rank=low_rank)
    T = tensor_ring(X, [*rank, rank[0]])
    X_tl = tl.tr_to_tensor(T)
    Y = stpnet.decompose(X, fmt, rank=list(rank), t=1)
    assert Y.rank == tuple(rank) == tuple(T.rank[:-1])
    err = _assert_agree(X, Y, X_tl)
    assert err > 1e-3
    # the N+1 form with R_N = R_0 is the same request
    Y2 = stpnet.decompose(X, fmt, rank=[*rank, rank[0]], t=1)
    assert _rel(_dense(Y2), X_tl) < RTOL


# ----------------------------------------------------------------------- input kinds and dtypes

@pytest.mark.parametrize(
    "fmt,rank,kwargs",
    [("tucker", [3, 4, 3], {}), ("tucker", [3, 4, 3], {"n_iter": 2}), ("tt", [3, 4], {}),
     ("tr", [2, 3, 4], {}), ("tr", [2, 3, 4], {"n_iter": 3})],
)
def test_numpy_and_torch_inputs_agree(fmt, rank, kwargs):
    X = _data((12, 5, 6), seed=7)
    Y_np = stpnet.decompose(X, fmt, rank=rank, **kwargs)
    Y_th = stpnet.decompose(torch.from_numpy(X.copy()), fmt, rank=rank, **kwargs)
    assert Y_np.dtype == Y_th.dtype == torch.float64
    assert Y_np.rank == Y_th.rank
    torch.testing.assert_close(Y_np.to_tensor(), Y_th.to_tensor(), rtol=1e-12, atol=1e-12)
    assert stpnet.relative_error(X, Y_np) == pytest.approx(
        stpnet.relative_error(torch.from_numpy(X), Y_th), rel=1e-12)


@pytest.mark.parametrize(
    "fmt,rank,kwargs",
    [("tucker", [3, 4, 3], {}), ("tucker", [3, 4, 3], {"n_iter": 2}), ("tt", [3, 4], {}),
     ("tr", [2, 3, 4], {}), ("stt", [4, 4], {"t": 2}), ("sttu", [4, 4, 4], {"t": 2}),
     ("str", [2, 4, 4], {"t": 2})],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_float32_input_gives_float32_result(fmt, rank, kwargs, kind):
    X64 = _data((12, 6, 8), seed=8)
    X32 = X64.astype(np.float32) if kind == "numpy" else torch.from_numpy(X64).float()
    Y64 = stpnet.decompose(X64, fmt, rank=rank, **kwargs)
    Y32 = stpnet.decompose(X32, fmt, rank=rank, **kwargs)
    assert Y32.dtype == torch.float32
    assert all(f.dtype == torch.float32 for f in Y32.parameters())
    assert Y32.to_tensor().dtype == torch.float32
    assert Y32.rank == Y64.rank
    e64 = stpnet.relative_error(X64, Y64)
    e32 = stpnet.relative_error(X32, Y32)
    assert e32 == pytest.approx(e64, abs=1e-4)
    assert _rel(_dense(Y32).astype(np.float64), _dense(Y64)) < 1e-3
