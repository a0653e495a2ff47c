"""The peer benchmark's bookkeeping: bits per weight, merging, verdicts, errors, the report."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from peers import report, results  # noqa: E402
from peers.common import block_linears, levels_max  # noqa: E402

from quept.nn import elastic_layers  # noqa: E402
from quept.ops import stored_bits_per_weight  # noqa: E402
from quept.ops.quant import rtn  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

SETUP = {"model": "default", "eval_text": "Pride and Prejudice", "windows": 32,
         "eval_seq_len": 512, "group_size": 64}


def cell(ppl, **kw):
    return {"status": "ok", "ppl": ppl, "bits_per_weight": 4.3, **kw}


def doc_with(cells):
    doc = results.empty(SETUP)
    for m, cs in cells.items():
        doc = results.merge(doc, SETUP, m, cs)
    return doc


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_bits_per_weight_matches_quept_and_counts_hqq_float_zero(bits):
    assert results.stored_bits_per_weight(bits, 64) == stored_bits_per_weight(bits, 64, 576)
    assert results.stored_bits_per_weight(bits, 64, zero_bits=16) == bits + 0.5
    assert results.stored_bits_per_weight(bits, 32) > results.stored_bits_per_weight(bits, 64)


def test_bits_per_weight_refuses_per_channel():
    with pytest.raises(ValueError, match="group size"):
        results.stored_bits_per_weight(4, 0)


def test_merge_replaces_one_cell_and_keeps_the_rest():
    doc = doc_with({"rtn": {"4": cell(31.3), "3": cell(69.9)}, "hqq": {"4": cell(28.7)}})
    new = results.merge(doc, SETUP, "rtn", {"4": cell(30.0)})
    assert new["cells"]["rtn"] == {"4": cell(30.0), "3": cell(69.9)}
    assert new["cells"]["hqq"] == {"4": cell(28.7)}
    assert doc["cells"]["rtn"]["4"]["ppl"] == 31.3  # the input is not mutated


def test_merge_refuses_another_setup():
    doc = doc_with({"rtn": {"4": cell(31.3)}})
    with pytest.raises(results.SetupMismatchError, match="windows"):
        results.merge(doc, {**SETUP, "windows": 8}, "rtn", {"4": cell(40.0)})


def test_save_load_round_trip(tmp_path):
    doc = doc_with({"hqq": {"2": cell(1.3e5)}})
    path = tmp_path / "peers.json"
    results.save(doc, path)
    assert results.load(path, SETUP) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["peers.json"]
    assert results.load(tmp_path / "none.json", SETUP)["cells"] == {}


def test_verdict_counts_a_one_percent_tie_and_ignores_the_smoke_test():
    doc = doc_with({"quept": {"4": cell(28.0), "3": cell(39.0)},
                    "hqq": {"4": cell(27.8), "3": cell(147.2)},
                    "autoround-light": {"3": cell(33.7)},
                    "autoround-smoke": {"4": cell(20.0)}})
    v = results.verdict(doc)
    assert v["4"]["wins"] and v["4"]["best_peer"] == "hqq"
    assert not v["3"]["wins"] and v["3"]["best_peer"] == "autoround-light"
    assert v["3"]["ratio"] == pytest.approx(39.0 / 33.7)


def test_other_quept_settings_are_not_peers_and_each_gets_a_verdict_row():
    doc = doc_with({"quept": {"4": cell(28.2)}, "quept-long": {"4": cell(27.9)},
                    "gptq": {"4": cell(27.2)}})
    assert results.ours_methods(doc) == ["quept", "quept-long"]
    assert results.verdict(doc)["4"]["best_peer"] == "gptq"
    long = results.verdict(doc, "quept-long")["4"]
    assert long["best_peer"] == "gptq" and long["ratio"] == pytest.approx(27.9 / 27.2)
    md = report.markdown(doc)
    assert "| QuEPT (one model, all widths) / best peer | 1.037 (loses) |" in md
    assert ("| QuEPT, 4 epochs, groups 7-8/5-6/4/3/2 (one model, all widths) / best peer "
            "| 1.026 (loses) |") in md


def test_error_line_is_the_exception_or_the_signal():
    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
          "torch.OutOfMemoryError: CPU ran out: tried 3 GiB\nsome later noise\n")
    assert results.error_line(tb, 1) == "torch.OutOfMemoryError: CPU ran out: tried 3 GiB"
    assert results.error_line("progress 10%\n", -9).startswith("killed by signal 9")
    assert results.error_line("", 3) == "exit status 3 and no output"


def test_cells_from_partial_run_keep_measured_widths_and_record_the_error():
    res = {"cells": {"8": {"ppl": 25.2, "levels_max": 200}}, "calib_seconds": 435.0,
           "calib_reused": True, "calib_peak_rss_gib": 1.0, "n_samples": 24, "seq_len": 256}
    run = {"run_id": "quept@t", "wall_seconds": 100.0, "peak_rss_gib": 2.0,
           "error": "RuntimeError: boom"}
    cells = results.cells_from_run("quept", [8, 2], res, run, 64)
    assert cells["8"]["status"] == "ok" and cells["8"]["ppl"] == 25.2
    assert cells["2"] == {**cells["2"], "status": "error", "ppl": None,
                          "error": "RuntimeError: boom"}
    assert cells["2"]["bits_per_weight"] == stored_bits_per_weight(2, 64, 576)
    # A reused folder reports the peak its calibration recorded, not that of loading it.
    assert cells["8"]["calib_peak_rss_gib"] == 1.0
    hqq = results.cells_from_run("hqq", [4], None, {"error": "ImportError: no hqq"}, 64)
    assert hqq["4"]["bits_per_weight"] == 4.5 and hqq["4"]["status"] == "error"


def test_cells_keep_rounding_and_eval_seconds_and_the_cost_table_shows_rounding():
    res = {"cells": {"4": {"ppl": 27.0, "eval_seconds": 30.0}, "2": {"ppl": 90.0}},
           "calib_seconds": 400.0, "rounding_seconds": {"4": 50.0, "2": 70.0}}
    cells = results.cells_from_run("quept", [4, 2, 3], res, {"run_id": "q", "error": "boom"}, 64)
    assert cells["4"]["rounding_seconds"] == 50.0 and cells["4"]["eval_seconds"] == 30.0
    assert cells["2"]["eval_seconds"] is None and "rounding_seconds" not in cells["3"]
    md = report.markdown(doc_with({"quept": cells}))
    assert "| 400 s + 120 s rounding |" in md
    # Cells written before these keys existed still render.
    old = {w: {k: v for k, v in c.items() if k not in ("rounding_seconds", "eval_seconds")}
           for w, c in cells.items()}
    assert "| 400 s |" in report.markdown(doc_with({"quept": old}))


def test_markdown_marks_best_missing_and_failed_cells(tmp_path):
    doc = doc_with({"float": {"float": cell(25.14, bits_per_weight=32.0)},
                    "rtn": {"4": cell(31.32), "2": cell(5.4e5)},
                    "gptq": {"4": cell(27.05), "2": {"status": "error", "ppl": None,
                                                     "bits_per_weight": 2.28,
                                                     "error": "ValueError: bad"}},
                    "hqq": {"4": cell(28.72)}})
    md = report.markdown(doc)
    assert "| RTN (min/max) | 31.32 | **5.4e5** |" in md  # the only result at W2
    assert "| GPTQ (llmcompressor) | **27.05** | error [1] |" in md
    assert "| HQQ | 28.72 | not run |" in md
    assert "1. `ValueError: bad`" in md and "perplexity 25.14" in md
    pytest.importorskip("matplotlib")
    assert report.plot(doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_task_scores_pass_into_cells_and_the_report_pairs_quept_with_each_peer():
    def scored(ppl, items):
        acc = sum(map(int, items)) / len(items)
        return {"ppl": ppl, "tasks": {"last-word": {
            "items": len(items), "acc": acc, "perplexity": 150.0 + ppl,
            "per_item": {"acc": items}}}, "task_seconds": 9.0}

    setup = {**SETUP, "tasks": ["last-word"], "task_limit": 4}
    doc = results.empty(setup)
    for name, width, got in (("gptq", 4, scored(27.0, "1100")),
                             ("quept", 4, scored(26.5, "1110")),
                             ("float", None, scored(25.1, "1111"))):
        cells = results.cells_from_run(name, [width], {"cells": {str(width or "float"): got}},
                                       {"run_id": name, "wall_seconds": 1.0}, 64)
        doc = results.merge(doc, setup, name, cells)
    assert doc["cells"]["quept"]["4"]["tasks"]["last-word"]["per_item"]["acc"] == "1110"
    with pytest.raises(results.SetupMismatchError, match="task_limit"):
        results.merge(doc, {**setup, "task_limit": 300}, "gptq", {})
    md = report.markdown(doc)
    assert "### last-word acc (higher is better)" in md
    assert "| float | 100.0% |" in md and "| GPTQ (llmcompressor) |  | 50.0% |" in md
    assert "| 177.00 |" in md  # last-word perplexity of GPTQ's row
    assert "| GPTQ (llmcompressor) | last-word acc | 50.0% |" in md  # same as float: 2 of 4
    assert "| QuEPT (one model, all widths) | last-word acc | 75.0% |" in md
    # QuEPT minus GPTQ on the same items: differences 0, 0, 1, 0 -> +25.0 ± 25.0 points.
    assert "| QuEPT (one model, all widths) - GPTQ (llmcompressor) | last-word acc | " \
        "+25.0 ± 25.0 |" in md


def test_rtn_adapter_quantizes_every_block_linear_to_b_bits():
    from peers import rtn as rtn_adapter

    model = tiny_model("llama")
    lins = block_linears(model)
    assert len(lins) == 7 * model.config.num_hidden_layers
    before = {n: m.weight.clone() for n, m in lins.items()}
    rtn_adapter.quantize(model, None, None, {"bits": [3], "group_size": 32})
    for n, m in lins.items():
        assert torch.equal(m.weight, rtn(before[n], 3, 32))
        assert levels_max(m.weight, 32) <= 8 < levels_max(before[n], 32)


def test_every_method_names_an_adapter_with_quantize_and_peer_libraries_load_lazily():
    import importlib

    from peers.methods import METHODS

    for name, m in METHODS.items():
        if m.adapter is None:
            continue
        mod = importlib.import_module(f"peers.{m.adapter}")  # no peer library imported here
        assert callable(mod.quantize), name


def test_fmt_ppl():
    assert report.fmt_ppl(25.137) == "25.14"
    assert report.fmt_ppl(537000.0) == "5.4e5"
    assert json.dumps(report.fmt_ppl(1400.0)) == '"1.4e3"'


def test_reused_elastic_folder_must_match_the_methods_calibration(tmp_path):
    from peers import elastic
    from peers.methods import METHODS

    from quept.config import PRESETS, QuEPTConfig

    demo = QuEPTConfig(calib=PRESETS["cpu-demo"])
    (tmp_path / "quept.json").write_text(json.dumps(
        {"format": "quept-elastic", "config": demo.to_dict(), "base_model": "default",
         "model_type": "llama", "base_fingerprint": "0" * 16, "layers": []}))
    job = {"method": "quept-long", "elastic": str(tmp_path), "group_size": 64, "bits": [4],
           "options": METHODS["quept-long"].options}
    with pytest.raises(ValueError, match="epochs is 1, not 4"):
        elastic.quantize(None, None, None, job)
    assert elastic._calib(job).epochs == 4 and elastic._calib(job).lr_clip == 0.1
    assert elastic._calib({"options": {}}) == PRESETS["cpu-demo"]
    rates = elastic._calib({"options": METHODS["quept-long16-wide-rates"].options})
    assert rates.lr_adapter_groups == (1e-3, 1e-3, 1e-3, 3e-3, 3e-3)


def test_quept_methods_may_set_spec_fields_and_a_reused_folder_must_match(tmp_path):
    from peers import elastic
    from peers.methods import method

    import quept
    from quept.config import QuEPTConfig

    job = {"method": "quept-long", "options": method("quept-long").options, "group_size": 16,
           "bits": [4]}
    spec = elastic._spec(job)
    assert spec.bit_groups == ((7, 8), (5, 6), (4,), (3,), (2,)) and spec.ranks[-1] == 8
    assert spec.default_group_size == 16 and elastic._calib(job).epochs == 4
    model = tiny_model()
    quept.prepare(model, quept.ElasticSpec(default_group_size=16))  # the default groups
    quept.save(model, tmp_path / "e", QuEPTConfig(spec=model.quept_spec,
                                                  calib=elastic._calib(job)))
    with pytest.raises(ValueError, match="bit_groups is"):
        elastic._reuse({**job, "elastic": str(tmp_path / "e")}, None)


def test_recorded_command_names_no_lock_file_or_machine_directory():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    beside = str(Path.cwd().parent / "peers-venv" / "bin" / "python")
    argv = ["benchmarks/peers.py", "--python", beside, "--lock", "/var/lock/x.lock",
            "--methods", "gptq", "--lock=/tmp/y"]
    assert script.recorded_argv(argv) == [
        "benchmarks/peers.py", "--python", "../peers-venv/bin/python", "--lock", "LOCKFILE",
        "--methods", "gptq", "--lock=LOCKFILE"]


def test_the_fused_kernel_rerun_has_the_cpu_long_settings():
    from peers.methods import METHODS

    rerun, preset = METHODS["quept-cpu-long-fused"], METHODS["quept-long16-wide-rates-massive"]
    assert rerun.options == preset.options and rerun.label != preset.label


@pytest.mark.parametrize("how", ["gptq", "learned"])
def test_the_rounding_rows_reuse_the_cpu_long_settings_and_round_each_width(how):
    from peers import elastic
    from peers.methods import METHODS

    preset = METHODS["quept-cpu-long-fused"].options
    nearest, gptq = METHODS["quept-cpu-long-nearest"], METHODS[f"quept-cpu-long-{how}"]
    assert nearest.options == preset
    assert {k: v for k, v in gptq.options.items() if k != "rounding"} == preset
    assert gptq.options["rounding"] == how
    job = {"method": f"quept-cpu-long-{how}", "options": gptq.options}
    assert elastic._calib(job) == elastic._calib({"options": preset})  # not a calib option
    from tests.export.tiny import elastic_tiny

    model = elastic_tiny()
    ids = torch.randint(2, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    took: dict[str, float] = {}
    select = elastic._selector(model, ids, job, took)
    select(3)
    assert all(set(m.rounded) == {3} for m in elastic_layers(model).values())
    select(2)  # each width rounds afresh; the last one's codes are gone
    assert all(set(m.rounded) == {2} for m in elastic_layers(model).values())
    assert set(took) == {"3", "2"}
    select(None)
    assert all(not m.rounded and m.bits is None for m in elastic_layers(model).values())
    plain = elastic._selector(model, ids, {"options": nearest.options}, {})
    plain(3)
    assert all(not m.rounded for m in elastic_layers(model).values())
