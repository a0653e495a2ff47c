"""A mixed-precision plan ({layer: width} plus its realised budget), its units, and the
allocation that turns a sensitivity table and a budget into a plan (DESIGN 2.6); the budgets
themselves are :mod:`quept.search.budget`, the plans built from in-context costs
:mod:`quept.search.candidates`.

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quept.checks import ConfigError, check_bits, counted
from quept.data.fetch import atomic_write_text
from quept.search.allocate import InfeasibleBudgetError, allocate
from quept.search.budget import Constraints, budget_capacity, layer_bits, layer_options
from quept.search.constraints import allowed_widths, constraint_texts
from quept.search.objective import BY_NAME, NextTokenKL
from quept.search.refinement import Refinement
from quept.search.table import SensitivityTable

PLAN_FORMAT = "quept-plan"
GRANULARITIES = ("layer", "sublayer", "block")
PLAN_VERSION = 1


def table_objective(table: SensitivityTable) -> str:
    """What the table's costs measure (an objective's name, :mod:`quept.search.objective`);
    tables of causal LMs do not record it."""
    return table.settings.get("objective", NextTokenKL.name)


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
        :func:`quept.search.candidates.plan_from_swaps`), "from W<lo>+W<hi>" (the mean of both
        in-context costs, :func:`quept.search.candidates.swap_means`) or "uniform W<b>" (every
        layer at b bits, :func:`plan_uniform`); a plan a larger budget kept from a smaller one
        adds the budget it was made for: "from W3 (the 3.2-bit plan's)" (:func:`plan_within`).
    constraints: the constraints the widths were chosen under, as written
        (:mod:`quept.search.constraints`; empty when none).
    objective: what ``predicted_kl`` and ``checked_kl`` measure (:mod:`quept.search.objective`):
        "next-token-kl" (causal LMs, nats per token), "class-kl" (image classifiers, nats per
        image) or "embedding-distance" (encoders, one minus the cosine per sentence).
    refinement: what the refinement asked of the auto granularity did, round by round
        (:class:`quept.search.refinement.Refinement`); None when none was asked.
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
    refinement: Refinement | None = None

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
            "refinement": None if self.refinement is None else self.refinement.to_dict(),
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
        for name, b in widths.items():
            try:
                check_bits(b)
            except ConfigError as e:
                raise ConfigError(f"{where}: layer {name}: {e}") from None
        for key in ("bits_per_weight", "stored_bytes", "n_weights"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    0 < v < math.inf):
                raise ConfigError(f"{where}: {key!r} must be a positive finite number, got "
                                  f"{json.dumps(v)}")
        refinement = d.get("refinement")  # None: not asked, or a plan from before it was kept
        if refinement is not None:
            refinement = Refinement.from_dict(refinement, where)
        budget = d.get("budget", {})
        if not isinstance(budget, Mapping) or any(
                v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
                for v in budget.values()):
            raise ConfigError(f"{where}: 'budget' must map avg_bits / max_bytes to numbers, got "
                              f"{json.dumps(budget)}")
        try:
            return cls(dict(widths), float(d["bits_per_weight"]), float(d["stored_bytes"]),
                       int(d["n_weights"]), dict(d.get("budget", {})),
                       None if d.get("predicted_kl") is None else float(d["predicted_kl"]),
                       bool(d.get("exact", True)), gran,
                       None if checked is None else {str(k): float(v) for k, v in checked.items()},
                       str(d.get("search", "table")), cons, objective, refinement)
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
    return (f"{what} gives the linears of {counted(len(split), 'block')} different widths (e.g. "
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
    widths_at, layer_sizes = layer_options(table, constraints)
    for name, u, row in zip(names, unit, layer_sizes):
        for j, (size, b) in enumerate(zip(row, widths_at[name])):
            sizes[u][j] += size
            cost[u][j] += table.cost(name, b)
    capacity, budget = budget_capacity(table, sizes, avg_bits, max_bytes, constraints)
    alloc = allocate(cost, sizes, capacity)
    widths = {name: widths_at[name][alloc.choice[u]] for name, u in zip(names, unit)}
    return Plan(widths, alloc.size / n, alloc.size / 8, n, budget, alloc.cost, alloc.exact,
                granularity, constraints=constraint_texts(constraints),
                objective=table_objective(table))


def plan_uniform(table: SensitivityTable, bits: int, *, avg_bits: float | None = None,
                 max_bytes: int | None = None, constraints: Constraints = None) -> Plan:
    """Every layer at ``bits`` (what ``constraints`` make of it) as a plan within the budget:
    the auto granularity's safety net, so that the plan it keeps is never worse, on its check
    data, than the uniform width below the budget. InfeasibleBudgetError if it does not fit."""
    j = table.bits.index(bits)
    widths_at, sizes = layer_options(table, constraints)
    capacity, budget = budget_capacity(table, sizes, avg_bits, max_bytes, constraints)
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


def budget_words(budget: Mapping[str, Any]) -> str:
    """A plan's recorded budget in words: "3.2-bit", "60,000,000-byte"; "" when none."""
    if budget.get("avg_bits") is not None:
        return f"{budget['avg_bits']:g}-bit"
    if budget.get("max_bytes") is not None:
        return f"{budget['max_bytes']:,.0f}-byte"
    return ""


def plan_within(table: SensitivityTable, earlier: Plan, *, avg_bits: float | None = None,
                max_bytes: int | None = None, constraints: Constraints = None) -> Plan | None:
    """``earlier`` (a plan over the table's layers, e.g. one made for a smaller budget) as a
    candidate at this budget: its widths, with their stored size and summed cost recorded
    for this budget and ``constraints``, when they fit it and keep the constraints; None when
    they do not. Its search names the budget it was made for ("block, from W3 (the 3.2-bit
    plan's)"), so that a larger budget keeping a smaller one's plan says so. A plan of other
    layers or another objective raises ConfigError."""
    if set(earlier.widths) != set(table.shapes):
        odd = sorted(set(earlier.widths) ^ set(table.shapes))
        raise ConfigError(f"an earlier plan names other layers than the model's (e.g. {odd[0]}); "
                          "give plans made for this model")
    if earlier.objective != table_objective(table):
        raise ConfigError(f"an earlier plan measures {earlier.objective}, the table "
                          f"{table_objective(table)}; give plans made for this model")
    allowed = allowed_widths(table.shapes, table.bits, constraints)
    if any(b not in allowed[n] for n, b in earlier.widths.items()):
        return None
    capacity, budget = budget_capacity(table, layer_options(table, constraints)[1], avg_bits,
                                       max_bytes, constraints)
    size = sum(layer_bits(table.shapes[n], b, table.group_size[b])
               for n, b in earlier.widths.items())
    if size > capacity:
        return None
    n = sum(s.numel for s in table.shapes.values())
    cost = sum(table.cost(name, b) for name, b in earlier.widths.items())
    made_for = budget_words(earlier.budget)
    search = earlier.search
    if made_for and not search.endswith("plan's)"):
        search = f"{search} (the {made_for} plan's)"
    return Plan(dict(earlier.widths), size / n, size / 8, n, budget, cost, earlier.exact,
                earlier.granularity, search=search, constraints=constraint_texts(constraints),
                objective=table_objective(table))
