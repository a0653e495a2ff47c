"""Exact budgeted width allocation: a multiple-choice knapsack solved by dynamic programming.

Every layer ``i`` picks one option ``j`` (a width) with cost ``cost[i][j]`` (e.g. the KL
sensitivity) and size ``size[i][j]`` (stored bits: codes + scales + zero-points, integers). We
minimise the summed cost subject to ``sum size <= capacity``.

Exactness: sizes are shifted by each layer's smallest option (every layer pays that anyway) and
divided by the greatest common divisor of all shifted sizes, so the DP runs over a small integer
axis without rounding. For group-quantized LLMs the shifted sizes share a large factor
(``n_groups * (group_size + 1)`` per extra bit), which keeps the axis short: SmolLM2-135M has
5,760 units at most, a LLaMA-7B 37,056. Only if the axis would exceed ``max_units`` are sizes
rounded *up* to a coarser unit; the plan then stays feasible and the result carries the
certified gap to a Lagrangian lower bound instead of claiming optimality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quept.checks import ConfigError

MAX_UNITS = 2_000_000


class InfeasibleBudgetError(ConfigError):
    """The budget is below the smallest plan, or the problem has no option at all: bad input,
    so a :class:`quept.ConfigError` (and a ``ValueError``)."""


@dataclass(frozen=True)
class Allocation:
    """Chosen option per layer, its summed cost and size, and how sure we are of optimality.

    choice: index of the chosen option per layer. lower_bound: a proven lower bound of the
    optimal cost (equal to ``cost`` when ``exact``).
    """

    choice: tuple[int, ...]
    cost: float
    size: int
    exact: bool
    lower_bound: float

    @property
    def gap(self) -> float:
        """Certified distance to the optimum (0 when exact)."""
        return self.cost - self.lower_bound


def _as_arrays(
    cost: Sequence[Sequence[float]], size: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(cost, dtype=np.float64)
    s = np.asarray(size, dtype=np.int64)
    if c.ndim != 2 or c.shape != s.shape or c.shape[1] == 0:
        raise ValueError(f"cost {c.shape} and size {s.shape} must be equal (layers, options)")
    if not np.isfinite(c).all():
        raise ValueError("costs must be finite")
    if (s < 0).any():
        raise ValueError("sizes must be non-negative")
    return c, s


def size_range(size: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(smallest, largest) total size any choice can have."""
    s = np.asarray(size, dtype=np.int64)
    return int(s.min(axis=1).sum()), int(s.max(axis=1).sum())


def lagrangian_bound(cost: np.ndarray, size: np.ndarray, capacity: int, iters: int = 100) -> float:
    """A proven lower bound of the optimal cost (weak duality): the best value found of the
    concave dual ``sum_i min_j (c_ij + lam * s_ij) - lam * capacity`` over ``lam >= 0``,
    searched by bisection on its subgradient ``sum_i s_i(lam) - capacity``."""

    def dual(lam: float) -> tuple[float, int]:
        v = cost + lam * size
        j = v.argmin(axis=1)
        used = int(size[np.arange(len(j)), j].sum())
        return float(v.min(axis=1).sum() - lam * capacity), used

    steps = np.diff(np.unique(size))
    lo, hi = 0.0, float(cost.max() - cost.min()) / float(steps.min() if steps.size else 1) + 1.0
    best = dual(0.0)[0]
    for _ in range(iters):
        mid = (lo + hi) / 2
        value, used = dual(mid)
        best = max(best, value)
        lo, hi = (mid, hi) if used > capacity else (lo, mid)
    return best


def allocate(
    cost: Sequence[Sequence[float]], size: Sequence[Sequence[int]], capacity: int,
    max_units: int = MAX_UNITS,
) -> Allocation:
    """Minimise ``sum_i cost[i][choice_i]`` subject to ``sum_i size[i][choice_i] <= capacity``.

    cost, size: (layers, options). Raises :class:`InfeasibleBudgetError` when even the
    smallest choice exceeds ``capacity``.
    """
    c, s = _as_arrays(cost, size)
    lo, hi = size_range(s)
    if capacity < lo:
        raise InfeasibleBudgetError(f"capacity {capacity} is below the smallest size {lo}")
    base = s.min(axis=1, keepdims=True)
    extra = s - base
    room = min(int(capacity) - lo, hi - lo)
    unit = math.gcd(*extra.ravel().tolist()) or 1
    exact = True
    if room // unit > max_units:
        unit = -(-room // max_units)  # coarser unit, sizes rounded up: still feasible
        exact = False
    units = -(-extra // unit)
    n = room // unit
    choice_idx = _dp(c, units, n)
    chosen = tuple(int(j) for j in choice_idx)
    total_cost = float(c[np.arange(len(chosen)), chosen].sum())
    total_size = int(s[np.arange(len(chosen)), chosen].sum())
    bound = total_cost if exact else min(total_cost, lagrangian_bound(c, s, capacity))
    return Allocation(chosen, total_cost, total_size, exact, bound)


def _dp(cost: np.ndarray, units: np.ndarray, n: int) -> np.ndarray:
    """best[c] = least cost of the layers so far with at most c units; keeps the argmin per
    layer and capacity (int8) for the backtrack. O(layers * options * n) vector work."""
    layers, options = cost.shape
    best = np.zeros(n + 1)
    pick = np.zeros((layers, n + 1), dtype=np.int8)
    for i in range(layers):
        new = np.full(n + 1, np.inf)
        for j in range(options):
            u = int(units[i, j])
            if u > n:
                continue
            cand = best[: n + 1 - u] + cost[i, j]
            better = cand < new[u:]
            new[u:][better] = cand[better]
            pick[i, u:][better] = j
        best = new
    out = np.empty(layers, dtype=np.int64)
    c = n
    for i in range(layers - 1, -1, -1):
        out[i] = pick[i, c]
        c -= int(units[i, out[i]])
    return out
