"""Constraints on a plan's widths: parsing, resolution by pattern, and allocations that keep
them (exactly optimal under them, checked by brute force)."""

import itertools

import pytest

import quept
from quept.config import ConfigError
from quept.nn import elastic_layers
from quept.search import Constraint, InfeasibleBudgetError, LayerShape, Plan, SensitivityTable
from quept.search.budget import feasible_range, layer_bits
from quept.search.candidates import bracketing_widths, plan_from_moves
from quept.search.constraints import allowed_widths, clamp, constraint_texts
from quept.search.plan import plan_from_table, unit_of
from tests.search.helpers import elastic_tiny, token_ids

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def model():
    return elastic_tiny(layers=2)


def table_of(model, bits=(2, 3, 4, 5, 6, 7, 8), scale=None):
    """Convex costs, per weight halving with each bit, larger for the layers in ``scale``."""
    layers = elastic_layers(model)
    scale = scale or {}
    return SensitivityTable(
        bits=tuple(bits), group_size={b: 16 for b in bits},
        shapes={n: LayerShape(m.out_features, m.in_features) for n, m in layers.items()},
        kl={n: tuple(scale.get(n, 1.0) * m.weight.numel() * 2.0 ** -b for b in bits)
            for n, m in layers.items()},
        fingerprint="x",
    )


def test_constraints_are_read_as_written():
    assert Constraint.parse("model.layers.0.*=8") == Constraint("model.layers.0.*", 8, 8)
    assert Constraint.parse(" *.down_proj >= 4 ") == Constraint("*.down_proj", 4, 8)
    assert Constraint.parse("*<=6") == Constraint("*", 2, 6)
    for text in ("model.layers.0.*=8", "*.down_proj>=4", "*<=6"):
        assert Constraint.parse(text).texts == (text,)
    assert Constraint.parse("*.o_proj <= 2").texts == ("*.o_proj <= 2",)  # kept as written
    assert Constraint("*", 3, 6).texts == ("*>=3", "*<=6")  # both bounds: two halves
    assert Constraint("*", 4, 4).texts == ("*=4",) and Constraint("*", 2, 8).texts == ("*>=2",)
    assert constraint_texts(["*>=3", Constraint("a", 5, 5)]) == ("*>=3", "a=5")
    for bad, match in (("model.layers.0", "cannot read a constraint"),
                       ("=4", "cannot read a constraint"), ("*=x", "cannot read"),
                       ("*=9", r"constraint '\*=9': bit-width 9 is outside 2..8"),
                       ("*>=1", "outside 2..8")):
        with pytest.raises(ConfigError, match=match):
            Constraint.parse(bad)
    with pytest.raises(ConfigError, match="lower bound 6 is above the upper bound 3"):
        Constraint("*", 6, 3)


def test_constraints_narrow_in_order_and_a_later_one_wins_a_conflict():
    bits = (2, 3, 4, 5, 6, 7, 8)
    got = allowed_widths(NAMES, bits, ["*<=6", "*.down_proj>=4", "model.layers.0.*=5"])
    assert got == {NAMES[0]: (5,), NAMES[1]: (5,), NAMES[2]: (2, 3, 4, 5, 6),
                   NAMES[3]: (4, 5, 6)}
    assert allowed_widths(NAMES, bits, [f"{NAMES[2]}=3"])[NAMES[2]] == (3,)  # an exact name
    with pytest.raises(ConfigError, match=r"'\*\.o_proj=4' matches no layer; layers are named"):
        allowed_widths(NAMES, bits, ["*.o_proj=4"])
    with pytest.raises(ConfigError, match=r"'model\.layers\.1=4' matches no layer; for the "
                                          r"linears under model\.layers\.1 write model"):
        allowed_widths(NAMES, bits, ["model.layers.1=4"])  # a block is not a layer name
    got = allowed_widths(NAMES, bits, ["*<=3", "*.down_proj>=4", "model.layers.1.*>=3"])
    assert got == {NAMES[0]: (2, 3), NAMES[1]: (4, 5, 6, 7, 8), NAMES[2]: (3,),
                   NAMES[3]: (4, 5, 6, 7, 8)}
    with pytest.raises(ConfigError, match=r"'\*=8' allows no width of the elastic model "
                                          r"\(2, 3, 4\)"):
        allowed_widths(NAMES, (2, 3, 4), ["*=8"])


def test_clamp_takes_the_nearest_allowed_width():
    assert clamp((2, 3, 4, 5, 6, 7, 8), 3) == 3
    assert clamp((4, 5, 6), 2) == 4 and clamp((4, 5, 6), 8) == 6 and clamp((8,), 2) == 8
    assert clamp((2, 6), 4) == 2  # a tie goes to the lower width


def brute_force(table, capacity, allowed):
    """The least summed cost over every per-layer choice the constraints allow."""
    names = list(table.shapes)
    best = None
    for combo in itertools.product(*(allowed[n] for n in names)):
        size = sum(layer_bits(table.shapes[n], b, table.group_size[b])
                   for n, b in zip(names, combo))
        if size <= capacity:
            cost = sum(table.cost(n, b) for n, b in zip(names, combo))
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("constraints", [
    ["model.layers.0.*=4"],
    ["*.mlp.*>=3", "*.self_attn.o_proj<=2"],
    ["*<=3", "model.layers.1.mlp.down_proj=4"],
])
def test_layer_plans_are_optimal_under_constraints(model, constraints):
    names = list(elastic_layers(model))
    table = table_of(model, bits=(2, 3, 4), scale={names[1]: 30.0, names[-1]: 0.1})
    allowed = allowed_widths(names, table.bits, constraints)
    lo, hi = feasible_range(table, constraints)
    assert lo >= feasible_range(table)[0] and hi <= feasible_range(table)[1]
    n = sum(s.numel for s in table.shapes.values())
    for avg in (lo, (2 * lo + hi) / 3, (lo + 2 * hi) / 3, hi):
        plan = plan_from_table(table, avg_bits=avg, constraints=constraints)
        assert all(plan[name] in allowed[name] for name in names)
        assert plan.bits_per_weight <= avg + 1e-12
        assert plan.predicted_kl == pytest.approx(brute_force(table, avg * n, allowed))
        assert plan.constraints == tuple(constraints)


def test_units_move_together_around_pinned_layers(model):
    names = list(elastic_layers(model))
    table = table_of(model)
    pin = ["model.layers.0.mlp.down_proj=8", "model.layers.1.*>=3"]
    for g in ("sublayer", "block"):
        plan = plan_from_table(table, avg_bits=5.0, granularity=g, constraints=pin)
        assert plan["model.layers.0.mlp.down_proj"] == 8
        assert min(plan[n] for n in names if n.startswith("model.layers.1.")) >= 3
        units: dict[str, set[int]] = {}
        for name in names:
            if name != "model.layers.0.mlp.down_proj":
                units.setdefault(unit_of(name, g), set()).add(plan[name])
        assert all(len(w) == 1 for w in units.values()), units
        quept.set_bits(model, plan)  # the budget counts the pinned layer
        assert quept.stored_bits(model) == pytest.approx(plan.bits_per_weight)
        assert plan.bits_per_weight <= 5.0


def test_a_budget_the_constraints_rule_out_is_refused_with_them(model):
    table = table_of(model)
    with pytest.raises(InfeasibleBudgetError, match=r"under the constraints model\.layers\.0\.\*=8 "
                                                    r"range from 6\.3125"):
        plan_from_table(table, avg_bits=2.5, constraints=["model.layers.0.*=8"])
    with pytest.raises(InfeasibleBudgetError, match="under the constraints"):
        quept.check_budget(model, avg_bits=2.5, constraints=["model.layers.0.*=8"])
    with pytest.raises(ConfigError, match="matches no layer"):
        quept.check_budget(model, avg_bits=4.0, constraints=["*.c_attn=4"])
    quept.check_budget(model, avg_bits=6.4, constraints=["model.layers.0.*=8"])


def test_bracketing_widths_see_the_constraints(model):
    table = table_of(model)  # group 16: W3 stores 4.1875 bits per weight, W5 6.3125, W6 7.375
    assert bracketing_widths(table, avg_bits=7.0) == (5, 6)
    # with block 0 (half the weights) at 8 bits (9.5 stored), block 1 can have 4.5 bits
    assert bracketing_widths(table, avg_bits=7.0, constraints=["model.layers.0.*=8"]) == (3, 4)


def test_moves_keep_constraints_and_cost_nothing_where_nothing_moves(model):
    names = list(elastic_layers(model))
    table = table_of(model)
    units = {unit_of(n, "block") for n in names}
    # moving block 0 looks cheapest, but it is pinned at 3 so the move changes nothing
    deltas = {"model.layers.0": -5.0, "model.layers.1": -1.0}
    assert units == set(deltas)
    w4 = sum(layer_bits(s, 4, 16) for s in table.shapes.values()) / sum(
        s.numel for s in table.shapes.values())
    plan = plan_from_moves(table, 3, {4: deltas}, 1.0, avg_bits=w4,
                           constraints=["model.layers.0.*=3"])
    assert all(plan[n] == 3 for n in names if n.startswith("model.layers.0."))
    assert all(plan[n] == 4 for n in names if n.startswith("model.layers.1."))
    assert plan.predicted_kl == pytest.approx(1.0 - 1.0)
    assert plan.constraints == ("model.layers.0.*=3",)


def test_auto_plans_keep_the_constraints_and_record_them(model, tmp_path):
    names = list(elastic_layers(model))
    table = table_of(model, scale={names[0]: 20.0})
    cons = ["model.layers.1.mlp.*=6", "*.self_attn.q_proj<=3"]
    allowed = allowed_widths(names, table.bits, cons)
    ids = token_ids(2, 16)
    candidates = quept.api.plan_candidates(model, table, avg_bits=5.5, check_ids=ids,
                                           constraints=cons)
    assert len(candidates) >= 3
    for label, plan in candidates.items():
        assert all(plan[n] in allowed[n] for n in names), label
        assert plan.bits_per_weight <= 5.5
    plan = quept.plan(model, table, avg_bits=5.5, check_ids=ids, constraints=cons)
    assert set(plan.checked_kl) == set(candidates)
    back = Plan.load(plan.save(tmp_path / "p.json"))
    assert back.constraints == tuple(cons) and back.widths == plan.widths
    d = plan.to_dict()
    d["constraints"] = "*=4"
    with pytest.raises(ConfigError, match="'constraints' must be a list of texts"):
        Plan.from_dict(d)
    d["constraints"] = ["*=12"]
    with pytest.raises(ConfigError, match="plan: constraint '\\*=12': bit-width 12"):
        Plan.from_dict(d)
