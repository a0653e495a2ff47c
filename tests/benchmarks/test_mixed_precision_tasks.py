"""benchmarks/mixed_precision_tasks.py: the line check of plans between uniform widths."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from mixed_precision_tasks import line_checks  # noqa: E402


def test_each_plan_is_held_against_the_line_of_its_neighbours():
    uniform = [{"bits_per_weight": b, "cost": c} for b, c in ((2.25, 0.04), (3.25, 0.01),
                                                               (4.25, 0.002))]
    plans = [{"budget": 2.75, "bits_per_weight": 2.75, "cost": 0.02},    # line 0.025: below
             {"budget": 3.75, "bits_per_weight": 3.70, "cost": 0.0065},  # line 0.0064: above
             {"budget": 3.25, "bits_per_weight": 3.25, "cost": 0.01},    # on a uniform point
             {"budget": 9.0, "bits_per_weight": 9.0, "cost": 0.0}]       # beyond the widest
    checks = {c["budget"]: c for c in line_checks(uniform, plans)}
    assert set(checks) == {2.75, 3.75, 3.25}
    assert checks[2.75]["line_cost"] == pytest.approx(0.025) and checks[2.75]["at_or_below"]
    assert checks[2.75]["between"] == [2.25, 3.25]
    assert checks[3.75]["line_cost"] == pytest.approx(0.0064)
    assert not checks[3.75]["at_or_below"]
    assert checks[3.75]["ratio"] == pytest.approx(0.0065 / 0.0064)
    assert checks[3.25]["at_or_below"]
