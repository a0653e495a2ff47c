"""Training-free mixed precision: sensitivity table, exact budgeted allocation, plans."""

from quept.search.allocate import Allocation, InfeasibleBudgetError, allocate
from quept.search.budget import feasible_range, parse_size
from quept.search.constraints import Constraint
from quept.search.plan import Plan, as_layer_widths, plan_from_table
from quept.search.sensitivity import SensitivityConfig, estimate_sensitivity
from quept.search.sweeps import SweepCache
from quept.search.table import LayerShape, SensitivityCacheError, SensitivityTable

__all__ = [
    "Allocation", "Constraint", "InfeasibleBudgetError", "LayerShape", "Plan", "SensitivityCacheError",
    "SensitivityConfig", "SensitivityTable", "SweepCache", "allocate", "as_layer_widths",
    "estimate_sensitivity", "feasible_range", "parse_size", "plan_from_table",
]
