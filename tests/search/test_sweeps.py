"""In-context sweeps kept on disk (FOLDER/sweeps.json) and reused by later plans."""

import json
import logging

import pytest

import quept
from quept.search import SweepCache
from quept.search.candidates import bracketing_widths
from tests.search.helpers import elastic_tiny, token_ids
from tests.search.test_plan import synthetic_table


@pytest.fixture(scope="module")
def model():
    return elastic_tiny()


def test_sweeps_round_trip_and_stale_or_broken_files_are_measured_again(tmp_path, caplog):
    path = tmp_path / "sweeps.json"
    c = SweepCache(path, "fp1", (16, 128))
    assert len(c) == 0 and not path.exists()
    c[3, 2] = (0.5, {"model.layers.0": 0.25, "model.layers.1": 0.125})
    assert c.measured == 1 and json.loads(path.read_text())["check_shape"] == [16, 128]
    again = SweepCache(path, "fp1")
    assert (3, 2) in again and again.reused == 0  # `in` does not count as a use
    assert again[3, 2] == (0.5, {"model.layers.0": 0.25, "model.layers.1": 0.125})
    assert again.reused == 1 and again.measured == 0
    assert len(SweepCache(path, "another model")) == 0
    assert len(SweepCache(path, "fp1", recompute=True)) == 0
    for broken in ("{", '{"format": "quept-sweeps", "version": 1, "fingerprint": "fp1", '
                   '"sweeps": [{"base": 3, "alt": 2, "kl_base": NaN, "deltas": {}}]}',
                   '{"format": "quept-plan"}', '[1, 2]'):
        path.write_text(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            c = SweepCache(path, "fp1")
        assert len(c) == 0 and "cannot be read as in-context sweeps" in caplog.text
        c[4, 3] = (0.1, {"model.layers.0": 0.0})  # rewritten whole
        assert list(SweepCache(path, "fp1")) == [(4, 3)]


def test_quept_info_describes_a_damaged_sweeps_file_without_failing():
    from quept.search.sweeps import describe_sweeps

    good = {"sweeps": [{"base": 3, "alt": 2}], "check_shape": [16, 128]}
    assert describe_sweeps(good) == {"sweeps": ["W3 -> W2"], "check_shape": [16, 128]}
    for shape in ([1], "16x128", [16, "128"], None):
        assert describe_sweeps({**good, "check_shape": shape})["check_shape"] is None
    assert describe_sweeps({"sweeps": {"base": 3}})["sweeps"] == []


def test_plan_reuses_the_sweeps_kept_on_disk(model, tmp_path, monkeypatch):
    table = synthetic_table(model)
    ids = token_ids(4, 16)
    lo, hi = bracketing_widths(table, avg_bits=3.6)
    path = tmp_path / quept.api.SWEEPS_JSON
    first = quept.sweep_cache(model, ids, path)
    plan = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=first)
    assert first.measured == 3 and first.reused == 0
    kept = json.loads(path.read_text())
    assert {(s["base"], s["alt"]) for s in kept["sweeps"]} == {(lo, hi), (hi, lo), (hi, 4)}

    def no_sweep(*args, **kwargs):
        raise AssertionError("a kept sweep was measured again")

    monkeypatch.setattr(quept.api.mixed, "unit_swap_kl", no_sweep)
    second = quept.sweep_cache(model, ids, path)
    again = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=second)
    assert second.reused == 3 and second.measured == 0
    assert dict(again) == dict(plan) and again.checked_kl == pytest.approx(plan.checked_kl)
    # other check tokens or a recompute measure again
    for cache in (quept.sweep_cache(model, token_ids(4, 16, seed=2), path),
                  quept.sweep_cache(model, ids, path, recompute=True)):
        assert len(cache) == 0
        with pytest.raises(AssertionError, match="measured again"):
            quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=cache)


def test_a_kept_sweep_naming_other_units_is_measured_again(model, tmp_path, caplog):
    """A sweeps file whose fingerprint is intact but whose units are not the model's blocks
    (edited, or damaged) is measured again with a warning, not taken or failed on."""
    table = synthetic_table(model)
    ids = token_ids(4, 16)
    path = tmp_path / quept.api.SWEEPS_JSON
    plan = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids,
                          cache=quept.sweep_cache(model, ids, path))
    d = json.loads(path.read_text())
    deltas = d["sweeps"][0]["deltas"]
    deltas["model.layers.9"] = deltas.pop("model.layers.0")
    path.write_text(json.dumps(d))
    cache = quept.sweep_cache(model, ids, path)
    with caplog.at_level(logging.WARNING):
        again = quept.api.plan(model, table, avg_bits=3.6, check_ids=ids, cache=cache)
    assert "names other units than the model's blocks (e.g. model.layers.0)" in caplog.text
    assert cache.measured == 1 and dict(again) == dict(plan)
