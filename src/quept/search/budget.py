"""Honest budgets: what a plan's widths cost in stored bits, what a budget admits, and the
range of budgets a model's plans can meet (DESIGN 2.6).

Budgets count only the quantized linears, weighted by their size: codes plus an fp16 scale and
a b-bit zero-point per group (:func:`quept.ops.stored_bits_per_weight`). Norms, embeddings and
the head never absorb budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from numbers import Real
from typing import Any

from quept.checks import ConfigError
from quept.ops import stored_bits_per_weight
from quept.search.allocate import InfeasibleBudgetError, size_range
from quept.search.constraints import Constraint, allowed_widths, clamp, constraint_texts
from quept.search.table import LayerShape, SensitivityTable

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'60MB' -> 60_000_000 bytes; kB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2) if m else ""
    bits = re.fullmatch(r"[KMGT]i?b", unit) is not None  # Mb: megabits (60mb reads as bytes)
    if m is None or unit.lower() not in _UNITS or bits:
        why = f"; {unit!r} reads as bits, and budgets are bytes: write {unit[:-1]}B" if bits else ""
        raise ConfigError(
            f"cannot read a size from {text!r}{why}; use a number with an optional unit such as "
            "500kB, 60MB, 1.5GiB"
        )
    exponent = int(m.group(1).lower().partition("e")[2] or 0)
    if exponent > 30:  # past any model, and past what a float holds
        raise ConfigError(f"{text!r} is far past any model's size; give a size such as 60MB")
    return int(Fraction(m.group(1)) * _UNITS[unit.lower()])  # exact: 32.032kB is 32032 bytes


def layer_bits(shape: LayerShape, bits: int, group_size: int) -> int:
    """Stored bits of one linear at ``bits``: numel x stored bits per weight (exact integer)."""
    return round(shape.numel * stored_bits_per_weight(bits, group_size, shape.in_features,
                                                      shape.out_features))


Constraints = Sequence[str | Constraint] | None


def feasible_range(table: SensitivityTable, constraints: Constraints = None
                   ) -> tuple[float, float]:
    """(smallest, largest) stored bits per weight any plan over ``table`` (under
    ``constraints``) can have."""
    lo, hi = size_range(layer_options(table, constraints)[1])
    n = sum(s.numel for s in table.shapes.values())
    return lo / n, hi / n


def layer_options(table: SensitivityTable, constraints: Constraints = None
                  ) -> tuple[dict[str, list[int]], list[list[int]]]:
    """(each layer's width when its unit is at each of the table's widths, which is that width
    unless ``constraints`` move it (:func:`quept.search.constraints.clamp`); the stored bits
    of each of those, per layer in table order)."""
    allowed = allowed_widths(table.shapes, table.bits, constraints)
    widths = {n: [clamp(allowed[n], b) for b in table.bits] for n in table.shapes}
    sizes = [[layer_bits(s, b, table.group_size[b]) for b in widths[n]]
             for n, s in table.shapes.items()]
    return widths, sizes


def uniform_widths(table: SensitivityTable, constraints: Constraints = None) -> tuple[int, ...]:
    """The table's widths a uniform model can have under ``constraints``: those that some
    layer keeps when every unit is at that width. Every width without constraints; under
    ``*<=3`` only those up to 3 (uniform W4 would put every layer at 3, which is uniform W3),
    under ``*>=4`` only those from 4."""
    if not constraints:
        return tuple(table.bits)
    widths = layer_options(table, constraints)[0]
    return tuple(b for j, b in enumerate(table.bits) if any(w[j] == b for w in widths.values()))


def budget_capacity(table: SensitivityTable, sizes: list[list[int]], avg_bits: float | None,
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
    budget_capacity(skeleton, layer_options(skeleton, constraints)[1], avg_bits, max_bytes,
                    constraints)
