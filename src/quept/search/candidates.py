"""Candidate plans built from measured in-context costs around uniform widths (DESIGN 2.6).

The sensitivity table measures each layer alone in the float model; these plans start instead
from a uniform elastic model at one width and move whole units to the neighbouring widths at
the cost each move was measured to have inside that model (:mod:`quept.search.exact`): the
sweeps to measure at a budget (:func:`in_context_sweeps`), the plans from one or several such
sweeps (:func:`plan_from_swaps`, :func:`plan_from_moves`, :func:`swap_means`) and the local
refinement around a plan (:func:`neighbour_moves`, :func:`plan_from_neighbours`). Every
choice is exact within the budget (a multiple-choice knapsack,
:func:`quept.search.allocate.allocate`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from quept.checks import ConfigError
from quept.search.allocate import InfeasibleBudgetError, allocate
from quept.search.budget import (
    Constraints,
    budget_capacity,
    layer_bits,
    layer_options,
    uniform_widths,
)
from quept.search.constraints import allowed_widths, constraint_texts
from quept.search.plan import Plan, table_objective, unit_of
from quept.search.table import SensitivityTable


def in_context_sweeps(table: SensitivityTable, *, avg_bits: float | None = None,
                      max_bytes: int | None = None, constraints: Constraints = None,
                      both_ways: bool = True) -> list[tuple[int, int]]:
    """The in-context sweeps ``(base, alt)`` the auto granularity uses at one budget, in the
    order it measures them: from the uniform width below the budget up and from the one above
    down, then (``both_ways``) from the one above to the next width (the next the constraints
    leave a uniform model, :func:`quept.search.budget.uniform_widths`); none when the widest
    uniform width fits."""
    lo, hi = bracketing_widths(table, avg_bits=avg_bits, max_bytes=max_bytes,
                               constraints=constraints)
    if hi is None:
        return []
    above = min((b for b in uniform_widths(table, constraints) if b > hi), default=None)
    return [(lo, hi), (hi, lo)] + ([(hi, above)] if both_ways and above is not None else [])


def bracketing_widths(table: SensitivityTable, *, avg_bits: float | None = None,
                      max_bytes: int | None = None, constraints: Constraints = None
                      ) -> tuple[int, int | None]:
    """(lo, hi): the widest uniform width whose model fits the budget and the next wider one
    (None when the widest width fits); under ``constraints`` a uniform width is what the
    constrained layers make of it, and only the widths some layer keeps there count
    (:func:`quept.search.budget.uniform_widths`: under ``*<=2`` uniform W8 is uniform W2,
    so W2 is the widest)."""
    sizes = layer_options(table, constraints)[1]
    capacity, _ = budget_capacity(table, sizes, avg_bits, max_bytes, constraints)
    kept = uniform_widths(table, constraints)
    total = {b: sum(row[j] for row in sizes) for j, b in enumerate(table.bits) if b in kept}
    lo = max((b for b, size in total.items() if size <= capacity), default=None)
    if lo is None:  # only mixed plans fit (the narrowest width is missing from the table)
        raise InfeasibleBudgetError("no uniform width fits this budget")
    return lo, min((b for b in total if b > lo), default=None)


def plan_from_swaps(
    table: SensitivityTable, base: int, alt: int, deltas: Mapping[str, float], kl_base: float,
    *, avg_bits: float | None = None, max_bytes: int | None = None, granularity: str = "block",
    search: str | None = None, constraints: Constraints = None,
) -> Plan:
    """The plan that starts from uniform ``base`` bits and moves the units whose in-context cost
    ``deltas[unit]`` (:func:`quept.search.exact.unit_swap_kl`) is best to ``alt`` bits: the
    set minimising the summed deltas within the budget (exact, by the same knapsack). With
    ``alt`` above ``base`` it spends the budget left over by the base; below, it frees what the
    base is over it. Every linear belongs to a unit of ``deltas``. ``search`` names how the
    deltas were made (default "from W<base>")."""
    return plan_from_moves(table, base, {alt: deltas}, kl_base, avg_bits=avg_bits,
                           max_bytes=max_bytes, granularity=granularity, search=search,
                           constraints=constraints)


def plan_from_moves(
    table: SensitivityTable, base: int, moves: Mapping[int, Mapping[str, float]],
    kl_base: float, *, avg_bits: float | None = None, max_bytes: int | None = None,
    granularity: str = "block", search: str | None = None, constraints: Constraints = None,
) -> Plan:
    """:func:`plan_from_swaps` with several widths to move to: each unit stays at ``base`` or
    goes to one width ``w`` of ``moves`` at the in-context cost ``moves[w][unit]`` (every sweep
    made in the uniform ``base`` model), the choice per unit minimising the summed costs within
    the budget, exactly (a multiple-choice knapsack). With a width below and one above
    ``base``, a plan can buy a sensitive block's way up with other blocks' way down.

    Under ``constraints`` each linear takes the width its constraints leave nearest its
    unit's (:func:`quept.search.constraints.clamp`); a move that changes none of a unit's
    linears costs nothing, any other costs what was measured without the constraints (an
    estimate, which :func:`quept.api.plan` checks by measuring the plan)."""
    if not moves or base in moves:
        raise ConfigError(f"plan_from_moves needs at least one width other than W{base} to "
                          f"move to, got {sorted(moves)}")
    widths = [base, *moves]
    for b in widths:
        if b not in table.bits:
            raise ConfigError(f"width {b} is not in the table's widths {table.bits}")
    first = next(iter(moves.values()))
    for w, deltas in moves.items():
        if set(deltas) != set(first):
            raise ConfigError(f"the in-context costs of W{w} name other units than those of "
                              f"W{next(iter(moves))}: {sorted(set(deltas) ^ set(first))[:3]}")
    names = list(table.shapes)
    n = sum(s.numel for s in table.shapes.values())
    cols = [table.bits.index(b) for b in widths]
    ids = {u: k for k, u in enumerate(first)}
    sizes = [[0] * len(widths) for _ in ids]
    moved: dict[str, set[int]] = {u: set() for u in ids}  # widths that change a unit's linears
    unit = []
    widths_at, layer_sizes = layer_options(table, constraints)
    for name, row in zip(names, layer_sizes):
        u = unit_of(name, granularity)
        if u not in ids:
            raise ConfigError(f"layer {name} is in no unit of the in-context costs")
        unit.append(ids[u])
        for j, c in enumerate(cols):
            sizes[ids[u]][j] += row[c]
            if widths_at[name][c] != widths_at[name][cols[0]]:
                moved[u].add(widths[j])
    capacity, budget = budget_capacity(table, sizes, avg_bits, max_bytes, constraints)
    costs = [[0.0, *(float(moves[w][u]) if w in moved[u] else 0.0 for w in moves)]
             for u in ids]
    alloc = allocate(costs, sizes, capacity)
    chosen = {name: widths_at[name][cols[alloc.choice[u]]] for name, u in zip(names, unit)}
    return Plan(chosen, alloc.size / n, alloc.size / 8, n, budget, kl_base + alloc.cost,
                alloc.exact, granularity, search=search or f"from W{base}",
                constraints=constraint_texts(constraints), objective=table_objective(table))


def swap_means(up: Mapping[str, float], down: Mapping[str, float]) -> dict[str, float]:
    """One cost per unit for moving from the lower width to the upper one, measured in both
    contexts: ``up[unit]`` is the KL change of moving the unit up inside the uniform lower model,
    ``down[unit]`` that of moving it down inside the uniform upper model (so its gain going up
    is ``-down[unit]``). Their mean is less tied to either end of the interval, which matters
    for budgets near its middle. Both must name the same units."""
    if set(up) != set(down):
        raise ConfigError(f"the two in-context sweeps name different units: "
                          f"{sorted(set(up) ^ set(down))[:3]}")
    return {u: (up[u] - down[u]) / 2 for u in up}


def neighbour_moves(table: SensitivityTable, widths: Mapping[str, int], *,
                    granularity: str = "block", constraints: Constraints = None
                    ) -> dict[tuple[str, int], dict[str, int]]:
    """The one-step moves around the plan ``widths``: ``{(unit, step): {layer: width}}`` with
    ``step`` -1 (every linear of the unit to the next width below its own that its constraints
    allow) and +1 (the next above); a linear with no such width stays and is left out of the
    move, and a move that changes no linear is not made. What :func:`plan_from_neighbours`
    chooses among, once :func:`quept.search.exact.move_kl` has measured them in the plan."""
    allowed = allowed_widths(table.shapes, table.bits, constraints)
    missing = [n for n in table.shapes if n not in widths]
    if missing:
        raise ConfigError(f"the plan leaves out layers of the table, e.g. {missing[:3]}")
    moves: dict[tuple[str, int], dict[str, int]] = {}
    for name in table.shapes:
        w = widths[name]
        for step in (-1, 1):
            to = [b for b in allowed[name] if (b - w) * step > 0]
            if to:
                moves.setdefault((unit_of(name, granularity), step), {})[name] = (
                    max(to) if step < 0 else min(to))
    return moves


def plan_from_neighbours(
    table: SensitivityTable, widths: Mapping[str, int],
    moves: Mapping[tuple[str, int], Mapping[str, int]], deltas: Mapping[tuple[str, int], float],
    kl_base: float, *, avg_bits: float | None = None, max_bytes: int | None = None,
    granularity: str = "block", search: str = "refined", constraints: Constraints = None,
    penalty: float = 0.0,
) -> Plan:
    """The plan that keeps each unit of the plan ``widths`` or makes one of its moves
    (:func:`neighbour_moves`) at the cost ``deltas[move]`` measured in that plan
    (:func:`quept.search.exact.move_kl`): the choice per unit minimising the summed costs within
    the budget, exactly (a multiple-choice knapsack). Keeping every unit is always an option,
    so the plan is never predicted worse than ``widths`` when that fits the budget.

    ``penalty`` (>= 0) is added to the cost of every move, which makes fewer, surer moves: the
    measured costs are each of a move alone, and many moves together can interact. The plan's
    ``predicted_kl`` leaves it out."""
    if not (penalty >= 0 and math.isfinite(penalty)):
        raise ConfigError(f"penalty must be finite and >= 0, got {penalty}")
    names = list(table.shapes)
    n = sum(s.numel for s in table.shapes.values())
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(unit_of(name, granularity), []).append(name)
    unknown = [m for m in moves if m[0] not in units or m not in deltas]
    if unknown:
        raise ConfigError(f"moves {unknown[:3]} are of no unit of the table or were not "
                          "measured")

    def size(ws: Mapping[str, int]) -> int:
        return sum(layer_bits(table.shapes[m], b, table.group_size[b]) for m, b in ws.items())

    options = {u: [({}, 0.0)] + [(dict(moves[u, s]), float(deltas[u, s]) + penalty)
                                 for s in (-1, 1) if (u, s) in moves] for u in units}
    width = max(len(o) for o in options.values())
    costs, sizes = [], []
    for u, names_u in units.items():
        here = {m: widths[m] for m in names_u}
        options[u] += [options[u][0]] * (width - len(options[u]))  # padded with "keep"
        costs.append([c for _, c in options[u]])
        sizes.append([size({**here, **move}) for move, _ in options[u]])
    capacity, budget = budget_capacity(table, sizes, avg_bits, max_bytes, constraints)
    alloc = allocate(costs, sizes, capacity)
    chosen = dict(widths)
    for u, k in zip(units, alloc.choice):
        chosen.update(options[u][k][0])
    chosen = {m: chosen[m] for m in names}
    n_moves = sum(1 for u, k in zip(units, alloc.choice) if options[u][k][0])
    return Plan(chosen, alloc.size / n, alloc.size / 8, n, budget,
                kl_base + alloc.cost - penalty * n_moves,
                alloc.exact, granularity, search=search,
                constraints=constraint_texts(constraints), objective=table_objective(table))
