import dataclasses
import json

import pytest

import quept
from quept.config import ConfigError
from quept.nn import elastic_layers
from quept.ops import stored_bits_per_weight
from quept.search import (
    InfeasibleBudgetError,
    LayerShape,
    Plan,
    SensitivityTable,
    feasible_range,
    parse_size,
    plan_from_table,
)
from quept.search.candidates import (
    bracketing_widths,
    neighbour_moves,
    plan_from_moves,
    plan_from_neighbours,
    plan_from_swaps,
    swap_means,
)
from quept.search.exact import configuration_kl, move_kl, unit_swap_kl
from quept.search.plan import plan_uniform, plan_within, unit_of
from quept.search.plan_files import read_widths
from tests.search.helpers import elastic_tiny, token_ids

BITS = (2, 3, 4, 5, 6, 7, 8)


def synthetic_table(model, scale=None):
    """Costs per weight that halve with each bit (convex), larger for the layers in ``scale``."""
    layers = elastic_layers(model)
    scale = scale or {}
    return SensitivityTable(
        bits=BITS, group_size={b: 16 for b in BITS},
        shapes={n: LayerShape(m.out_features, m.in_features) for n, m in layers.items()},
        kl={n: tuple(scale.get(n, 1.0) * m.weight.numel() * 2.0 ** -b for b in BITS)
            for n, m in layers.items()},
        fingerprint="x",
    )


@pytest.fixture(scope="module")
def model():
    return elastic_tiny()


def test_parse_size():
    assert parse_size("60MB") == 60_000_000
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("500kB") == parse_size("500 KB") == 500_000
    assert parse_size("123") == 123
    for bad in ("sixty", "60XB", "", "-5MB"):
        with pytest.raises(ConfigError, match="cannot read a size"):
            parse_size(bad)


def test_budget_is_counted_honestly_and_respected(model):
    table = synthetic_table(model)
    lo, hi = feasible_range(table)
    assert lo == pytest.approx(stored_bits_per_weight(2, 16, 64))  # every layer at 2 bits
    assert hi == pytest.approx(stored_bits_per_weight(8, 16, 64))
    for avg in (lo, lo + 0.3, stored_bits_per_weight(3, 16, 64), 4.7, 6.1, hi, 10.0):
        plan = plan_from_table(table, avg_bits=avg)
        assert plan.bits_per_weight <= avg + 1e-12
        quept.set_bits(model, plan)
        assert quept.stored_bits(model) == pytest.approx(plan.bits_per_weight)
        assert plan.stored_bytes * 8 == pytest.approx(plan.bits_per_weight * plan.n_weights)
    # The exact budget of uniform W3 admits it, and with equal convex costs it is optimal.
    w3 = plan_from_table(table, avg_bits=stored_bits_per_weight(3, 16, 64))
    assert set(w3.values()) == {3}


def test_sensitive_layers_get_more_bits(model):
    names = list(elastic_layers(model))
    table = synthetic_table(model, {names[2]: 50.0})
    plan = plan_from_table(table, avg_bits=3.5)
    assert plan[names[2]] == max(plan.values()) > min(plan.values())


def test_byte_budget(model):
    table = synthetic_table(model)
    plan = plan_from_table(table, max_bytes=30_000)
    assert plan.stored_bytes <= 30_000 and plan.budget == {"max_bytes": 30_000.0}
    assert plan_from_table(table, max_bytes=40_000).predicted_kl < plan.predicted_kl


def test_infeasible_budget_names_the_feasible_range(model):
    table = synthetic_table(model)
    lo, hi = feasible_range(table)
    with pytest.raises(InfeasibleBudgetError, match=f"range from {lo:.4f} to {hi:.4f}"):
        plan_from_table(table, avg_bits=2.25)
    with pytest.raises(InfeasibleBudgetError, match="infeasible"):
        plan_from_table(table, max_bytes=1000)
    with pytest.raises(quept.ConfigError, match="infeasible"):  # bad input, like any other
        quept.check_budget(model, avg_bits=1.0)
    with pytest.raises(ConfigError, match="exactly one budget"):
        plan_from_table(table, avg_bits=3.0, max_bytes=10**6)
    with pytest.raises(ConfigError, match="exactly one budget"):
        plan_from_table(table)


def test_check_budget_refuses_from_the_layer_shapes_alone(model):
    lo, hi = feasible_range(synthetic_table(model))  # same shapes and group size as the model
    quept.check_budget(model, avg_bits=lo)  # uniform W2 exactly: feasible
    quept.check_budget(model, max_bytes=10**9)
    with pytest.raises(InfeasibleBudgetError, match=f"range from {lo:.4f} to {hi:.4f}"):
        quept.check_budget(model, avg_bits=lo - 0.01)
    with pytest.raises(InfeasibleBudgetError, match="1000 bytes is infeasible"):
        quept.check_budget(model, max_bytes=1000)
    with pytest.raises(ConfigError, match="exactly one budget"):
        quept.check_budget(model)


def test_plan_json_round_trip_and_apply(model, tmp_path):
    plan = plan_from_table(synthetic_table(model), avg_bits=3.6)
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert dict(again) == dict(plan) and again.bits_per_weight == plan.bits_per_weight
    for form in (again, json.loads(path.read_text()), dict(plan)):
        quept.set_bits(model, 8)
        quept.set_bits(model, form)
        assert {n: m.bits for n, m in elastic_layers(model).items()} == dict(plan)


def test_bad_plans_are_refused_with_the_reason(model, tmp_path):
    good = plan_from_table(synthetic_table(model), avg_bits=3.6).to_dict()
    name = next(iter(good["bits"]))
    cases = [
        ({**good, "format": "other"}, "not a quept plan"),
        ({**good, "bits": {**good["bits"], name: "4"}}, "must be integers"),
        ({**good, "bits": []}, "must map layer names"),
    ]
    for d, msg in cases:
        (tmp_path / "p.json").write_text(json.dumps(d))
        with pytest.raises(ConfigError, match=msg):
            Plan.load(tmp_path / "p.json")
    with pytest.raises(ConfigError, match="1 unknown name"):
        quept.set_bits(model, {**good, "bits": {**good["bits"], "model.lm_head": 4}})
    with pytest.raises(ConfigError, match="1 layer missing"):
        quept.set_bits(model, {**good, "bits": {k: v for k, v in good["bits"].items()
                                                if k != name}})
    with pytest.raises(ConfigError, match=f"layer {name}: bit-width 9"):
        quept.set_bits(model, {**good, "bits": {**good["bits"], name: 9}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_api_plan_checks_the_table_matches_the_model(model):
    table = synthetic_table(model)
    assert quept.api.plan(model, table, avg_bits=4.0, granularity="layer").bits_per_weight <= 4.0
    other = elastic_tiny(layers=2)
    with pytest.raises(quept.ArtifactError, match="another model or spec"):
        quept.api.plan(other, table, avg_bits=4.0, granularity="layer")
    with pytest.raises(quept.ArtifactError, match="another model or spec"):
        quept.api.plan_candidates(other, table, avg_bits=4.0, in_context=False)
    for bad in (token_ids(4, 16)[0], token_ids(4, 16)[:0]):
        with pytest.raises(ConfigError, match=r"check_ids must be \(N, T\) integer token ids"):
            quept.api.plan(model, table, avg_bits=4.0, check_ids=bad)
    with pytest.raises(ConfigError, match="expected a SensitivityTable .* got Tensor"):
        quept.api.plan(model, token_ids(4, 16), avg_bits=4.0)


def test_unit_of_names_layers_sublayers_and_blocks():
    name = "model.layers.3.mlp.down_proj"
    assert unit_of(name, "layer") == name
    assert unit_of(name, "sublayer") == "model.layers.3.mlp"
    assert unit_of(name, "block") == "model.layers.3"
    bert = "encoder.layer.11.attention.self.query"
    assert unit_of(bert, "sublayer") == "encoder.layer.11.attention"
    assert unit_of("blocks.0.fc", "sublayer") == "blocks.0.fc"  # directly under the block
    assert unit_of("head", "block") == "head"  # no block: a unit of its own
    with pytest.raises(ConfigError, match="granularity must be one of"):
        unit_of(name, "row")


def test_coarser_granularity_gives_each_unit_one_width():
    model = elastic_tiny(layers=3)
    layers = elastic_layers(model)
    scale = {n: 8.0 for n in layers if ".1.self_attn." in n}  # block 1's attention is fragile
    table = synthetic_table(model, scale)
    avg = 3.6
    plans = {g: plan_from_table(table, avg_bits=avg, granularity=g)
             for g in ("layer", "sublayer", "block")}
    for g, plan in plans.items():
        assert plan.granularity == g and plan.bits_per_weight <= avg and plan.exact
        assert list(plan) == list(layers)
        units = {}
        for n, b in plan.items():
            units.setdefault(unit_of(n, g), set()).add(b)
        assert all(len(v) == 1 for v in units.values())
    # more freedom never predicts worse, and the fragile sublayer gets more bits than the rest
    assert plans["layer"].predicted_kl <= plans["sublayer"].predicted_kl
    assert plans["sublayer"].predicted_kl <= plans["block"].predicted_kl
    sub = plans["sublayer"]
    assert sub["model.layers.1.self_attn.q_proj"] > sub["model.layers.1.mlp.up_proj"]


def test_auto_granularity_keeps_the_candidate_with_least_measured_kl(model):
    table = synthetic_table(model)
    ids = token_ids(4, 16)
    plan = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, in_context=False)
    assert plan.checked_kl and set(plan.checked_kl) <= {"layer", "sublayer", "block"}
    assert plan.label == plan.granularity == min(plan.checked_kl, key=plan.checked_kl.get)
    fixed = quept.api.plan(model, table, avg_bits=3.6, granularity=plan.granularity)
    assert dict(fixed) == dict(plan)
    # the measured KL is the real one of that configuration
    (kl,) = configuration_kl(model, ids, [plan])
    assert kl == pytest.approx(plan.checked_kl[plan.granularity], rel=1e-5)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.granularity == plan.granularity and again.checked_kl == plan.checked_kl
    with pytest.raises(ConfigError, match="pass check_ids"):
        quept.api.plan(model, table, avg_bits=3.6)


def test_unit_swap_kl_is_the_kl_of_the_swapped_configuration():
    model = elastic_tiny(layers=2)
    layers = elastic_layers(model)
    units = {}
    for n in layers:
        units.setdefault(unit_of(n, "sublayer"), []).append(n)
    ids = token_ids(3, 16)
    quept.set_bits(model, 6)
    kl_base, deltas = unit_swap_kl(model, ids, units, 3, 2, progress=False)
    assert list(deltas) == list(units) and len(deltas) == 4
    configs = [3] + [{n: 2 if n in names else 3 for n in layers} for names in units.values()]
    direct = configuration_kl(model, ids, configs, batch_size=3)
    assert kl_base == pytest.approx(direct[0], rel=1e-4)
    for d, kl in zip(deltas.values(), direct[1:]):
        assert kl_base + d == pytest.approx(kl, rel=1e-4)
        assert d > 0  # fewer bits in one unit: further from the float model
    assert all(m.bits == 6 for m in layers.values())  # widths restored
    with pytest.raises(ConfigError, match="one block"):
        unit_swap_kl(model, ids, {"both": [next(iter(layers)), list(layers)[-1]]}, 3, 2)


def _three_blocks() -> tuple[SensitivityTable, float]:
    """A synthetic table of a 3-block model and its uniform W3 stored bits per weight."""
    table = synthetic_table(elastic_tiny(layers=3))
    n = sum(s.numel for s in table.shapes.values())
    return table, sum(round(s.numel * stored_bits_per_weight(3, 16, s.in_features))
                      for s in table.shapes.values()) / n


def test_plan_from_swaps_moves_the_cheapest_units_within_the_budget():
    table, w3 = _three_blocks()
    # every block costs as much when it goes down to 2 bits, but block 1 least
    deltas = {"model.layers.0": 0.5, "model.layers.1": 0.1, "model.layers.2": 0.3}
    assert bracketing_widths(table, avg_bits=w3 - 0.05) == (2, 3)
    assert bracketing_widths(table, avg_bits=w3) == (3, 4)
    assert bracketing_widths(table, avg_bits=20.0) == (8, None)
    down = plan_from_swaps(table, 3, 2, deltas, 1.0, avg_bits=w3 - 0.05)
    assert down.bits_per_weight <= w3 - 0.05 and down.search == "from W3"
    assert down.label == "block, from W3" and down.predicted_kl == pytest.approx(1.1)
    assert {b for n, b in down.items() if ".1." in n} == {2}
    assert {b for n, b in down.items() if ".1." not in n} == {3}
    # going up, the most negative deltas are bought first
    up = plan_from_swaps(table, 2, 3, {k: -v for k, v in deltas.items()}, 2.0,
                         avg_bits=w3 - 0.05)
    assert {b for n, b in up.items() if ".1." in n} == {2}
    assert up.predicted_kl == pytest.approx(2.0 - 0.8)
    assert Plan.from_dict(json.loads(json.dumps(up.to_dict()))).label == "block, from W2"
    with pytest.raises(ConfigError, match="no unit"):
        plan_from_swaps(table, 3, 2, {"model.layers.0": 0.5}, 1.0, avg_bits=w3 - 0.05)


def test_plan_from_moves_buys_one_block_up_with_another_down():
    table, w3 = _three_blocks()
    # inside W3: block 0 gains a lot at W4, block 1 loses little at W2, block 2 a lot
    down = {"model.layers.0": 0.5, "model.layers.1": 0.05, "model.layers.2": 0.9}
    up = {"model.layers.0": -0.4, "model.layers.1": -0.01, "model.layers.2": -0.02}
    p = plan_from_moves(table, 3, {2: down, 4: up}, 1.0, avg_bits=w3,
                        search="from W3 to W2 or W4")
    assert p.bits_per_weight <= w3 and p.label == "block, from W3 to W2 or W4"
    assert [{b for n, b in p.items() if f".{k}." in n} for k in range(3)] == [{4}, {2}, {3}]
    assert p.predicted_kl == pytest.approx(1.0 - 0.4 + 0.05)
    # with one width to move to, just under W3 the cheapest block goes down
    one = plan_from_moves(table, 3, {2: down}, 1.0, avg_bits=w3 - 0.05)
    assert [{b for n, b in one.items() if f".{k}." in n} for k in range(3)] == [{3}, {2}, {3}]
    assert one.predicted_kl == pytest.approx(1.05)
    with pytest.raises(ConfigError, match="other units"):
        plan_from_moves(table, 3, {2: down, 4: {"model.layers.0": -0.4}}, 1.0, avg_bits=w3)
    for moves in ({}, {3: down}):
        with pytest.raises(ConfigError, match="at least one width other than W3"):
            plan_from_moves(table, 3, moves, 1.0, avg_bits=w3)


def test_swap_means_takes_both_contexts_and_names_its_search():
    table, w3 = _three_blocks()
    # inside W2, block 0 gains most going up; inside W3, block 2 loses most going down
    up = {"model.layers.0": -0.5, "model.layers.1": -0.1, "model.layers.2": -0.3}
    down = {"model.layers.0": 0.1, "model.layers.1": 0.2, "model.layers.2": 0.9}
    means = swap_means(up, down)
    assert means == pytest.approx({"model.layers.0": -0.3, "model.layers.1": -0.15,
                                   "model.layers.2": -0.6})
    p = plan_from_swaps(table, 2, 3, means, 2.0, avg_bits=w3 - 0.05, search="from W2+W3")
    assert p.label == "block, from W2+W3"
    assert {b for n, b in p.items() if ".2." in n} == {3}  # the largest mean gain is bought
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))).label == "block, from W2+W3"
    with pytest.raises(ConfigError, match="different units"):
        swap_means(up, {"model.layers.0": 0.1})


def test_auto_adds_the_in_context_candidates(model):
    table = synthetic_table(model)
    ids = token_ids(4, 16)
    cache = {}
    lo, hi = bracketing_widths(table, avg_bits=3.6)  # group 16: W3 stores 4.19 bits
    assert (lo, hi) == (2, 3)
    plan = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=cache)
    assert set(cache) == {(lo, hi), (hi, lo), (hi, 4)}
    assert plan.label == min(plan.checked_kl, key=plan.checked_kl.get)
    assert set(plan.checked_kl) - {"layer", "sublayer", "block"} <= {
        f"block, from W{lo}", f"block, from W{hi}", f"block, from W{lo}+W{hi}",
        f"block, from W{hi} to W{lo} or W4"}
    one_way = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=cache,
                             both_ways=False)
    assert "block, from W3 to W2 or W4" not in one_way.checked_kl
    assert min(plan.checked_kl.values()) <= min(one_way.checked_kl.values())
    (kl,) = configuration_kl(model, ids, [plan])
    assert kl == pytest.approx(plan.checked_kl[plan.label], rel=1e-5)
    cands = quept.api.plan_candidates(model, table, avg_bits=3.6, check_ids=ids, cache=cache)
    assert list(cands) == list(plan.checked_kl) and dict(cands[plan.label]) == dict(plan)
    table_only = quept.api.plan_candidates(model, table, avg_bits=3.6, in_context=False)
    assert table_only and set(table_only) <= {"layer", "sublayer", "block"}
    assert {k: dict(v) for k, v in table_only.items()} == {
        k: dict(v) for k, v in cands.items() if k in table_only}
    with pytest.raises(ConfigError, match="pass them, or in_context=False"):
        quept.api.plan_candidates(model, table, avg_bits=3.6)
    cache[lo, hi] = (0.0, {"model.layers.9": -1.0})  # naming no block of the model:
    quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=cache)  # measured again
    assert set(cache[lo, hi][1]) == {unit_of(n, "block") for n in table.shapes}


def test_the_uniform_width_below_the_budget_is_a_candidate():
    model = elastic_tiny(layers=3)  # at 3.6 bits the block plan puts one block at W3
    table = synthetic_table(model)
    uniform = plan_uniform(table, 2, avg_bits=3.6)
    assert set(uniform.values()) == {2} and uniform.label == "block, uniform W2"
    assert uniform.bits_per_weight == quept.api.plan_record(model, {"*": 2}).bits_per_weight
    assert uniform.predicted_kl == pytest.approx(sum(table.cost(n, 2) for n in table.shapes))
    with pytest.raises(InfeasibleBudgetError, match="uniform W3"):
        plan_uniform(table, 3, avg_bits=3.6)  # group 16: W3 stores 4.19 bits
    pinned = plan_uniform(table, 2, avg_bits=3.6, constraints=["model.layers.0.mlp.*=3"])
    assert {b for n, b in pinned.items() if ".mlp." in n and ".layers.0." in n} == {3}
    assert pinned.constraints == ("model.layers.0.mlp.*=3",)
    cands = quept.api.plan_candidates(model, table, avg_bits=3.6, in_context=False)
    assert "block, uniform W2" in cands
    ids = token_ids(4, 16)
    plan = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, in_context=False)
    (kl_w2,) = configuration_kl(model, ids, [2])  # the candidate is measured, like the others
    assert plan.checked_kl["block, uniform W2"] == pytest.approx(kl_w2, rel=1e-6)


def test_configuration_kl_is_zero_for_float_and_grows_as_bits_fall(model):
    ids = token_ids(2, 16)
    quept.set_bits(model, 5)
    kl = configuration_kl(model, ids, [None, 8, 4, 2])
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < kl[1] < kl[2] < kl[3]
    assert all(m.bits == 5 for m in elastic_layers(model).values())  # widths restored


def test_plans_written_before_granularity_read_as_layer(model):
    d = plan_from_table(synthetic_table(model), avg_bits=3.6).to_dict()
    for k in ("granularity", "checked_kl", "search"):
        d.pop(k)
    old = Plan.from_dict(d)
    assert old.granularity == "layer" and old.checked_kl is None and old.search == "table"
    with pytest.raises(ConfigError, match="granularity 'row'"):
        Plan.from_dict({**d, "granularity": "row"})
    with pytest.raises(ConfigError, match="malformed field"):
        Plan.from_dict({**d, "checked_kl": [0.1]})


def test_read_widths_accepts_bare_mappings_and_quept_plans(tmp_path):
    p = tmp_path / "p.json"
    for doc in ({"a": 3, "b": 4}, {"plan": {"a": 3, "b": 4}}, {"bits": {"a": 3, "b": 4}},
                Plan({"a": 3, "b": 4}, 3.5, 100.0, 200).to_dict()):
        p.write_text(json.dumps(doc))
        assert read_widths(p) == {"a": 3, "b": 4}
    p.write_text(json.dumps({"plan": {"a": 3, "b": "4"}}))
    with pytest.raises(ConfigError, match="""entry 'b' is "4", not a whole number of bits"""):
        read_widths(p)
    p.write_text(json.dumps({"format": "quept-plan", "bits": {"a": 3}}))  # a damaged plan
    with pytest.raises(ConfigError, match="quept plan"):
        read_widths(p)


def test_plan_record_of_hand_chosen_widths_counts_what_a_plan_does(model):
    """A hand-written {layer: bits} recorded as a Plan stores what quept plan's allocation
    counts for the same widths: same bits per weight, same bytes, and it applies the same."""
    table = synthetic_table(model)
    made = plan_from_table(table, avg_bits=4.0)
    record = quept.plan_record(model, dict(made.widths))
    assert record.widths == made.widths and record.search == "by hand"
    assert record.bits_per_weight == pytest.approx(made.bits_per_weight)
    assert record.stored_bytes == made.stored_bytes and record.n_weights == made.n_weights
    assert record.predicted_kl is None and record.budget == {}
    assert Plan.from_dict(record.to_dict()).widths == made.widths  # saves as a quept plan
    names = list(made.widths)
    with pytest.raises(ConfigError, match="1 layer missing"):
        quept.plan_record(model, {n: 4 for n in names[1:]})
    with pytest.raises(ConfigError, match=f"layer {names[0]}: bit-width 9 is outside 2..8"):
        quept.plan_record(model, {**made.widths, names[0]: 9})


def test_pattern_plans_apply_in_order_and_refuse_what_matches_nothing(model, tmp_path):
    """``{"*": 3, "*.mlp.down_proj": 5, NAME: 8}``: every layer at 3 bits, then the down
    projections at 5, then one layer at 8; a later entry wins where two match."""
    layers = list(elastic_layers(model))
    down = [n for n in layers if n.endswith("mlp.down_proj")]
    assert down and len(down) < len(layers)
    first = layers[0]
    plan = {"*": 3, "*.mlp.down_proj": 5, first: 8}
    quept.set_bits(model, plan)
    got = {n: m.bits for n, m in elastic_layers(model).items()}
    assert got == {n: 8 if n == first else 5 if n in down else 3 for n in layers}
    quept.set_bits(model, {first: 8, "*": 3})  # the pattern comes later, so it wins
    assert {m.bits for m in elastic_layers(model).values()} == {3}
    record = quept.plan_record(model, plan)  # bits per weight of the expanded plan
    assert record.widths == got and record.search == "by hand"
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(plan))
    assert read_widths(path) == plan  # kept as written: expanded when it meets a model
    with pytest.raises(ConfigError, match=r"'\*\.mlp\.down_prj' matches no layer"):
        quept.set_bits(model, {"*": 3, "*.mlp.down_prj": 5})
    with pytest.raises(ConfigError, match=r"layers missing .*add a first entry \"\*\""):
        quept.set_bits(model, {"*.mlp.down_proj": 5})
    with pytest.raises(ConfigError, match="bit-width 9 is outside 2..8"):
        quept.set_bits(model, {"*": 9})
    path.write_text(json.dumps({"*": 3, "*.mlp.down_proj": 12}))
    with pytest.raises(ConfigError, match=r"entry '\*\.mlp\.down_proj': bit-width 12"):
        read_widths(path)


def test_a_plans_own_bits_per_weight_admits_it():
    """A budget equal to the stored bits per weight a plan reports (size / n, a float that can
    fall an ulp below the true ratio) admits that plan: here "a" at 2 bits and "b" at 3, over
    many shapes of "a", where anything cheaper by the table would not fit."""
    from quept.search.budget import layer_bits

    bits = (2, 3, 4)
    for rows in range(1, 300):
        shapes = {"a": LayerShape(rows, 64), "b": LayerShape(7, 64)}
        table = SensitivityTable(bits=bits, group_size={b: 16 for b in bits}, shapes=shapes,
                                 kl={n: (4.0, 2.0, 1.0) for n in shapes}, fingerprint="t")
        size = layer_bits(shapes["a"], 2, 16) + layer_bits(shapes["b"], 3, 16)
        plan = plan_from_table(table, avg_bits=size / (64 * (rows + 7)))
        assert plan.predicted_kl <= 6.0, rows  # one layer at 3 bits fits


def test_split_blocks_names_the_blocks_a_plan_splits():
    from quept.search.plan import split_blocks, split_warning

    widths = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 4,
              "model.layers.1.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 2,
              "model.layers.2.self_attn.q_proj": 8, "model.layers.2.mlp.down_proj": None}
    assert split_blocks(widths) == ["model.layers.0", "model.layers.2"]
    assert "gives the linears of 2 blocks different widths (e.g. model.layers.0)" in (
        split_warning(widths, "plan.json"))
    assert split_warning({k: 3 for k in widths}, "plan.json") is None


def test_inline_plans_read_like_hand_written_ones(tmp_path):
    from quept.search.plan_files import read_plan

    assert read_plan("*=3, model.layers.0.*=8") == {"*": 3, "model.layers.0.*": 8}
    assert list(read_plan("b=4,a=2")) == ["b", "a"]  # in the order given
    with pytest.raises(ConfigError, match=r"inline plan '\*=9': entry '\*': bit-width 9"):
        read_plan("*=9")
    with pytest.raises(ConfigError, match=r"cannot read an inline plan from '\*=3,,a=2' "
                                          r"\(at ''\)"):
        read_plan("*=3,,a=2")
    with pytest.raises(FileNotFoundError, match="plan file budget=3.json does not exist"):
        read_plan("budget=3.json")  # a missing file, not an inline plan
    (tmp_path / "a=3").write_text(json.dumps({"*": 5}))
    assert read_plan(tmp_path / "a=3") == {"*": 5}  # a file wins over the inline reading


def test_move_kl_is_the_kl_of_the_moved_configuration():
    model = elastic_tiny(layers=2)
    layers = list(elastic_layers(model))
    base = {n: (3, 4)[i % 2] for i, n in enumerate(layers)}  # a mixed plan
    moves = {("model.layers.1", -1): {n: base[n] - 1 for n in layers if ".1." in n},
             ("model.layers.0", 1): {n: base[n] + 1 for n in layers if ".0." in n}}
    ids = token_ids(3, 16)
    quept.set_bits(model, 6)
    kl_base, deltas = move_kl(model, ids, base, moves, progress=False)
    configs = [base] + [{**base, **m} for m in moves.values()]
    direct = configuration_kl(model, ids, configs, batch_size=3)
    assert kl_base == pytest.approx(direct[0], rel=1e-4)
    for d, kl in zip(deltas.values(), direct[1:]):
        assert kl_base + d == pytest.approx(kl, rel=1e-4)
    assert deltas[("model.layers.1", -1)] > 0 > deltas[("model.layers.0", 1)]
    assert all(m.bits == 6 for m in elastic_layers(model).values())  # widths restored
    with pytest.raises(ConfigError, match="one block"):
        move_kl(model, ids, base, {"both": {layers[0]: 2, layers[-1]: 2}})


def test_neighbour_moves_step_each_linear_within_its_constraints():
    table, _ = _three_blocks()
    widths = {n: 3 for n in table.shapes}
    widths.update({n: 8 for n in table.shapes if ".layers.2." in n})
    widths.update({n: 2 for n in table.shapes if ".layers.1." in n})
    moves = neighbour_moves(table, widths)
    assert set(moves) == {("model.layers.0", -1), ("model.layers.0", 1),
                          ("model.layers.1", 1), ("model.layers.2", -1)}  # no W1, no W9
    assert set(moves["model.layers.0", 1].values()) == {4}
    assert set(moves["model.layers.2", -1].values()) == {7}
    # a linear whose constraints allow no step stays out of the move
    cons = ["model.layers.0.mlp.*=3", "model.layers.0.self_attn.*<=3", "model.layers.1.mlp.*>=5"]
    pinned = {**widths, **{n: 5 for n in table.shapes if ".layers.1.mlp." in n}}
    moves = neighbour_moves(table, pinned, constraints=cons)
    assert ("model.layers.0", 1) not in moves  # every linear of block 0 is at its ceiling
    assert moves["model.layers.0", -1] == {
        n: 2 for n in table.shapes if ".layers.0.self_attn." in n}
    assert ("model.layers.1", -1) not in moves  # attention at W2, the MLP at its floor W5
    assert moves["model.layers.1", 1] == {
        n: 6 if ".mlp." in n else 3 for n in table.shapes if ".layers.1." in n}
    with pytest.raises(ConfigError, match="leaves out"):
        neighbour_moves(table, {next(iter(table.shapes)): 3})


def test_plan_from_neighbours_takes_the_best_moves_within_the_budget():
    table, w3 = _three_blocks()
    widths = {n: 3 for n in table.shapes}
    moves = neighbour_moves(table, widths)
    deltas = {m: 1.0 for m in moves}  # every move costs, but two help:
    deltas["model.layers.0", 1] = -0.5  # block 0 up gains, and block 2 down costs little
    deltas["model.layers.2", -1] = 0.1
    p = plan_from_neighbours(table, widths, moves, deltas, 2.0, avg_bits=w3,
                             search="from W3, refined x1")
    assert p.bits_per_weight <= w3 and p.label == "block, from W3, refined x1"
    assert [{b for n, b in p.items() if f".{k}." in n} for k in range(3)] == [{4}, {3}, {2}]
    assert p.predicted_kl == pytest.approx(2.0 - 0.5 + 0.1)
    # a penalty per move makes the pair too dear (-0.5 + 0.1 + 2 x 0.3 > 0), not a smaller one;
    # the prediction leaves the penalty out
    assert dict(plan_from_neighbours(table, widths, moves, deltas, 2.0, avg_bits=w3,
                                     penalty=0.3)) == widths
    cheap = plan_from_neighbours(table, widths, moves, deltas, 2.0, avg_bits=w3, penalty=0.1)
    assert dict(cheap) == dict(p) and cheap.predicted_kl == pytest.approx(p.predicted_kl)
    with pytest.raises(ConfigError, match="penalty"):
        plan_from_neighbours(table, widths, moves, deltas, 2.0, avg_bits=w3, penalty=-1)
    # with nothing that helps, the plan stays as it is
    still = plan_from_neighbours(table, widths, moves, dict.fromkeys(moves, 1.0), 2.0,
                                 avg_bits=w3)
    assert dict(still) == widths and still.predicted_kl == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="not measured"):
        plan_from_neighbours(table, widths, moves, {}, 2.0, avg_bits=w3)


def test_refine_moves_a_lopsided_plan_and_keeps_only_a_lower_measured_kl(monkeypatch):
    model = elastic_tiny(layers=2)
    table = synthetic_table(model)
    ids = token_ids(4, 16)
    lopsided = quept.api.plan_record(model, {"model.layers.0.*": 2, "model.layers.1.*": 4})
    lopsided = dataclasses.replace(lopsided, granularity="block", search="lopsided")
    monkeypatch.setattr(quept.api.mixed, "plan_candidates", lambda *a, **k: {lopsided.label: lopsided})
    budget = lopsided.bits_per_weight  # W2 + W4 stores what W3 + W3 does
    same = quept.api.plan(model, table, avg_bits=budget, check_ids=ids)
    assert dict(same) == dict(lopsided) and same.label == "block, lopsided"
    refined = quept.api.plan(model, table, avg_bits=budget, check_ids=ids, refine=3)
    assert refined.histogram() == {3: len(lopsided)}  # block 0 up, block 1 down
    label = "block, lopsided, refined x1 (2 moves)"
    assert refined.label == label and refined.bits_per_weight <= budget
    kls = refined.checked_kl
    assert list(kls)[:2] == ["block, lopsided", label]
    assert kls[label] < kls["block, lopsided"]
    assert refined.label == min(kls, key=kls.get)  # a later round, if any, did not lower it
    (kl,) = configuration_kl(model, ids, [refined])
    assert kl == pytest.approx(kls[refined.label], rel=1e-5)  # the KL recorded is the plan's
    again = Plan.from_dict(json.loads(json.dumps(refined.to_dict())))
    assert again.label == refined.label
    for bad, match in (({"refine": -1}, "refine must be an integer >= 0"),
                       ({"refine": 1, "granularity": "block"}, "measures none")):
        with pytest.raises(ConfigError, match=match):
            quept.api.plan(model, table, avg_bits=budget, check_ids=ids, **bad)


def test_a_round_whose_moves_interact_falls_back_to_fewer_moves(monkeypatch):
    model = elastic_tiny(layers=3)
    table = synthetic_table(model)
    w3 = quept.api.plan_record(model, 3)
    base = dataclasses.replace(w3, granularity="block", search="uniform W3")
    # the budget has room for two blocks at W4: block 0 gains most, then block 1
    budget = quept.api.plan_record(model, {"*": 3, "model.layers.0.*": 4,
                                           "model.layers.1.*": 4}).bits_per_weight
    gain = {"model.layers.0": -0.5, "model.layers.1": -0.4, "model.layers.2": -0.1}

    def fake_moves(model, ids, widths, moves, **kw):
        return 1.0, {m: gain[m[0]] if m[1] > 0 else 1.0 for m in moves}

    def fake_kl(model, ids, configs, **kw):  # the two moves together are worse than none
        return [1.0 if "refined" not in c.search else 1.2 if "(2 moves)" in c.search else 0.6
                for c in configs]

    monkeypatch.setattr(quept.api.mixed, "plan_candidates", lambda *a, **k: {base.label: base})
    monkeypatch.setattr(quept.api.mixed, "move_kl", fake_moves)
    monkeypatch.setattr(quept.api.mixed, "configuration_kl", fake_kl)
    plan = quept.api.plan(model, table, avg_bits=budget, check_ids=token_ids(2, 8), refine=1)
    assert plan.checked_kl == {"block, uniform W3": 1.0,
                               "block, uniform W3, refined x1 (2 moves)": 1.2,
                               "block, uniform W3, refined x1 (1 move)": 0.6}
    assert plan.label == "block, uniform W3, refined x1 (1 move)"
    assert plan.refinement.words() == ("refinement (up to 1 round): round 1 kept 1 of 2 moves "
                                       "(2 tries); 1 block move(s) kept in all")
    assert [{b for n, b in plan.items() if f".{k}." in n} for k in range(3)] == [{4}, {3}, {3}]
    assert plan.predicted_kl == pytest.approx(1.0 - 0.5)


def test_what_refinement_did_is_recorded_even_when_it_changed_nothing(monkeypatch, tmp_path):
    # before: a refinement that kept nothing left no trace in the plan (an INFO log line only)
    from quept.info import describe, render
    from quept.search.refinement import Refinement, RefineRound

    model = elastic_tiny(layers=3)
    table = synthetic_table(model)
    w3 = dataclasses.replace(quept.api.plan_record(model, 3), granularity="block",
                             search="uniform W3")
    budget = quept.api.plan_record(model, {"*": 3, "model.layers.0.*": 4,
                                           "model.layers.1.*": 4}).bits_per_weight
    gains = {"model.layers.0": -0.5, "model.layers.1": -0.4, "model.layers.2": -0.1}
    monkeypatch.setattr(quept.api.mixed, "plan_candidates", lambda *a, **k: {w3.label: w3})
    monkeypatch.setattr(quept.api.mixed, "configuration_kl", lambda model, ids, configs, **k: [
        1.0 if "refined" not in c.search else 1.5 for c in configs])  # no try helps
    for gain, rounds in ((1.0, (RefineRound(1, 0, 0),)),  # no move predicted to help
                         (None, (RefineRound(1, 2, 2),))):  # 2 moves, then 1: none helped
        monkeypatch.setattr(quept.api.mixed, "move_kl", lambda model, ids, widths, moves, g=gain,
                            **kw: (1.0, {m: g or gains[m[0]] if m[1] > 0 else 1.0 for m in moves}))
        plan = quept.api.plan(model, table, avg_bits=budget, check_ids=token_ids(2, 8),
                              refine=2)
        assert plan.label == w3.label and plan.refinement == Refinement(2, rounds)
        path = plan.save(tmp_path / "plan.json")
        assert Plan.load(path).refinement == plan.refinement
        info = describe(path)
        assert info["refinement"] == plan.refinement.to_dict()
        assert plan.refinement.words() in render(info)
    assert plan.refinement.words() == ("refinement (up to 2 rounds): round 1: 2 tries of up to "
                                       "2 moves, none helped; the plan is unchanged")
    assert Refinement(2, (RefineRound(1, 0, 0),)).words() == (
        "refinement (up to 2 rounds): round 1: no move predicted to help, nothing measured; "
        "the plan is unchanged")
    assert quept.api.plan(model, table, avg_bits=budget, check_ids=token_ids(2, 8)
                          ).refinement is None


def test_a_smaller_budgets_plan_is_a_candidate_at_a_larger_one(monkeypatch):
    model = elastic_tiny(layers=2)
    table = synthetic_table(model)
    ids = token_ids(4, 16)
    w3 = dataclasses.replace(quept.api.plan_record(model, 3), granularity="block",
                             search="uniform W3", budget={"avg_bits": 3.3})
    w2 = dataclasses.replace(quept.api.plan_record(model, 2), granularity="block",
                             search="uniform W2")
    budget = w3.bits_per_weight + 0.2
    # the only candidate found at the larger budget measures worse than the smaller one's plan
    monkeypatch.setattr(quept.api.mixed, "plan_candidates", lambda *a, **k: {w2.label: w2})
    alone = quept.api.plan(model, table, avg_bits=budget, check_ids=ids)
    assert dict(alone) == dict(w2)
    plan = quept.api.plan(model, table, avg_bits=budget, check_ids=ids, earlier=[w3])
    label = "block, uniform W3 (the 3.3-bit plan's)"
    assert dict(plan) == dict(w3) and plan.label == label
    assert plan.checked_kl[label] < plan.checked_kl["block, uniform W2"]
    assert plan.budget == {"avg_bits": budget} and plan.bits_per_weight == w3.bits_per_weight
    assert plan.predicted_kl == pytest.approx(sum(table.cost(n, 3) for n in table.shapes))
    again = plan_within(table, plan, avg_bits=budget + 1)
    assert again.label == label  # kept again, it still names the budget it was made for
    # a plan that does not fit the budget, or breaks a constraint, is no candidate
    assert plan_within(table, w3, avg_bits=w2.bits_per_weight + 0.1) is None
    assert plan_within(table, w3, avg_bits=budget,
                       constraints=["model.layers.0.*>=4"]) is None
    w4 = dataclasses.replace(quept.api.plan_record(model, 4), budget={"avg_bits": 4.4})
    plan = quept.api.plan(model, table, avg_bits=budget, check_ids=ids, earlier=[w3, w4])
    assert not any("4.4-bit" in k for k in plan.checked_kl)
    two = dataclasses.replace(w3, widths={**w3.widths, "model.layers.1.mlp.down_proj": 2})
    plan = quept.api.plan(model, table, avg_bits=budget, check_ids=ids, earlier=[w3, two])
    assert {label, label + " #2"} <= set(plan.checked_kl)  # made alike, both measured
    for bad, match in (([w3.widths], "earlier must hold Plan objects"),
                       ([dataclasses.replace(w3, widths={"x": 3})], "other layers"),
                       ([dataclasses.replace(w3, objective="class-kl")], "measures class-kl")):
        with pytest.raises(ConfigError, match=match):
            quept.api.plan(model, table, avg_bits=budget, check_ids=ids, earlier=bad)
    with pytest.raises(ConfigError, match="measures none"):
        quept.api.plan(model, table, avg_bits=budget, granularity="block", earlier=[w3])
