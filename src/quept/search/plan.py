"""A mixed-precision plan ({layer: width} plus its realised budget), honest budgets, and the
allocation that turns a sensitivity table and a budget into a plan (DESIGN 2.6).

Budgets count only the quantized linears, weighted by their size: codes plus an fp16 scale and
a b-bit zero-point per group (:func:`quept.ops.stored_bits_per_weight`). Norms, embeddings and
the head never absorb budget.

Granularity: the allocation can give every linear its own width ("layer"), or one width to all
linears under the same child of a block ("sublayer": attention or MLP of a decoder block) or
to a whole block ("block"). The costs are measured one layer at a time, but calibration trains
each block at one width at a time, so coarser units keep more of the compensation the uniform
widths have; which granularity wins at a budget is measured (:func:`quept.api.plan`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Any

from quept.config import ConfigError
from quept.data.fetch import atomic_write_text
from quept.ops import stored_bits_per_weight
from quept.search.allocate import InfeasibleBudgetError, allocate, size_range
from quept.search.constraints import Constraint, allowed_widths, clamp, constraint_texts
from quept.search.objective import BY_NAME, NextTokenKL
from quept.search.table import LayerShape, SensitivityTable

PLAN_FORMAT = "quept-plan"
GRANULARITIES = ("layer", "sublayer", "block")
PLAN_VERSION = 1
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def table_objective(table: SensitivityTable) -> str:
    """What the table's costs measure (an objective's name, :mod:`quept.search.objective`);
    tables of causal LMs do not record it."""
    return table.settings.get("objective", NextTokenKL.name)


def parse_size(text: str) -> int:
    """'60MB' -> 60_000_000 bytes; kB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read a size from {text!r}; use a number with an optional unit such as "
            "500kB, 60MB, 1.5GiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def layer_bits(shape: LayerShape, bits: int, group_size: int) -> int:
    """Stored bits of one linear at ``bits``: numel x stored bits per weight (exact integer)."""
    return round(shape.numel * stored_bits_per_weight(bits, group_size, shape.in_features))


@dataclass(frozen=True, eq=False)
class Plan(Mapping[str, int]):
    """A width per quantizable linear, read like a dict ``{layer: bits}`` (so it can be passed to
    ``set_bits`` directly), plus the budget it was made for and what it realises.

    bits_per_weight: stored bits per quantized weight (scales/zeros included), size-weighted.
    stored_bytes: bytes of codes + scales + zero-points of every quantized linear.
    predicted_kl: summed sensitivity of the chosen widths (mean KL per token, nats).
    granularity: the allocation unit (:data:`GRANULARITIES`).
    checked_kl: when the plan was chosen among candidates, the measured KL per token of each
        ``{candidate: nats}`` (candidates with identical widths share one entry).
    search: how the widths were chosen: "table" (summed costs of the sensitivity table),
        "from W<b>" (in-context costs of units moved away from uniform b bits,
        :func:`plan_from_swaps`), "from W<lo>+W<hi>" (the mean of both in-context costs,
        :func:`swap_means`) or "uniform W<b>" (every layer at b bits, :func:`plan_uniform`).
    constraints: the constraints the widths were chosen under, as written
        (:mod:`quept.search.constraints`; empty when none).
    objective: what ``predicted_kl`` and ``checked_kl`` measure (:mod:`quept.search.objective`):
        "next-token-kl" (causal LMs, nats per token), "class-kl" (image classifiers, nats per
        image) or "embedding-distance" (encoders, one minus the cosine per sentence).
    """

    widths: dict[str, int]
    bits_per_weight: float
    stored_bytes: float
    n_weights: int
    budget: dict[str, float] = field(default_factory=dict)
    predicted_kl: float | None = None
    exact: bool = True
    granularity: str = "layer"
    checked_kl: dict[str, float] | None = None
    search: str = "table"
    constraints: tuple[str, ...] = ()
    objective: str = NextTokenKL.name

    def __getitem__(self, name: str) -> int:
        return self.widths[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.widths)

    def __len__(self) -> int:
        return len(self.widths)

    @property
    def label(self) -> str:
        """How the plan was made, as ``checked_kl`` names it: the granularity, followed by the
        search when that is not the table ("block, from W3")."""
        return self.granularity if self.search == "table" else f"{self.granularity}, {self.search}"

    def histogram(self) -> dict[int, int]:
        """Number of layers per width."""
        out: dict[int, int] = {}
        for b in self.widths.values():
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "bits": dict(self.widths),
            "bits_per_weight": self.bits_per_weight, "stored_bytes": self.stored_bytes,
            "n_weights": self.n_weights, "budget": self.budget,
            "predicted_kl": self.predicted_kl, "exact": self.exact,
            "granularity": self.granularity, "checked_kl": self.checked_kl,
            "search": self.search, "constraints": list(self.constraints),
            "objective": self.objective,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "plan") -> Plan:
        if d.get("format") != PLAN_FORMAT or d.get("version") != PLAN_VERSION:
            raise ConfigError(f"{where}: not a quept plan (format {d.get('format')!r}, "
                              f"version {d.get('version')!r}; expected {PLAN_FORMAT!r} v1)")
        widths = d.get("bits")
        if not isinstance(widths, Mapping) or not widths:
            raise ConfigError(f"{where}: 'bits' must map layer names to widths")
        bad = {n: b for n, b in widths.items() if isinstance(b, bool) or not isinstance(b, int)}
        if bad:
            raise ConfigError(f"{where}: widths must be integers, got {dict(list(bad.items())[:3])}")
        gran = d.get("granularity", "layer")
        if gran not in GRANULARITIES:
            raise ConfigError(f"{where}: granularity {gran!r} is not one of {GRANULARITIES}")
        checked = d.get("checked_kl")
        cons = d.get("constraints") or []
        if not isinstance(cons, list) or not all(isinstance(c, str) for c in cons):
            raise ConfigError(f"{where}: 'constraints' must be a list of texts such as "
                              f"'model.layers.0.*=8', got {cons!r}")
        try:
            cons = constraint_texts(cons)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        objective = d.get("objective", NextTokenKL.name)  # plans before it was recorded: LMs
        if not isinstance(objective, str) or objective not in BY_NAME:
            raise ConfigError(f"{where}: objective {objective!r} is not one of "
                              f"{tuple(BY_NAME)}")
        try:
            return cls(dict(widths), float(d["bits_per_weight"]), float(d["stored_bytes"]),
                       int(d["n_weights"]), dict(d.get("budget", {})),
                       None if d.get("predicted_kl") is None else float(d["predicted_kl"]),
                       bool(d.get("exact", True)), gran,
                       None if checked is None else {str(k): float(v) for k, v in checked.items()},
                       str(d.get("search", "table")), cons, objective)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: missing or malformed field ({e!r})") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))  # whole or not at all
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        d = read_plan_json(path)
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, str(path))


INLINE_EXAMPLE = "'*=3,model.layers.0.*=8'"


def read_plan_json(path: str | os.PathLike) -> Any:
    """The JSON of a plan file; a missing file or one that is not JSON is named."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {path} does not exist (a plan can also be given "
                                f"inline: {INLINE_EXAMPLE})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def as_layer_widths(plan: Any) -> Any:
    """A :class:`Plan` or a plan loaded from JSON (a dict with ``format: quept-plan``) ->
    ``{layer: bits}``; anything else is returned unchanged."""
    if isinstance(plan, Plan):
        return plan.widths
    if isinstance(plan, Mapping) and plan.get("format") == PLAN_FORMAT:
        return Plan.from_dict(plan).widths
    return plan


Constraints = Sequence[str | Constraint] | None


def feasible_range(table: SensitivityTable, constraints: Constraints = None
                   ) -> tuple[float, float]:
    """(smallest, largest) stored bits per weight any plan over ``table`` (under
    ``constraints``) can have."""
    lo, hi = size_range(_layer_options(table, constraints)[1])
    n = sum(s.numel for s in table.shapes.values())
    return lo / n, hi / n


def _layer_options(table: SensitivityTable, constraints: Constraints = None
                   ) -> tuple[dict[str, list[int]], list[list[int]]]:
    """(each layer's width when its unit is at each of the table's widths, which is that width
    unless ``constraints`` move it (:func:`quept.search.constraints.clamp`); the stored bits
    of each of those, per layer in table order)."""
    allowed = allowed_widths(table.shapes, table.bits, constraints)
    widths = {n: [clamp(allowed[n], b) for b in table.bits] for n in table.shapes}
    sizes = [[layer_bits(s, b, table.group_size[b]) for b in widths[n]]
             for n, s in table.shapes.items()]
    return widths, sizes


def unit_of(name: str, granularity: str) -> str:
    """The allocation unit of linear ``name``: the layer itself ("layer"), the module right under
    its block ("sublayer": ``model.layers.3.mlp.down_proj`` -> ``model.layers.3.mlp``) or the
    block ("block": ``model.layers.3``). The block is the name up to its last numeric part
    (Swin's ``swin.encoder.layers.1.blocks.0``: the block, not the stage); a name without one
    is a unit of its own."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    parts = name.split(".")
    at = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), None)
    if granularity == "layer" or at is None:
        return name
    return ".".join(parts[: at + (1 if granularity == "block" else 2)])


def split_blocks(widths: Mapping[str, int | None]) -> list[str]:
    """The blocks (:func:`unit_of` "block") whose linears ``widths`` gives more than one width,
    in order. An elastic model is calibrated one width per block at a time, and on the
    cpu-long model hand-written plans that split blocks lost to the uniform width below them
    (docs/pitfalls.md)."""
    seen: dict[str, set[int | None]] = {}
    for name, b in widths.items():
        seen.setdefault(unit_of(name, "block"), set()).add(b)
    return [u for u, w in seen.items() if len(w) > 1]


def split_warning(widths: Mapping[str, int | None], what: str) -> str | None:
    """A one-line warning when a hand-written plan ``what`` splits blocks between widths, or
    None."""
    split = split_blocks(widths)
    if not split:
        return None
    return (f"{what} gives the linears of {len(split)} blocks different widths (e.g. "
            f"{split[0]}); an elastic model is calibrated one width per block, and on the "
            "cpu-long model such plans lost to the uniform width below them: mix widths by "
            "whole blocks (\"model.layers.3.*\": 4) or let `quept plan` choose "
            "(docs/pitfalls.md)")


def plan_from_table(
    table: SensitivityTable, *, avg_bits: float | None = None, max_bytes: int | None = None,
    granularity: str = "layer", constraints: Constraints = None,
) -> Plan:
    """The width per layer minimising the summed sensitivity within the budget: ``avg_bits``
    (stored bits per quantized weight) or ``max_bytes`` (codes + scales + zeros), one of them.
    With ``granularity`` "sublayer" or "block" every linear of a unit gets the same width (the
    unit's cost and size are its layers' sums); the solution is exact for that choice.
    ``constraints`` (:mod:`quept.search.constraints`) pin or bound the widths of the layers
    they name; a unit's linears then move together within what each is allowed."""
    names = list(table.shapes)
    n = sum(s.numel for s in table.shapes.values())
    ids: dict[str, int] = {}  # unit -> its index, in table order
    unit = [ids.setdefault(unit_of(name, granularity), len(ids)) for name in names]
    sizes = [[0] * len(table.bits) for _ in ids]
    cost = [[0.0] * len(table.bits) for _ in ids]
    widths_at, layer_sizes = _layer_options(table, constraints)
    for name, u, row in zip(names, unit, layer_sizes):
        for j, (size, b) in enumerate(zip(row, widths_at[name])):
            sizes[u][j] += size
            cost[u][j] += table.cost(name, b)
    capacity, budget = _capacity(table, sizes, avg_bits, max_bytes, constraints)
    alloc = allocate(cost, sizes, capacity)
    widths = {name: widths_at[name][alloc.choice[u]] for name, u in zip(names, unit)}
    return Plan(widths, alloc.size / n, alloc.size / 8, n, budget, alloc.cost, alloc.exact,
                granularity, constraints=constraint_texts(constraints),
                objective=table_objective(table))


def _capacity(table: SensitivityTable, sizes: list[list[int]], avg_bits: float | None,
              max_bytes: int | None, constraints: Constraints = None
              ) -> tuple[int, dict[str, float]]:
    """(capacity in stored bits, the budget as recorded) of one budget; InfeasibleBudgetError
    below the smallest plan."""
    if (avg_bits is None) == (max_bytes is None):
        raise ConfigError("give exactly one budget: avg_bits or max_bytes")
    name, value = ("avg_bits", avg_bits) if avg_bits is not None else ("max_bytes", max_bytes)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    n = sum(s.numel for s in table.shapes.values())
    lo, hi = size_range(sizes)
    if avg_bits is not None:
        # exact decimal arithmetic: 3.296875 must admit uniform W3 exactly; and a plan's own
        # bits per weight (size / n, a float up to 2^-53 below the true ratio) must admit
        # that plan, so the product is raised by 2^-50 of itself (under one bit below 10^14)
        capacity = math.floor(Fraction(repr(float(avg_bits))) * n * (1 + Fraction(1, 2**50)))
        budget = {"avg_bits": float(avg_bits)}
    else:
        capacity, budget = int(max_bytes) * 8, {"max_bytes": float(max_bytes)}
    if capacity < lo:
        asked = f"{avg_bits} bits per weight" if avg_bits is not None else f"{max_bytes} bytes"
        under = constraint_texts(constraints)
        under = f" under the constraints {', '.join(under)}" if under else ""
        raise InfeasibleBudgetError(
            f"a budget of {asked} is infeasible: plans for this model{under} range from "
            f"{lo / n:.4f} to {hi / n:.4f} stored bits per weight ({lo / 8:,.0f} to "
            f"{hi / 8:,.0f} bytes of quantized linears, scales and zero-points included)"
        )
    return capacity, budget


def shape_table(layers: Mapping[str, Any], group_size: Mapping[int, int]) -> SensitivityTable:
    """A table of the layers' shapes with every cost zero: what budgets, feasibility and
    bracketing widths need, before any sensitivity is measured. ``layers`` maps names to
    linears (anything with ``out_features`` / ``in_features``), ``group_size`` each width to
    its group size."""
    bits = tuple(sorted(group_size))
    shapes = {n: LayerShape(m.out_features, m.in_features) for n, m in layers.items()}
    return SensitivityTable(bits=bits, group_size=dict(group_size), shapes=shapes,
                            kl={n: (0.0,) * len(bits) for n in shapes}, fingerprint="")


def check_budget(layers: Mapping[str, Any], group_size: Mapping[int, int], *,
                 avg_bits: float | None = None, max_bytes: int | None = None,
                 constraints: Constraints = None) -> None:
    """Refuse a budget no plan can meet before any sensitivity is measured (``layers`` and
    ``group_size`` as :func:`shape_table` takes them). Raises :class:`InfeasibleBudgetError`
    (or ``ConfigError`` for a malformed budget, or constraints that match no layer or leave one
    no width) with the range of stored bits per weight the model's plans (under
    ``constraints``) can have."""
    skeleton = shape_table(layers, group_size)
    _capacity(skeleton, _layer_options(skeleton, constraints)[1], avg_bits, max_bytes,
              constraints)


def in_context_sweeps(table: SensitivityTable, *, avg_bits: float | None = None,
                      max_bytes: int | None = None, constraints: Constraints = None,
                      both_ways: bool = True) -> list[tuple[int, int]]:
    """The in-context sweeps ``(base, alt)`` the auto granularity uses at one budget, in the
    order it measures them: from the uniform width below the budget up and from the one above
    down, then (``both_ways``) from the one above to the next width; none when the widest
    uniform width fits."""
    lo, hi = bracketing_widths(table, avg_bits=avg_bits, max_bytes=max_bytes,
                               constraints=constraints)
    if hi is None:
        return []
    above = min((b for b in table.bits if b > hi), default=None)
    return [(lo, hi), (hi, lo)] + ([(hi, above)] if both_ways and above is not None else [])


def bracketing_widths(table: SensitivityTable, *, avg_bits: float | None = None,
                      max_bytes: int | None = None, constraints: Constraints = None
                      ) -> tuple[int, int | None]:
    """(lo, hi): the widest uniform width whose model fits the budget and the next wider one
    (None when the widest width fits); under ``constraints`` a uniform width is what the
    constrained layers make of it."""
    sizes = _layer_options(table, constraints)[1]
    capacity, _ = _capacity(table, sizes, avg_bits, max_bytes, constraints)
    total = {b: sum(row[j] for row in sizes) for j, b in enumerate(table.bits)}
    lo = max((b for b, size in total.items() if size <= capacity), default=None)
    if lo is None:  # only mixed plans fit (the narrowest width is missing from the table)
        raise InfeasibleBudgetError("no uniform width fits this budget")
    return lo, min((b for b in total if b > lo), default=None)


def plan_uniform(table: SensitivityTable, bits: int, *, avg_bits: float | None = None,
                 max_bytes: int | None = None, constraints: Constraints = None) -> Plan:
    """Every layer at ``bits`` (what ``constraints`` make of it) as a plan within the budget:
    the auto granularity's safety net, so that the plan it keeps is never worse, on its check
    data, than the uniform width below the budget. InfeasibleBudgetError if it does not fit."""
    j = table.bits.index(bits)
    widths_at, sizes = _layer_options(table, constraints)
    capacity, budget = _capacity(table, sizes, avg_bits, max_bytes, constraints)
    size = sum(row[j] for row in sizes)
    if size > capacity:
        raise InfeasibleBudgetError(f"uniform W{bits} ({size / 8:,.0f} bytes) does not fit "
                                    f"a budget of {capacity / 8:,.0f} bytes")
    n = sum(s.numel for s in table.shapes.values())
    widths = {name: widths_at[name][j] for name in table.shapes}
    cost = sum(table.cost(name, b) for name, b in widths.items())
    return Plan(widths, size / n, size / 8, n, budget, cost, True, "block",
                search=f"uniform W{bits}", constraints=constraint_texts(constraints),
                objective=table_objective(table))


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
    widths_at, layer_sizes = _layer_options(table, constraints)
    for name, row in zip(names, layer_sizes):
        u = unit_of(name, granularity)
        if u not in ids:
            raise ConfigError(f"layer {name} is in no unit of the in-context costs")
        unit.append(ids[u])
        for j, c in enumerate(cols):
            sizes[ids[u]][j] += row[c]
            if widths_at[name][c] != widths_at[name][cols[0]]:
                moved[u].add(widths[j])
    capacity, budget = _capacity(table, sizes, avg_bits, max_bytes, constraints)
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
    capacity, budget = _capacity(table, sizes, avg_bits, max_bytes, constraints)
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
