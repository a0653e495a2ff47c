import json

import numpy as np
import pytest
import torch

import quept
from quept.nn import elastic_layers
from quept.search import SensitivityConfig, SensitivityTable, estimate_sensitivity
from quept.search.exact import exact_sensitivity
from quept.search.table import SensitivityCacheError
from tests.search.helpers import elastic_tiny, token_ids

CFG = SensitivityConfig(n_probes=16)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def model():
    return elastic_tiny()


@pytest.fixture(scope="module")
def fast(model):
    return estimate_sensitivity(model, token_ids(), CFG, progress=False)


@pytest.fixture(scope="module")
def exact(model):
    return exact_sensitivity(model, token_ids(), progress=False)


def test_fast_estimate_agrees_with_the_exact_kl(fast, exact):
    names = list(exact)
    a = np.array([fast.kl[n] for n in names])
    b = np.array([exact[n] for n in names])
    assert spearman(a.ravel(), b.ravel()) > 0.95
    # Each layer's 2-bit cost within 35% of the exact KL (second order, 4 x 24 probes).
    assert np.all(np.abs(a[:, 0] / b[:, 0] - 1) < 0.35), (a[:, 0], b[:, 0])
    # Summed over layers the costs fall with every extra bit, like the exact ones.
    assert np.all(np.diff(a.sum(0)) < 0) and np.all(np.diff(b.sum(0)) < 0)


def test_reference_width_costs_zero_and_others_are_relative(model):
    fast = estimate_sensitivity(model, token_ids(), SensitivityConfig(n_probes=8,
                                reference_bits=4), progress=False)
    k = fast.bits.index(4)
    assert all(row[k] == 0.0 for row in fast.kl.values())
    assert all(row[0] > 0 > row[-1] for row in fast.kl.values())  # W2 worse, W8 better than W4
    exact = exact_sensitivity(model, token_ids(), bits=(2, 8), reference_bits=4, progress=False)
    assert all(w2 > 0 > w8 for w2, w8 in exact.values())
    names = list(exact)
    assert spearman([fast.cost(n, 2) for n in names], [exact[n][0] for n in names]) > 0.8


def test_measuring_leaves_the_model_as_it_was():
    model = elastic_tiny()
    quept.set_bits(model, {n: 3 if i % 2 else 5 for i, n in enumerate(elastic_layers(model))})
    before = {n: m.bits for n, m in elastic_layers(model).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate_sensitivity(model, token_ids(2, 8), SensitivityConfig(n_probes=2), progress=False)
    exact_sensitivity(model, token_ids(2, 8), bits=(2,), progress=False)
    assert {n: m.bits for n, m in elastic_layers(model).items()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_same_seed_same_table_other_seed_differs(model):
    ids = token_ids(2, 8)
    a = estimate_sensitivity(model, ids, SensitivityConfig(n_probes=2), progress=False)
    b = estimate_sensitivity(model, ids, SensitivityConfig(n_probes=2), progress=False)
    c = estimate_sensitivity(model, ids, SensitivityConfig(n_probes=2, seed=1), progress=False)
    assert a.kl == b.kl and a.fingerprint == b.fingerprint
    assert a.kl != c.kl and a.fingerprint != c.fingerprint


def test_table_json_round_trip_and_errors(fast, tmp_path):
    path = fast.save(tmp_path / "s.json")
    again = SensitivityTable.load(path)
    assert again.kl == fast.kl and again.shapes == fast.shapes
    assert again.group_size == fast.group_size and again.fingerprint == fast.fingerprint
    d = json.loads(path.read_text())
    d["layers"][next(iter(d["layers"]))]["kl"].pop()
    path.write_text(json.dumps(d))
    with pytest.raises(SensitivityCacheError, match="do not match widths"):
        SensitivityTable.load(path)
    path.write_text("{")
    with pytest.raises(SensitivityCacheError, match="is not valid JSON"):
        SensitivityTable.load(path)
    d = fast.to_dict()
    first = next(iter(d["layers"]))
    d["layers"][first]["kl"][0] = float("nan")  # json writes NaN, and reads it back
    path.write_text(json.dumps(d))
    with pytest.raises(SensitivityCacheError, match=f"the costs of {first} are not all finite"):
        SensitivityTable.load(path)


def test_a_cost_that_is_not_finite_stops_with_the_layer_and_width_named():
    model = elastic_tiny()
    name, layer = list(elastic_layers(model).items())[3]
    with torch.no_grad():
        layer.clip_hi["2"].fill_(float("nan"))  # only the 2-bit grid of this layer breaks
    with pytest.raises(FloatingPointError, match=f"sensitivity of {name} at 2 bits is nan"):
        estimate_sensitivity(model, token_ids(), progress=False)


def test_cache_is_reused_only_for_the_same_state_data_and_settings(tmp_path):
    model = elastic_tiny()
    ids, cfg, cache = token_ids(2, 8), SensitivityConfig(n_probes=2), tmp_path / "s.json"
    quept.api.sensitivity(model, ids, cfg, cache=cache, progress=False)
    d = json.loads(cache.read_text())
    first = next(iter(d["layers"]))
    d["layers"][first]["kl"][0] = 123.0  # a marker: only a reused table carries it
    cache.write_text(json.dumps(d))
    reused = quept.api.sensitivity(model, ids, cfg, cache=cache, progress=False)
    assert reused.kl[first][0] == 123.0
    for changed in (
        dict(input_ids=token_ids(2, 8, seed=9), config=cfg),
        dict(input_ids=ids, config=SensitivityConfig(n_probes=3)),
    ):
        cache.write_text(json.dumps(d))
        table = quept.api.sensitivity(model, progress=False, cache=cache, **changed)
        assert table.kl[first][0] != 123.0
    cache.write_text(json.dumps(d))
    with torch.no_grad():
        next(iter(elastic_layers(model).values())).clip_hi["3"].add_(0.5)
    assert quept.api.sensitivity(model, ids, cfg, cache=cache, progress=False).kl[first][0] != 123.0


def test_the_table_records_the_shape_it_was_measured_on():
    # before: SensitivityConfig's n_samples and seq_len were recorded (and fingerprinted) as
    # given, whatever inputs were measured
    model, ids = elastic_tiny(), token_ids(2, 8)
    tables = [quept.api.sensitivity(model, ids, cfg, progress=False)
              for cfg in (None, SensitivityConfig(n_samples=32, seq_len=128))]
    assert [(t.settings["n_samples"], t.settings["seq_len"]) for t in tables] == [(2, 8)] * 2
    assert tables[0].fingerprint == tables[1].fingerprint
    assert tables[0].kl == tables[1].kl


def test_rejects_an_unprepared_model_and_a_foreign_reference():
    from quept.config import ConfigError
    from tests.conftest import tiny_model

    with pytest.raises(ConfigError, match="no elastic layers"):
        estimate_sensitivity(tiny_model(), token_ids(), progress=False)
    spec = quept.ElasticSpec(bit_groups=((8,), (4,)), ranks=(2, 2), merge_weights=(0.5, 0.5),
                             default_group_size=16)
    model = tiny_model(num_hidden_layers=1)
    quept.prepare(model, spec)
    with pytest.raises(ConfigError, match="not in this elastic model's widths"):
        estimate_sensitivity(model, token_ids(), SensitivityConfig(reference_bits=3))


def test_the_exact_method_measures_the_slow_protocol_and_records_it(model, exact):
    table = estimate_sensitivity(model, token_ids(), SensitivityConfig(method="exact"),
                                 progress=False)
    assert table.kl == exact  # the same forwards, every layer and width
    assert table.settings["method"] == "exact-forwards"
    assert "n_probes" not in table.settings  # it uses none
    fast = SensitivityConfig().to_dict()  # as before the method existed: cached tables stay
    assert fast == {"method": "gauss-newton-probes", "n_samples": 32, "seq_len": 128,
                    "batch_size": 8, "n_probes": 4, "reference_bits": None,
                    "cache_deltas": True, "seed": 0}
    assert (SensitivityConfig().cache_name, SensitivityConfig(method="exact").cache_name) == (
        "sensitivity.json", "sensitivity-exact.json")
    assert SensitivityConfig(method="exact").batch_size == 32  # no gradients: larger batches
    assert SensitivityConfig(method="exact", batch_size=4).batch_size == 4
    from quept.config import ConfigError

    with pytest.raises(ConfigError, match="method 'slow' is unknown; choose one of fast, exact"):
        SensitivityConfig(method="slow")


def test_a_table_of_one_method_is_not_reused_for_the_other(tmp_path):
    model = elastic_tiny()
    ids, cache = token_ids(2, 8), tmp_path / "s.json"
    fast = quept.api.sensitivity(model, ids, SensitivityConfig(n_probes=2), cache=cache,
                                 progress=False)
    slow = quept.api.sensitivity(model, ids, SensitivityConfig(method="exact"), cache=cache,
                                 progress=False)
    assert slow.fingerprint != fast.fingerprint
    assert slow.kl == exact_sensitivity(model, ids, progress=False)


def test_kept_quantization_errors_are_bounded_and_change_only_the_layers_kept(model,
                                                                           monkeypatch):
    from dataclasses import replace

    from quept.search import sensitivity

    ids, cfg = token_ids(), replace(CFG, batch_size=4)  # several batches: the cache is read
    kept = estimate_sensitivity(model, ids, cfg, progress=False)
    fresh = estimate_sensitivity(model, ids, replace(cfg, cache_deltas=False), progress=False)
    assert kept.kl != fresh.kl  # fp16 errors on the later batches
    per_layer = [2 * len(model.quept_spec.bits) * m.weight.numel()
                 for m in elastic_layers(model).values()]
    monkeypatch.setattr(sensitivity, "DELTA_CACHE_BYTES", 0)
    assert estimate_sensitivity(model, ids, cfg, progress=False).kl == fresh.kl
    half = sum(sorted(per_layer)[: len(per_layer) // 2])  # room for some layers, not all
    monkeypatch.setattr(sensitivity, "DELTA_CACHE_BYTES", half)
    partly = estimate_sensitivity(model, ids, cfg, progress=False).kl
    same_as_kept = [n for n in partly if partly[n] == kept.kl[n]]
    same_as_fresh = [n for n in partly if partly[n] == fresh.kl[n]]
    assert same_as_kept and same_as_fresh
    assert set(same_as_kept) | set(same_as_fresh) == set(partly)
