"""Every invalid request raises ValueError (or InsufficientMemoryError) saying what is wrong and
what is valid; ranks larger than the data allows are lowered, not refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import stpnet
from stpnet import InsufficientMemoryError, TRTensor, TTTensor, TuckerTensor, decompose

FORMATS = list(stpnet.FORMATS)


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _r(*shape: int) -> torch.Tensor:
    return _x(*shape)


# ------------------------------------------------------------------------------- t and ranks

@pytest.mark.parametrize("fmt", ["stt", "str"])
def test_t_not_dividing_a_rank(fmt):
    X = _x(4, 6, 8)
    with pytest.raises(ValueError, match=r"t=2 does not divide rank\[0\]=5.*multiples of t.*4 or 6"):
        decompose(X, fmt, rank=5, t=2)
    with pytest.raises(ValueError, match=r"t=2 does not divide rank\[1\]=3.*multiples of t.*2 or 4"):
        decompose(X, fmt, rank=[2, 3] if fmt == "stt" else [2, 3, 4], t=2)


def test_t_not_dividing_a_rank_sttu():
    with pytest.raises(ValueError, match=r"t=2 does not divide.*mode 1.*=3.*multiples of t.*2 or 4"):
        decompose(_x(4, 6, 8), "sttu", rank=[4, 3, 4], t=2)


def test_t_not_dividing_a_rank_sttu_names_the_right_entry():
    with pytest.raises(ValueError) as info:
        decompose(_x(4, 6, 8), "sttu", rank=[4, 3, 4], t=2)
    msg = str(info.value)
    assert "rank[0]" not in msg  # rank[0] is 4, a valid multiple of 2
    assert "rank[1]=3" in msg


@pytest.mark.parametrize("fmt", ["stt", "str"])
def test_t_not_dividing_the_last_mode(fmt):
    # the first modes need not be multiples of t; the last one must
    X = _x(5, 6, 5)
    with pytest.raises(ValueError, match=r"t=2 does not divide the last mode.*size 5.*valid t.*\[1, 5\]"):
        decompose(X, fmt, rank=4, t=2)


@pytest.mark.parametrize("shape,mode,size,valid", [((4, 5, 6), 1, 5, r"\[1, 5\]"),
                                                    ((5, 4, 6), 0, 5, r"\[1, 5\]"),
                                                    ((4, 6, 9), 2, 9, r"\[1, 3, 9\]")])
def test_t_not_dividing_a_mode_sttu(shape, mode, size, valid):
    with pytest.raises(ValueError, match=rf"t=2 does not divide mode {mode} \(size {size}\).*valid t.*{valid}"):
        decompose(_x(*shape), "sttu", rank=2, t=2)


def test_per_mode_t_not_dividing_its_mode_sttu():
    with pytest.raises(ValueError, match=r"t=4 does not divide mode 1 \(size 6\).*\[1, 2, 3, 6\]"):
        decompose(_x(4, 6, 8), "sttu", rank=[4, 4, 4], t=[1, 4, 1])
    with pytest.raises(ValueError, match=r"t has 2 entries.*order 3 needs 3"):
        decompose(_x(4, 6, 8), "sttu", rank=4, t=[2, 2])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [0, -1, -4])
def test_rank_below_one(fmt, bad):
    with pytest.raises(ValueError, match=rf"rank must be >= 1, got {bad}"):
        decompose(_x(4, 6, 8), fmt, rank=bad)


@pytest.mark.parametrize("fmt,rank", [("tt", [2, 0]), ("tr", [2, -2, 2]), ("tucker", [2, 2, 0])])
def test_rank_list_entry_below_one(fmt, rank):
    bad = [i for i, r in enumerate(rank) if r < 1][0]
    with pytest.raises(ValueError, match=rf"rank\[{bad}\] must be >= 1, got {rank[bad]}"):
        decompose(_x(4, 6, 8), fmt, rank=rank)


def test_non_integer_rank_and_t():
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 2\.5"):
        decompose(_x(4, 6, 8), "tt", rank=2.5)
    with pytest.raises(ValueError, match=r"t must be >= 1, got 0"):
        decompose(_x(4, 6, 8), "stt", rank=2, t=0)


def test_rank_as_numpy_array_is_accepted_or_explained():
    try:
        Y = decompose(_x(4, 6, 8), "tt", rank=np.array([2, 3]))
    except ValueError as err:
        assert re.search(r"list|sequence|tuple", str(err)), str(err)
    else:
        assert Y.rank == (2, 3)


# ------------------------------------------------------------------------------ tensor order

@pytest.mark.parametrize("fmt,what", [("tt", "TT/STT"), ("stt", "TT/STT"), ("tr", "TR/STR"),
                                      ("str", "TR/STR")])
@pytest.mark.parametrize("rule", [{"rank": 2}, {"tol": 0.1}, {"max_params": 100}])
def test_one_way_tensor_for_train_and_ring(fmt, what, rule):
    t = {"stt": 1, "str": 1}.get(fmt)  # t=1 so that only the order is wrong
    with pytest.raises(ValueError, match=rf"{what} needs a tensor of order >= 2, got order 1"):
        decompose(_x(6), fmt, t=t, **rule)


@pytest.mark.parametrize(
    "fmt,rank,msg",
    [
        ("tt", [2, 2, 2], r"rank has 3 entries; a tensor of order 3 needs 2 .* or 4"),
        ("tt", [2], r"rank has 1 entries; a tensor of order 3 needs 2 .* or 4"),
        ("stt", [2, 2, 2, 2, 2], r"rank has 5 entries; a tensor of order 3 needs 2 .* or 4"),
        ("tt", [2, 2, 3, 1], r"length N\+1=4 must start and end with 1"),
        ("tr", [2, 2], r"rank has 2 entries; a tensor of order 3 needs 3 .* or 4"),
        ("str", [2, 2, 2, 2, 2], r"rank has 5 entries; a tensor of order 3 needs 3 .* or 4"),
        ("tr", [2, 2, 3, 3], r"length N\+1=4 must end with R_0=2, got 3"),
        ("tucker", [2, 2], r"rank has 2 entries, but a Tucker tensor of order 3 needs 3"),
        ("sttu", [2, 2, 2, 2], r"rank has 4 entries, but a Tucker tensor of order 3 needs 3"),
    ],
)
def test_rank_list_of_wrong_length(fmt, rank, msg):
    with pytest.raises(ValueError, match=msg):
        decompose(_x(4, 6, 8), fmt, rank=rank)


# ------------------------------------------------------------------------------------- input

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_nan_in_input(fmt, kind):
    X = _x(4, 6, 8)
    X[1, 2, 3] = float("nan")
    X = X.numpy() if kind == "numpy" else X
    with pytest.raises(ValueError, match=r"1 NaN and 0 Inf values; all entries must be finite"):
        decompose(X, fmt, rank=2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_in_input(fmt, kind, value):
    X = _x(4, 6, 8, dtype=torch.float32)
    X[0, 0, 0] = value
    X[3, 5, 7] = value
    X = X.numpy() if kind == "numpy" else X
    with pytest.raises(ValueError, match=r"0 NaN and 2 Inf values; all entries must be finite"):
        decompose(X, fmt, rank=2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(0, 4, 6), (4, 0, 6), (4, 6, 0)])
def test_empty_tensor(fmt, shape):
    with pytest.raises(ValueError, match=r"X is empty \(shape .*\); every mode needs size >= 1"):
        decompose(torch.zeros(shape, dtype=torch.float64), fmt, rank=2)
    with pytest.raises(ValueError, match=r"X is empty"):
        decompose(np.zeros(shape), fmt, rank=2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float16, torch.bool])
def test_non_float_dtype(dtype):
    X = torch.ones(4, 6, 8, dtype=dtype)
    with pytest.raises(ValueError, match=rf"must be float32 or float64, got {dtype}.*\.float\(\) or \.double\(\)"):
        decompose(X, "tt", rank=2)


def test_non_float_numpy_dtype():
    with pytest.raises(ValueError, match=r"must be float32 or float64, got torch\.int64"):
        decompose(np.ones((4, 6, 8), dtype=np.int64), "tucker", rank=2)


# ----------------------------------------------------------------------- format and rank rule

@pytest.mark.parametrize("name", ["ttt", "ht", "tensor_train", ""])
def test_unknown_format(name):
    valid = re.escape(", ".join(stpnet.FORMATS))  # every format, cp included, and nothing after
    with pytest.raises(ValueError, match=rf"unknown format '{name}'; valid formats: {valid}$"):
        decompose(_x(4, 6, 8), name, rank=2)


@pytest.mark.parametrize("fmt,semi", [("tt", "stt"), ("tr", "str"), ("tucker", "sttu")])
def test_classic_format_with_t_above_one(fmt, semi):
    with pytest.raises(ValueError, match=rf"format '{fmt}' is the classic format \(t = 1\); for t=.*2.* use '{semi}'"):
        decompose(_x(4, 6, 8), fmt, rank=2, t=2)


def test_classic_tucker_with_one_mode_t_above_one():
    with pytest.raises(ValueError, match=r"classic format.*'sttu'"):
        decompose(_x(4, 6, 8), "tucker", rank=2, t=[1, 2, 1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_rank_rule(fmt):
    with pytest.raises(ValueError, match=r"give a rank rule: rank=\.\.\., tol=\.\.\., or max_params=\.\.\."):
        decompose(_x(4, 6, 8), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_params_too_small(fmt):
    X = _x(4, 6, 8)
    with pytest.raises(ValueError, match=r"max_params=1 is below the smallest .*valid budgets are >= \d+") as info:
        decompose(X, fmt, max_params=1)
    # the stated minimum is the true one: it works, one less does not
    need = int(re.search(r"valid budgets are >= (\d+)", str(info.value)).group(1))
    Y = decompose(X, fmt, max_params=need)
    assert Y.num_params <= need
    with pytest.raises(ValueError, match=r"is below the smallest"):
        decompose(X, fmt, max_params=need - 1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("other", [{"rank": 2}, {"tol": 0.1}])
def test_max_params_combined_with_rank_or_tol(fmt, other):
    with pytest.raises(ValueError, match=r"max_params chooses the ranks by itself; do not combine it with rank or tol"):
        decompose(_x(4, 6, 8), fmt, max_params=500, **other)


@pytest.mark.parametrize("fmt", ["tt", "stt"])
def test_n_iter_with_tt(fmt):
    with pytest.raises(ValueError, match=r"TT/STT has no refinement.*tucker/sttu \(HOOI\) and tr/str \(ALS\)"):
        decompose(_x(4, 6, 8), fmt, rank=2, n_iter=3)


def test_other_bad_options():
    X = _x(4, 6, 8)
    with pytest.raises(ValueError, match=r"tol .* must be in \[0, 1\), got 1\.5"):
        decompose(X, "tt", tol=1.5)
    with pytest.raises(ValueError, match=r"unknown svd method 'lanczos'; valid: exact, randomized"):
        decompose(X, "tt", rank=2, svd="lanczos")
    with pytest.raises(ValueError, match=r"n_iter and n_restarts must be >= 0, got -1"):
        decompose(X, "tucker", rank=2, n_iter=-1)


# ---------------------------------------------------------------------- stp and mode_product

@pytest.mark.parametrize("fn,name", [(stpnet.stp, "stp"), (stpnet.rstp, "rstp")])
def test_stp_one_dimensional_input(fn, name):
    with pytest.raises(ValueError, match=rf"{name}: A must have at least 2 dimensions.*shape \(5,\).*reshape\(-1, 1\)"):
        fn(_r(5), _r(5, 2))
    with pytest.raises(ValueError, match=rf"{name}: B must have at least 2 dimensions.*shape \(3,\)"):
        fn(np.ones((2, 3)), np.ones(3))


def test_stp_empty_input():
    with pytest.raises(ValueError, match=r"stp: A is empty \(shape \(0, 3\)\)"):
        stpnet.stp(torch.zeros(0, 3), _r(3, 2).float())


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_mode_product_column_count_not_dividing(kind):
    X, U = _r(4, 6, 8), _r(2, 4)
    if kind == "numpy":
        X, U = X.numpy(), U.numpy()
    with pytest.raises(ValueError, match=r"mode 1 has size 6, which is not a multiple of U's 4 columns.*one of \[1, 2, 3, 6\] columns"):
        stpnet.mode_product(X, U, 1)


@pytest.mark.parametrize("mode", [3, 7, -4])
def test_mode_product_mode_out_of_range(mode):
    with pytest.raises(ValueError, match=rf"mode {mode} is out of range for a tensor of order 3; valid modes are -3\.\.2"):
        stpnet.mode_product(_r(4, 6, 8), _r(2, 2), mode)


def test_mode_product_non_matrix_u():
    with pytest.raises(ValueError, match=r"U must be a matrix \(J x P\), got shape \(2, 3, 1\)"):
        stpnet.mode_product(_r(4, 6, 8), _r(2, 3, 1), 1)


def test_swap_matrix_sizes():
    with pytest.raises(ValueError, match=r"swap_matrix: m must be a positive int, got 0"):
        stpnet.swap_matrix(0, 2)


# --------------------------------------------------------------------- format constructors

@pytest.mark.parametrize(
    "cores,t,msg",
    [
        ([(1, 4, 3), (2, 5, 2), (2, 6, 1)], 1, r"first core has R_1=3, so core 1 needs R_1/t=3 rows \(t=1\), got 2"),
        ([(1, 4, 4), (4, 5, 2), (2, 6, 1)], 2, r"first core has R_1=4, so core 1 needs R_1/t=2 rows \(t=2\), got 4"),
        ([(1, 4, 3), (3, 5, 2), (3, 6, 1)], 1, r"core 1 ends in rank 2 but core 2 starts with 3"),
        ([(1, 4, 3), (3, 5, 2), (2, 6, 2)], 1, r"first core must have shape \(1, I_1, R_1\) and the last \(R/t, I_N/t, 1\)"),
        ([(2, 4, 3), (3, 5, 2), (2, 6, 1)], 1, r"first core must have shape \(1, I_1, R_1\)"),
        ([(4, 3, 2, 1), (3, 5, 2), (2, 6)], 1, r"core 0 must be 3-way \(r_in, I, r_out\), got shape \(4, 3, 2, 1\)"),
        ([(4, 3)], 1, r"needs at least 2 cores"),
    ],
)
def test_tt_tensor_inconsistent_cores(cores, t, msg):
    with pytest.raises(ValueError, match=rf"TTTensor.*{msg}"):
        TTTensor([_r(*s) for s in cores], t=t)


def test_tt_tensor_mixed_dtypes():
    with pytest.raises(ValueError, match=r"factor 1 is torch\.float32.*factor 0 is torch\.float64.*must match"):
        TTTensor([_r(4, 3), _r(3, 6).float()])


@pytest.mark.parametrize(
    "cores,t,msg",
    [
        ([(2, 4, 3), (2, 5, 2), (2, 6, 2)], 1, r"first core has R_1=3, so core 1 needs R_1/t=3 rows \(t=1\), got 2"),
        ([(2, 4, 4), (3, 5, 2), (2, 6, 2)], 2, r"first core has R_1=4, so core 1 needs R_1/t=2 rows \(t=2\), got 3"),
        ([(2, 4, 3), (3, 5, 2), (3, 6, 2)], 1, r"core 1 ends in rank 2 but core 2 starts with 3"),
        ([(2, 4, 3), (3, 5, 2), (2, 6, 3)], 1, r"last core must close the ring with R_0/t=2, got 3"),
        ([(2, 4), (3, 5, 2), (2, 6, 2)], 1, r"core 0 must be 3-way \(r_in, I, r_out\), got shape \(2, 4\)"),
        ([(2, 4, 2)], 1, r"needs at least 2 cores"),
    ],
)
def test_tr_tensor_inconsistent_cores(cores, t, msg):
    with pytest.raises(ValueError, match=rf"TRTensor.*{msg}"):
        TRTensor([_r(*s) for s in cores], t=t)


@pytest.mark.parametrize(
    "core,factors,t,msg",
    [
        ((2, 3, 4), [(4, 2), (5, 2), (6, 4)], 1,
         r"factor 1 has 2 columns; with t=1 the core's mode 1 must have 2 entries, it has 3"),
        ((2, 4, 4), [(4, 2), (5, 2), (6, 2)], 2,
         r"factor 0 has 2 columns; with t=2 the core's mode 0 must have 4 entries, it has 2"),
        ((2, 3, 4), [(4, 2), (5, 3)], 1, r"a core of order 3 needs 3 factors, got 2"),
        ((2, 3, 4), [(4, 2), (5, 3), (6, 4, 1)], 1, r"factor 2 must be a matrix, got shape \(6, 4, 1\)"),
    ],
)
def test_tucker_tensor_inconsistent_shapes(core, factors, t, msg):
    with pytest.raises(ValueError, match=rf"TuckerTensor: {msg}"):
        TuckerTensor(_r(*core), [_r(*s) for s in factors], t=t)


def test_tucker_tensor_wrong_number_of_t():
    with pytest.raises(ValueError, match=r"t has 2 entries, but a Tucker tensor of order 3 needs 3"):
        TuckerTensor(_r(2, 3, 4), [_r(4, 2), _r(5, 3), _r(6, 4)], t=[1, 1])


# ------------------------------------------------------------------------------------ memory

@pytest.mark.parametrize("fmt,kwargs", [("tt", {}), ("stt", {"t": 2}), ("tucker", {}),
                                        ("tr", {}), ("tr", {"n_iter": 5})])
def test_memory_refusal_before_computing(monkeypatch, fmt, kwargs):
    calls = []
    real_svd = torch.linalg.svd

    def spy(*args, **kw):
        calls.append(1)
        return real_svd(*args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    X = _x(4, 6, 8)
    with pytest.raises(InsufficientMemoryError, match=r"lower the rank|randomized") as info:
        decompose(X, fmt, rank=2, max_memory=1000, **kwargs)
    assert isinstance(info.value, MemoryError)
    assert calls == []  # refused before any SVD ran
    # with enough memory the same request runs
    decompose(X, fmt, rank=2, max_memory=10**9, **kwargs)
    assert calls


def test_insufficient_memory_error_is_memory_error():
    assert issubclass(InsufficientMemoryError, MemoryError)
    with pytest.raises(MemoryError):
        decompose(_x(4, 6, 8), "tt", rank=2, max_memory=1000)


def test_memory_refusal_message_shows_distinct_amounts():
    with pytest.raises(InsufficientMemoryError) as info:
        decompose(_x(4, 6, 8), "tt", rank=2, max_memory=1000)
    amounts = re.findall(r"\d+(?:\.\d+)?\s*(?:[KMGT]i?B|B\b|bytes)", str(info.value))
    assert len(amounts) >= 2 and len(set(amounts)) >= 2, str(info.value)


# ------------------------------------------------------------------ oversized ranks are lowered

@pytest.mark.parametrize(
    "fmt,shape,t,expected",
    [
        ("tt", (4, 5, 6), 1, (4, 6)),
        ("stt", (4, 5, 6), 2, (16, 6)),
        ("tucker", (4, 5, 6), 1, (4, 5, 6)),
        ("sttu", (4, 6, 6), 2, (4, 6, 6)),
        ("tr", (4, 5, 6), 1, (2, 2, 10)),
        ("str", (4, 5, 6), 2, (4, 8, 12)),
    ],
)
def test_rank_larger_than_data_is_lowered(fmt, shape, t, expected):
    X = _x(*shape, seed=3)
    rank = 100 if t == 1 else 100 - 100 % t
    Y = decompose(X, fmt, rank=rank, t=t)
    assert Y.rank == expected
    assert all(R % t == 0 for R in Y.rank)
    assert Y.shape == shape
    assert stpnet.relative_error(X, Y) < 1e-12  # the largest valid ranks reconstruct exactly
    # the reported ranks are those of the factors
    if fmt in ("tt", "stt"):
        assert Y.factors[0].shape[2] == Y.rank[0]
        assert tuple(t * G.shape[0] for G in Y.factors[1:]) == Y.rank
    elif fmt in ("tr", "str"):
        assert tuple(t * G.shape[0] for G in Y.factors) == Y.rank
    else:
        assert tuple(Y.core.shape) == Y.rank
    # asking for the reported ranks gives the same decomposition
    Y2 = decompose(X, fmt, rank=list(Y.rank), t=t)
    assert Y2.rank == Y.rank
    torch.testing.assert_close(Y2.to_tensor(), Y.to_tensor())


def test_rank_list_lowered_per_bond():
    X = _x(4, 5, 6, seed=4)
    Y = decompose(X, "tt", rank=[100, 2])
    assert Y.rank == (4, 2)
    assert stpnet.relative_error(X, Y) > 1e-3  # the second bond still truncates
    # STT t=2 is a TT of the (8, 5, 3) re-tensorization with ranks (50, 1): the first bond is
    # bounded by r_2 * I_2 = 5 there, so R_1 = 2 * 5
    Y = decompose(X, "stt", rank=[100, 2], t=2)
    assert Y.rank == (10, 2)
    assert stpnet.relative_error(X, Y) > 1e-3
