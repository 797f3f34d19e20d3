"""Channel counts factored into tensor modes."""

from __future__ import annotations

from .._validate import divisors

__all__ = ["factorize", "channel_modes"]


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize(n: int, n_modes: int = 3) -> tuple[int, ...]:
    """Split ``n`` into at most ``n_modes`` factors, as balanced as possible, largest first.

    Primes are assigned largest first to the currently smallest factor. A prime (or 1) stays a
    single mode, so 3 -> (3,), 16 -> (4, 2, 2), 64 -> (4, 4, 4), 256 -> (8, 8, 4).
    """
    if n < 1:
        raise ValueError(f"cannot factorize {n}: channel counts must be >= 1")
    primes = sorted(_prime_factors(n), reverse=True)
    bins = [1] * min(n_modes, max(len(primes), 1))
    for p in primes:
        i = min(range(len(bins)), key=lambda j: bins[j])
        bins[i] *= p
    return tuple(sorted(bins, reverse=True))


def channel_modes(n: int, n_modes: int = 3, t: int = 1, last_divisible: bool = False) -> tuple[int, ...]:
    """:func:`factorize`, with a mode divisible by ``t`` moved last when ``last_divisible``.

    Raises
    ------
    ValueError
        If ``last_divisible`` and no factorization has a mode divisible by ``t`` (``t`` must then
        divide ``n`` itself).
    """
    modes = list(factorize(n, n_modes))
    if last_divisible and t > 1:
        if n % t:
            raise ValueError(
                f"t={t} must divide the output channel count {n} (the copy index of a semi-tensor "
                f"format is emitted in the last output mode); valid t: "
                f"{divisors(n)}"
            )
        ok = [i for i, m in enumerate(modes) if m % t == 0]
        if ok:
            i = min(ok, key=lambda j: (modes[j], -j))  # the smallest such mode goes last
            modes.append(modes.pop(i))
        else:  # balance n/t over the other modes and make t itself the last mode
            modes = [m for m in factorize(n // t, max(n_modes - 1, 1)) if m > 1] + [t]
    return tuple(modes)
