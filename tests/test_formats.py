"""Format classes against Kronecker-definition references, parameter counts, and the identities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import stpnet
from conftest import kron_stp, randn
from stpnet.functional import copy_index_to_first_mode, copy_index_to_last_mode

D = torch.float64


def stt_chain_reference(cores, t):
    """unfold(X) = G_1 ⋉ G_2 ⋉ ... ⋉ G_N by the Kronecker definition (docs/formats-spec.md, section 5)."""
    M = cores[0][0]  # (I_1, R_1)
    for G in cores[1:]:
        r_in, size, r_out = G.shape
        M = kron_stp(M, G.reshape(r_in, size * r_out))  # columns (i_k, b_k, u)
        M = M.reshape(-1, r_out * t)  # rows gain i_k, columns are R_k = (b_k, u)
    return M  # (I_1 ... I_{N-1} * I_N/t, t) flattened as (..., j, u) == X[..., j*t+u]


def tt_reference(cores, t, shape):
    return stt_chain_reference(cores, t).reshape(shape)


def tr_reference(cores, t, shape):
    total = 0
    for a in range(cores[0].shape[0]):
        ring = [cores[0][a : a + 1], *cores[1:-1], cores[-1][:, :, a : a + 1]]
        total = total + stt_chain_reference(ring, t).reshape(shape)
    return total


def tucker_reference(core, factors, ts):
    X = core
    for mode, (U, t) in enumerate(zip(factors, ts)):
        K = torch.kron(U, torch.eye(t, dtype=U.dtype))  # U ⊗ I_t
        X = torch.tensordot(K, X, dims=([1], [mode])).movedim(0, mode)
    return X


shapes_tt = [(4, 6, 8), (6, 4), (2, 3, 4, 6), (5, 3, 2, 2, 4)]


@pytest.mark.parametrize("shape", shapes_tt)
@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("rank", [2, 4, 6])
def test_tt_matches_chain_of_kronecker_stps(shape, t, rank):
    X = stpnet.TTTensor.random(shape, rank, t, dtype=D, generator=torch.Generator().manual_seed(rank))
    cores = [G.detach() for G in X.cores]
    assert X.shape == shape
    assert torch.allclose(X.to_tensor(), tt_reference(cores, t, shape), atol=1e-12)


def test_stt_entrywise_formula():
    X = stpnet.TTTensor.random((3, 4, 6), 4, t=2, dtype=D)
    G1, G2, G3 = (G.detach() for G in X.cores)
    dense, t = X.to_tensor(), 2
    for i1, i2, j, u in itertools.product(range(3), range(4), range(3), range(t)):
        value = sum(G1[0, i1, b1 * t + u] * G2[b1, i2, b2] * G3[b2, j, 0]
                    for b1 in range(2) for b2 in range(2))
        assert torch.isclose(dense[i1, i2, j * t + u], value)


@pytest.mark.parametrize("shape", shapes_tt)
@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("rank", [2, 4])
def test_tr_matches_kronecker_reference(shape, t, rank):
    X = stpnet.TRTensor.random(shape, rank, t, dtype=D, generator=torch.Generator().manual_seed(3))
    cores = [G.detach() for G in X.cores]
    assert torch.allclose(X.to_tensor(), tr_reference(cores, t, shape), atol=1e-12)


@pytest.mark.parametrize("shape,t", [((4, 6, 8), (1, 2, 2)), ((6, 4), 2), ((4, 4, 4), (4, 1, 2)), ((3, 5), 1)])
def test_tucker_matches_kronecker_factors(shape, t):
    X = stpnet.TuckerTensor.random(shape, 4, t, dtype=D)
    ref = tucker_reference(X.core.detach(), [U.detach() for U in X.factors], X.t)
    assert torch.allclose(X.to_tensor(), ref, atol=1e-12)
    assert torch.allclose(X.to_classic().to_tensor(), ref, atol=1e-12)


# ------------------------------------------------------------------------ counts


@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=5), t=st.sampled_from([1, 2, 3]),
       r=st.integers(1, 4), data=st.data())
def test_parameter_counts_equal_math_formulas(shape, t, r, data):
    shape[-1] *= t
    ranks = [t * data.draw(st.integers(1, r)) for _ in range(len(shape))]
    n = len(shape)
    # STT (docs/formats-spec.md, section 5): I_1 R_1 + sum I_k R_{k-1} R_k / t^2 + I_N R_{N-1} / t^2
    R = stpnet.TTTensor.validate_rank(shape, ranks[: n - 1], t)
    tt = stpnet.TTTensor.random(shape, R, t)
    formula = shape[0] * R[0] + sum(shape[k] * R[k - 1] * R[k] / t**2 for k in range(1, n - 1)) \
        + shape[-1] * R[-1] / t**2
    assert tt.num_params == formula == stpnet.TTTensor.param_count(shape, R, t)
    assert tt.rank == R and all(v % t == 0 for v in R)
    # STR (docs/formats-spec.md, section 6): R_0 I_1 R_1 / t + sum I_k R_{k-1} R_k / t^2 + I_N R_{N-1} R_0 / t^3
    R = stpnet.TRTensor.validate_rank(shape, ranks, t)
    tr = stpnet.TRTensor.random(shape, R, t)
    formula = R[0] * shape[0] * R[1] / t + sum(shape[k] * R[k] * R[k + 1] / t**2 for k in range(1, n - 1)) \
        + shape[-1] * R[-1] * R[0] / t**3
    assert tr.num_params == formula == stpnet.TRTensor.param_count(shape, R, t)
    # STTu (docs/formats-spec.md, section 4): prod R_n + sum I_n R_n / t_n^2, here t only on the last mode
    ts = (1,) * (n - 1) + (t,)
    R = stpnet.TuckerTensor.validate_rank(shape, [r] * (n - 1) + [t * r], ts)
    tu = stpnet.TuckerTensor.random(shape, R, ts)
    formula = math.prod(R) + sum(I * Rn / tn**2 for I, Rn, tn in zip(shape, R, ts))
    assert tu.num_params == formula == stpnet.TuckerTensor.param_count(shape, R, ts)


def test_semi_tensor_formats_are_smaller():
    shape = (16, 16, 16, 16)
    tt, stt = stpnet.TTTensor.random(shape, 8), stpnet.TTTensor.random(shape, 8, t=2)
    assert stt.compression_ratio > 3 * tt.compression_ratio
    assert tt.format == "tt" and stt.format == "stt"
    tr, sr = stpnet.TRTensor.random(shape, 8), stpnet.TRTensor.random(shape, 8, t=2)
    assert sr.num_params < tr.num_params and sr.format == "str"
    assert stpnet.TuckerTensor.random(shape, 8, 2).format == "sttu"


# -------------------------------------------------------------------- identities


@pytest.mark.parametrize("cls", [stpnet.TTTensor, stpnet.TRTensor])
@pytest.mark.parametrize("t", [1, 2, 4])
def test_semi_tensor_equals_classic_on_retensorized_shape(cls, t):
    shape = (3, 4, 5, 8)
    X = cls.random(shape, 4, t, dtype=D, generator=torch.Generator().manual_seed(t))
    classic = X.to_classic()
    assert classic.t == 1 and classic.shape == (3 * t, 4, 5, 8 // t)
    assert classic.rank == tuple(r // t for r in X.rank)
    dense = X.to_tensor()
    assert torch.allclose(classic.to_tensor(), copy_index_to_first_mode(dense, t), atol=1e-13)
    assert torch.allclose(copy_index_to_last_mode(copy_index_to_first_mode(dense, t), t), dense)
    back = cls.from_classic(classic, t)
    assert back.shape == shape and back.rank == X.rank and back.num_params == X.num_params
    for a, b in zip(back.factors, X.factors):
        assert torch.equal(a, b.detach())


def test_copy_index_entries():
    X = randn(2, 3, 6)
    Xp = copy_index_to_first_mode(X, 3)
    for i1, u, i2, j in itertools.product(range(2), range(3), range(3), range(2)):
        assert Xp[i1 * 3 + u, i2, j] == X[i1, i2, j * 3 + u]


# ------------------------------------------------------------------ module behaviour


@pytest.mark.parametrize("make", [
    lambda: stpnet.TTTensor.random((4, 6, 8), 4, 2, dtype=D),
    lambda: stpnet.TRTensor.random((4, 6, 8), 4, 2, dtype=D),
    lambda: stpnet.TuckerTensor.random((4, 6, 8), 4, 2, dtype=D),
])
def test_modules_hold_parameters_and_differentiate(make):
    X = make()
    params = list(X.parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) for p in params)
    assert X.num_params == sum(p.numel() for p in params)
    assert X.compression_ratio == pytest.approx(math.prod(X.shape) / X.num_params)
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(
        X, dict(zip([n for n, _ in X.named_parameters()], ps)), ()).sum(), tuple(params))
    clone = make()
    clone.load_state_dict(X.state_dict())
    assert torch.equal(clone.to_tensor(), X.to_tensor())
    assert X.float().to_tensor().dtype == torch.float32
    assert repr(X).startswith(type(X).__name__)


@pytest.mark.parametrize("cls,t", [(stpnet.TTTensor, 1), (stpnet.TTTensor, 2), (stpnet.TRTensor, 1), (stpnet.TRTensor, 2),
                                   (stpnet.TuckerTensor, 2)])
def test_random_has_requested_std(cls, t):
    X = cls.random((16, 16, 16, 16), 8, t, std=0.5, generator=torch.Generator().manual_seed(0))
    std = float(X.to_tensor().detach().pow(2).mean().sqrt())
    assert 0.4 < std < 0.6


def test_construction_from_factors_with_matrix_boundaries():
    G1, G2, G3 = randn(4, 6), randn(3, 5, 2, seed=1), randn(2, 4, seed=2)
    X = stpnet.TTTensor([G1, G2, G3], t=2)
    assert X.shape == (4, 5, 8) and X.rank == (6, 4)
    assert [tuple(G.shape) for G in X.factors] == [(1, 4, 6), (3, 5, 2), (2, 4, 1)]


@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=5), t=st.sampled_from([1, 2, 3]),
       r=st.integers(1, 4), family=st.sampled_from(["tt", "tr", "tucker"]))
def test_reconstruction_macs_equal_counted_multiply_adds(shape, t, r, family):
    """The cost the layers' path choice uses is what ``to_tensor`` really spends (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape[-1] *= t
    cls = {"tt": stpnet.TTTensor, "tr": stpnet.TRTensor, "tucker": stpnet.TuckerTensor}[family]
    if family == "tucker":
        shape = [s * t for s in shape]
    X = cls.random(shape, cls.validate_rank(shape, t * r, t), t)
    with FlopCounterMode(display=False) as counter:
        X.to_tensor()
    assert X.reconstruction_macs() == counter.get_total_flops() // 2 > 0


def test_the_abstract_base_is_enforced():
    from stpnet.formats import FactorizedTensor

    with pytest.raises(TypeError):
        FactorizedTensor()

    class Incomplete(FactorizedTensor):
        family, semi_name = "x", "sx"

        def to_tensor(self):
            return torch.zeros(1)

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
