"""Orthonormal Hadamard matrices for rotating activations before they are quantized.

A rotation ``x -> x R`` (R orthogonal) spreads a few outlier channels over all channels, so a
per-token activation quantizer wastes less of its range; the layer that reads ``x`` takes
``W R`` instead of ``W`` and computes the same product (QuaRot-style, DESIGN 2.5). Hadamard
matrices do it with entries of equal magnitude. ``hadamard(n)`` builds one of order ``n`` as a
Kronecker product of a Paley matrix (order q + 1, q a prime = 3 mod 4) and a Sylvester matrix
(order a power of two), which covers the widths of common models (576 = 72 x 8, 1536 =
12 x 128, 4096, 11008 = 172 x 64, ...); ``random_hadamard`` flips the sign of each row by a
seeded draw, so rotations of different seeds differ.
"""

from __future__ import annotations

import functools

import torch


class HadamardSizeError(ValueError):
    """No Hadamard matrix of this order can be built here."""


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if d in residues else -1 for d in range(1, q)],
                       dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_paley_order(p: int) -> bool:
    return p % 4 == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3


def _factor(n: int) -> tuple[int, int]:
    """``n = p * m``: p a Paley order (or 1), m a power of two; raises when there is none."""
    if n < 1:
        raise HadamardSizeError(f"a Hadamard matrix needs order >= 1, got {n}")
    m = n & -n  # the largest power of two dividing n
    p = n // m
    if p == 1:
        return 1, n
    while not _is_paley_order(p):
        if m == 1:
            raise HadamardSizeError(
                f"no Hadamard matrix of order {n} here: it must be a power of two times q + 1 "
                "for a prime q = 3 mod 4 (e.g. 12, 20, 24, 44, 48, 60, 72, 80, 84, 104, 108, "
                "128, 132, 140, ...)")
        p, m = p * 2, m // 2
    return p, m


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    p, m = _factor(n)
    return _sylvester(m) if p == 1 else torch.kron(_paley(p - 1), _sylvester(m))


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order ``n`` (entries +-1/sqrt(n)), float64."""
    return _hadamard(n) / n**0.5


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """``diag(s) H``: an orthonormal Hadamard matrix with rows sign-flipped by a seeded draw."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n)


@functools.lru_cache(maxsize=16)
def _paley_factor(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return None if p == 1 else _paley(p - 1).to(dtype=dtype, device=device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard(n)`` over the last dimension (n = x.shape[-1]) without building the
    n x n matrix: the power-of-two factor as a fast Walsh-Hadamard transform (log2 steps of
    butterflies), the Paley factor as a small matmul. Differentiable."""
    n = x.shape[-1]
    p, m = _factor(n)
    shape = x.shape
    y = x.reshape(-1, p, m)
    h = 1
    while h < m:  # butterflies on the power-of-two factor
        y = y.reshape(-1, p, m // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    y = y.reshape(-1, p, m)
    paley = _paley_factor(p, x.dtype, x.device)
    if paley is not None:
        y = torch.einsum("ac,tab->tcb", paley, y)  # A^T X over the Paley index
    return (y / n**0.5).reshape(shape)
