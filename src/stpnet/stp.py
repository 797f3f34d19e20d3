"""Semi-tensor product (STP) primitives in torch.

The left STP of ``A`` (m x n) and ``B`` (p x q), with ``l = lcm(n, p)``, is

    A ⋉ B = (A ⊗ I_{l/n}) (B ⊗ I_{l/p})

and the right STP is ``A ⋊ B = (I_{l/n} ⊗ A) (I_{l/p} ⊗ B)``. Nothing here builds those
Kronecker products: every case is a reshape, at most one gather, and one matrix product, so a
link with factor ``t`` costs ``t`` times fewer multiplications than the expanded product.

All functions accept leading batch dimensions (broadcast like :func:`torch.matmul`), support
autograd, keep dtype and device, and return NumPy arrays when given NumPy arrays. The format
specification (``docs/formats-spec.md``, sections 2 and 3) states the definitions and the
properties the tests check.

References
----------
.. [1] D. Cheng, H. Qi, Y. Zhao, "An Introduction to Semi-Tensor Product of Matrices and Its
   Applications", World Scientific, 2012.
.. [2] Z. Zhao, Y. Liu, Z. Huang, C. Zhu, "Semi-tensor Product-based Tensor Decomposition for
   Neural Network Compression", arXiv:2109.15200, 2021.
"""

from __future__ import annotations

import math

import torch

from ._arrays import ArrayLike, returns_like
from ._validate import divisors

__all__ = ["stp", "rstp", "mode_product", "swap_matrix"]


def _check_matrices(A: torch.Tensor, B: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("A", A), ("B", B)):
        if x.ndim < 2:
            raise ValueError(
                f"{op}: {name} must have at least 2 dimensions (..., rows, cols), got shape "
                f"{tuple(x.shape)}; reshape a vector to a column with x.reshape(-1, 1)"
            )
        if x.numel() == 0:
            raise ValueError(f"{op}: {name} is empty (shape {tuple(x.shape)})")
    if A.dtype != B.dtype:
        dtype = torch.result_type(A, B)
        A, B = A.to(dtype), B.to(dtype)
    return A, B


def _left_stp(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    A, B = _check_matrices(A, B, "stp")
    m, n = A.shape[-2:]
    p, q = B.shape[-2:]
    if n == p:
        return A @ B
    if n % p == 0:
        # A ⋉ B = A (B ⊗ I_t):  out[i, c*t+u] = sum_b A[i, b*t+u] B[b, c]
        t = n // p
        At = A.reshape(*A.shape[:-1], p, t).transpose(-1, -2).reshape(*A.shape[:-2], m * t, p)
        out = (At @ B).reshape(*torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]), m, t, q)
        return out.transpose(-1, -2).reshape(*out.shape[:-3], m, q * t)
    if p % n == 0:
        # A ⋉ B = (A ⊗ I_t) B:  out[i*t+u, c] = sum_a A[i, a] B[a*t+u, c]
        t = p // n
        out = A @ B.reshape(*B.shape[:-2], n, t * q)
        return out.reshape(*out.shape[:-2], m * t, q)
    return _general_stp(A, B, right=False)


def _general_stp(A: torch.Tensor, B: torch.Tensor, right: bool) -> torch.Tensor:
    """The lcm case, where neither inner size divides the other.

    With ``g = gcd(n, p)``, ``a = l/n`` and ``b = l/p`` (coprime), the shared index ``s`` of
    length ``l = g*a*b`` splits into ``(h, r)`` with ``h < g`` and ``r < a*b``. For each ``r`` the
    contribution is one (m x g) @ (g x q) product, so this gathers ``A`` and ``B`` into ``a*b``
    such blocks, multiplies them in one batched product and places the blocks in the output.
    """
    m, n = A.shape[-2:]
    p, q = B.shape[-2:]
    g = math.gcd(n, p)
    a, b = p // g, n // g  # l/n and l/p
    r = torch.arange(a * b, device=A.device)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    if not right:
        # s = h*ab + r: A index = h*b + r//a, B index = h*a + r//b, output (r%a, r%b).
        A3 = A.reshape(*A.shape[:-2], m, g, b)[..., r // a]  # (..., m, g, ab)
        B3 = B.reshape(*B.shape[:-2], g, a, q)[..., r // b, :]  # (..., g, ab, q)
        P = A3.permute(*range(A3.ndim - 3), -1, -3, -2) @ B3.movedim(-2, -3)  # (..., ab, m, q)
        inverse = torch.empty_like(r)
        inverse[(r % a) * b + r % b] = r
        out = P[..., inverse, :, :].reshape(*batch, a, b, m, q)
        out = out.permute(*range(len(batch)), -2, -4, -1, -3)  # (..., m, a, q, b)
        return out.reshape(*batch, m * a, q * b)
    # s = r*g + h: A index = (r%b)*g + h, B index = (r%a)*g + h, output (r//b, r//a).
    A3 = A.reshape(*A.shape[:-2], m, b, g)[..., r % b, :]  # (..., m, ab, g)
    B3 = B.reshape(*B.shape[:-2], a, g, q)[..., r % a, :, :]  # (..., ab, g, q)
    P = A3.movedim(-2, -3) @ B3  # (..., ab, m, q)
    out = P.new_zeros(*batch, a * b, m, q).index_add(-3, (r // b) * b + r // a, P.expand(*batch, a * b, m, q))
    out = out.reshape(*batch, a, b, m, q).permute(*range(len(batch)), -4, -2, -3, -1)
    return out.reshape(*batch, a * m, b * q)


def _right_stp(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    A, B = _check_matrices(A, B, "rstp")
    m, n = A.shape[-2:]
    p, q = B.shape[-2:]
    if n == p:
        return A @ B
    if n % p == 0:
        # (I_t ⊗ B) is block diagonal: out[i, w*q+c] = sum_k A[i, w*p+k] B[k, c]
        t = n // p
        out = A.reshape(*A.shape[:-2], m * t, p) @ B
        return out.reshape(*out.shape[:-2], m, t * q)
    if p % n == 0:
        # (I_t ⊗ A) B: out[x*m+i, c] = sum_j A[i, j] B[x*n+j, c]
        t = p // n
        out = A.unsqueeze(-3) @ B.reshape(*B.shape[:-2], t, n, q)
        return out.reshape(*out.shape[:-3], t * m, q)
    return _general_stp(A, B, right=True)


def stp(A: ArrayLike, B: ArrayLike) -> ArrayLike:
    """Left semi-tensor product ``A ⋉ B = (A ⊗ I_{l/n}) (B ⊗ I_{l/p})``, ``l = lcm(n, p)``.

    Parameters
    ----------
    A : torch.Tensor or numpy.ndarray, shape (..., m, n)
    B : torch.Tensor or numpy.ndarray, shape (..., p, q)
        Leading dimensions broadcast as in :func:`torch.matmul`.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape (..., m*l/n, q*l/p)
        NumPy if either input was NumPy.

    Notes
    -----
    When ``n = t*p`` the result is ``A (B ⊗ I_t)``, computed as
    ``out[i, c*t+u] = sum_b A[i, b*t+u] B[b, c]``; when ``p = t*n`` it is ``(A ⊗ I_t) B``,
    ``out[i*t+u, c] = sum_a A[i, a] B[a*t+u, c]``. Neither builds a Kronecker product. With
    ``n = p`` this is the matrix product.

    Examples
    --------
    >>> import torch, stpnet
    >>> A, B = torch.randn(3, 8), torch.randn(4, 5)
    >>> stpnet.stp(A, B).shape
    torch.Size([3, 10])
    """
    return returns_like(_left_stp, A, B)


def rstp(A: ArrayLike, B: ArrayLike) -> ArrayLike:
    """Right semi-tensor product ``A ⋊ B = (I_{l/n} ⊗ A) (I_{l/p} ⊗ B)``, ``l = lcm(n, p)``.

    Parameters
    ----------
    A : torch.Tensor or numpy.ndarray, shape (..., m, n)
    B : torch.Tensor or numpy.ndarray, shape (..., p, q)

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape (..., m*l/n, q*l/p)

    See Also
    --------
    stp : the left semi-tensor product.
    """
    return returns_like(_right_stp, A, B)


def swap_matrix(m: int, n: int, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The swap (commutation) matrix ``W[m,n]`` with ``W (x ⊗ y) = y ⊗ x``.

    Parameters
    ----------
    m, n : int
        Lengths of ``x`` and ``y``; both at least 1.
    dtype, device : optional
        Of the returned matrix (default dtype: torch's default float).

    Returns
    -------
    torch.Tensor, shape (m*n, m*n)
        A permutation matrix: ``W[j*m + i, i*n + j] = 1``. It also satisfies
        ``W[m,n] ⋉ x ⋉ y = y ⋉ x`` for column vectors ``x`` (m) and ``y`` (n).
    """
    for name, v in (("m", m), ("n", n)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"swap_matrix: {name} must be a positive int, got {v!r}")
    i = torch.arange(m, device=device).repeat_interleave(n)
    j = torch.arange(n, device=device).repeat(m)
    W = torch.zeros(m * n, m * n, dtype=dtype, device=device)
    W[j * m + i, i * n + j] = 1
    return W


def _mode_product(X: torch.Tensor, U: torch.Tensor, mode: int) -> torch.Tensor:
    if X.ndim == 0 or X.numel() == 0:
        raise ValueError(f"mode_product: X must be a non-empty tensor, got shape {tuple(X.shape)}")
    if U.ndim != 2:
        raise ValueError(f"mode_product: U must be a matrix (J x P), got shape {tuple(U.shape)}")
    if not -X.ndim <= mode < X.ndim:
        raise ValueError(
            f"mode_product: mode {mode} is out of range for a tensor of order {X.ndim}; "
            f"valid modes are {-X.ndim}..{X.ndim - 1}"
        )
    mode %= X.ndim
    size = X.shape[mode]
    J, P = U.shape
    if P == 0 or size % P:
        raise ValueError(
            f"mode_product: mode {mode} has size {size}, which is not a multiple of U's {P} "
            f"columns, so no t satisfies size = t * columns; U may have one of {divisors(size)} columns"
        )
    if U.dtype != X.dtype:
        dtype = torch.result_type(X, U)
        X, U = X.to(dtype), U.to(dtype)
    t = size // P
    Xm = X.movedim(mode, 0)
    rest = Xm.shape[1:]
    # Y[j*t+u, rest] = sum_p U[j, p] X[p*t+u, rest]
    Y = U @ Xm.reshape(P, -1)
    return Y.reshape(J * t, *rest).movedim(0, mode)


def mode_product(X: ArrayLike, U: ArrayLike, mode: int) -> ArrayLike:
    """Semi-tensor mode product ``X ⋉_mode U = fold(U ⋉ X_(mode))``.

    With ``X.shape[mode] = t * U.shape[1]``:
    ``Y[..., j*t+u, ...] = sum_p U[j, p] X[..., p*t+u, ...]``; the mode becomes ``U.shape[0] * t``.
    ``t`` is inferred from the sizes; with ``t = 1`` this is the ordinary mode product.

    Parameters
    ----------
    X : torch.Tensor or numpy.ndarray
        Tensor of any order >= 1.
    U : torch.Tensor or numpy.ndarray, shape (J, P)
        ``P`` must divide ``X.shape[mode]``.
    mode : int
        Zero-based mode (negative values count from the end).

    Returns
    -------
    torch.Tensor or numpy.ndarray

    Raises
    ------
    ValueError
        If ``P`` does not divide the mode size (the message lists the valid ``P``).
    """
    return returns_like(_mode_product, X, U, mode=mode)
