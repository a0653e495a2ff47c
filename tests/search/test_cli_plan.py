"""`quept plan` and `quept eval --plan` end to end on a tiny model with the real tokenizer
(slow: it needs the default model's tokenizer, fetched on first use)."""

import json
import shutil

import pytest

import quept
from quept.cli import main
from quept.config import CalibConfig, QuEPTConfig
from quept.nn import elastic_layers
from quept.search import Plan
from tests.conftest import tiny_model
from tests.search.helpers import SPEC

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from quept.data import default_model_dir

    root = tmp_path_factory.mktemp("plan")
    base = root / "base"
    tiny_model(vocab_size=49152).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / f, base / f)
    model, _ = quept.load_model(base)
    quept.prepare(model, SPEC)
    quept.save(model, root / "elastic", QuEPTConfig(spec=SPEC, calib=CalibConfig()))
    text = root / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 400)
    return root


def run_json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_plan_then_eval_with_the_plan(folder, capsys):
    elastic, out, text = folder / "elastic", folder / "p.json", str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    res = run_json(capsys, ["plan", str(elastic), "--avg-bits", "4.0", "--out", str(out),
                            "--json", *small])
    cache = elastic / "sensitivity.json"
    assert res["bits_per_weight"] <= 4.0 and cache.is_file()
    assert res["chosen"] == min(res["checked_kl"], key=res["checked_kl"].get)  # auto
    assert res["chosen"].startswith(res["granularity"])
    sweeps = res["in_context_sweeps"]  # W2 and W3 around 4.0 bits at group 16, then W4
    assert sweeps == {"measured": 3, "reused": 0} and (elastic / "sweeps.json").is_file()
    same = run_json(capsys, ["plan", str(elastic), "--avg-bits", "3.9", "--out",
                             str(folder / "s.json"), "--json", *small])
    assert same["in_context_sweeps"] == {"measured": 0, "reused": 3}
    info = run_json(capsys, ["info", str(elastic), "--json"])
    assert info["sweeps"]["check_shape"] == [2, 16] and len(info["sweeps"]["sweeps"]) == 3
    main(["info", str(elastic)])
    assert "in-context sweeps cached on 2 x 16 check tokens: W2 -> W3" in capsys.readouterr().out
    assert main(["plan", str(elastic), "--avg-bits", "3.9", "--out", str(folder / "t.json"),
                 *small]) == 0
    printed = capsys.readouterr().out
    assert "0 in-context sweep(s) measured and 3 reused from sweeps.json" in printed
    assert f"next: `quept eval {elastic} --plan {folder / 't.json'}` measures it" in printed
    stamp = cache.stat().st_mtime_ns
    again = run_json(capsys, ["plan", str(elastic), "--max-bytes", "50kB", "--out",
                              str(folder / "q.json"), "--json", *small])
    assert again["stored_bytes"] <= 50_000 and cache.stat().st_mtime_ns == stamp  # reused
    block = run_json(capsys, ["plan", str(elastic), "--avg-bits", "4.0", "--granularity",
                              "block", "--out", str(folder / "b.json"), "--json", *small])
    assert block["granularity"] == "block" and block["checked_kl"] is None
    assert block["in_context_sweeps"] is None
    per_block = {}
    for name, b in block["bits"].items():
        per_block.setdefault(name.split(".")[2], set()).add(b)
    assert len(per_block) == 2 and all(len(v) == 1 for v in per_block.values())
    ev = run_json(capsys, ["eval", str(elastic), "--plan", str(out), "--text", text,
                           "--windows", "1", "--seq-len", "64", "--json"])
    assert ev["rows"] == [] and ev["plan"]["bits_per_weight"] == pytest.approx(
        res["bits_per_weight"])
    assert ev["plan"]["ppl"] > 1


def test_plan_errors_are_clear(folder, capsys):
    elastic, text = str(folder / "elastic"), str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    assert main(["plan", elastic, "--avg-bits", "2.25", "--out", str(folder / "x.json"),
                 *small]) == 2
    err = capsys.readouterr().err
    assert "infeasible" in err and "range from 3.1250 to 9.5000" in err
    fresh = folder / "fresh"  # refused before any sensitivity is measured
    shutil.copytree(folder / "elastic", fresh, ignore=shutil.ignore_patterns("*.json.*"))
    (fresh / "sensitivity.json").unlink(missing_ok=True)
    assert main(["plan", str(fresh), "--max-bytes", "1kB", "--out", str(folder / "x.json"),
                 *small]) == 2
    assert "1000 bytes is infeasible" in capsys.readouterr().err
    assert not (fresh / "sensitivity.json").exists()
    assert main(["plan", elastic, "--avg-bits", "4.0", "--check-samples", "0", "--out",
                 str(folder / "x.json"), *small]) == 2
    assert "--check-samples must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", elastic, "--max-bytes", "60XB", "--out", "x.json"])
    assert "cannot read a size from '60XB'" in capsys.readouterr().err
    (folder / "bad.json").write_text('{"format": "quept-plan", "version": 1, "bits": {"a": 4}}')
    assert main(["eval", elastic, "--plan", str(folder / "bad.json"), "--text", text,
                 "--windows", "1", "--seq-len", "64"]) == 2
    assert "'bits_per_weight' must be a positive finite number, got null" in capsys.readouterr().err


def test_several_budgets_make_one_plan_each_in_a_folder(folder, capsys):
    elastic, text = str(folder / "elastic"), str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    out = folder / "plans"
    res = run_json(capsys, ["plan", elastic, "--avg-bits", "4.0,3.5", "--out", str(out),
                            "--granularity", "layer", "--json", *small])
    assert [p["out"] for p in res["plans"]] == [str(out / "plan-3.5bits.json"),
                                                str(out / "plan-4.0bits.json")]  # smallest first
    for p, budget in zip(res["plans"], (3.5, 4.0)):
        saved = Plan.load(p["out"])
        assert saved.bits_per_weight == pytest.approx(p["bits_per_weight"])
        assert saved.bits_per_weight <= budget
        assert saved.budget == {"avg_bits": budget}
    assert res["plans"][0]["bits_per_weight"] < res["plans"][1]["bits_per_weight"]
    sized = run_json(capsys, ["plan", elastic, "--max-bytes", "50kB,40kB", "--out",
                              str(folder / "sized"), "--granularity", "layer", "--json", *small])
    assert [p["stored_bytes"] <= b for p, b in zip(sized["plans"], (40_000, 50_000))] == [
        True, True]
    assert (folder / "sized" / "plan-40kB.json").is_file()
    main(["plan", elastic, "--avg-bits", "4.0,3.5", "--out", str(folder / "printed"),
          "--granularity", "layer", *small])
    printed = capsys.readouterr().out
    assert printed.count("plan written to") == 2
    assert printed.count("(sensitivity table of the first plan, allocation") == 1
    assert res["plans"][1]["sensitivity_seconds"] is None
    assert f"next: `quept eval {elastic} --plan {folder / 'printed'}` measures them all" in printed
    ev = run_json(capsys, ["eval", elastic, "--plan", str(out), "--bits", "4", "--text", text,
                           "--windows", "1", "--seq-len", "64", "--json"])
    assert [m["path"] for m in ev["plans"]] == [str(out / "plan-3.5bits.json"),
                                                str(out / "plan-4.0bits.json")]  # fewest first
    assert [r["bits"] for r in ev["rows"]] == [4] and "plan" not in ev
    assert all(m["ppl"] > 1 for m in ev["plans"])
    one = run_json(capsys, ["eval", elastic, "--plan", str(out / "plan-3.5bits.json"), "--text",
                            text, "--windows", "1", "--seq-len", "64", "--json"])
    assert one["plan"]["ppl"] == pytest.approx(ev["plans"][0]["ppl"]) and "plans" not in one
    main(["eval", elastic, "--plan", str(out / "plan-3.5bits.json"), "--plan",
          str(out / "plan-4.0bits.json"), "--bits", "4", "--text", text, "--windows", "1",
          "--seq-len", "64"])
    printed = capsys.readouterr().out
    assert "RTN perplexity" not in printed  # its column only with --rtn
    assert any(line.split()[:2] == ["W4", "5.250"] for line in printed.splitlines())
    header = next(line for line in printed.splitlines() if "layers per width" in line)
    assert header.split() == ["plan", "bits/weight", "stored", "MB", "of", "linears",
                              "perplexity", "layers", "per", "width"]
    assert [line.split()[0] for line in printed.splitlines() if "plan-" in line] == [
        str(out / "plan-3.5bits.json"), str(out / "plan-4.0bits.json")]
    assert main(["eval", elastic, "--plan", str(folder / "sized" / "none"), "--text", text,
                 "--windows", "1", "--seq-len", "64"]) == 2
    (folder / "empty").mkdir()
    assert main(["eval", elastic, "--plan", str(folder / "empty"), "--text", text]) == 2
    assert "is a folder without plan files" in capsys.readouterr().err


def test_several_budgets_are_checked_before_any_plan_is_made(folder, capsys):
    elastic, text = str(folder / "elastic"), str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    assert main(["plan", elastic, "--avg-bits", "4.0,2.25", "--out", str(folder / "none"),
                 *small]) == 2
    assert "a budget of 2.25" in capsys.readouterr().err
    assert not (folder / "none").exists()
    assert main(["plan", elastic, "--avg-bits", "4,4.0", "--out", str(folder / "none"),
                 *small]) == 2
    assert "--avg-bits names a budget twice: 4, 4.0" in capsys.readouterr().err
    assert main(["plan", elastic, "--avg-bits", "4,3.5", "--out", str(folder / "p.json"),
                 *small]) == 2
    assert "2 budgets make 2 plans: --out must name a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", elastic, "--avg-bits", "4,x", "--out", "x"])
    assert "cannot read bits per weight from 'x'" in capsys.readouterr().err


def test_constraints_pin_and_bound_layers_and_are_recorded(folder, capsys):
    elastic, text = str(folder / "elastic"), str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    out = folder / "pinned.json"
    cons = ["model.layers.0.*=8", "*.mlp.down_proj>=4"]
    res = run_json(capsys, ["plan", elastic, "--avg-bits", "7.0", "--out", str(out), "--json",
                            *small, *(x for c in cons for x in ("--constraint", c))])
    assert res["constraints"] == cons and res["bits_per_weight"] <= 7.0
    for name, b in res["bits"].items():
        assert b == 8 if name.startswith("model.layers.0.") else b >= (
            4 if name.endswith("down_proj") else 2)
    assert len(set(res["bits"].values())) > 1  # block 1 got less than 8 bits
    assert len(res["checked_kl"]) >= 2  # auto: candidates, all made under the constraints
    assert res["note"] is None
    assert Plan.load(out).constraints == tuple(cons)
    info = run_json(capsys, ["info", str(out), "--json"])
    assert info["constraints"] == cons
    main(["info", str(out)])
    assert ("chosen under the constraints model.layers.0.*=8, *.mlp.down_proj>=4"
            in capsys.readouterr().out)
    main(["plan", elastic, "--avg-bits", "7.0", "--out", str(folder / "pinned2.json"),
          "--granularity", "block", "--constraint", "model.layers.0.*=8", *small])
    assert "; constraints: model.layers.0.*=8" in capsys.readouterr().out
    # a budget above what the constraints allow: said, not silently left unused
    capped = run_json(capsys, ["plan", elastic, "--avg-bits", "7.0", "--out",
                               str(folder / "capped.json"), "--json", "--constraint", "*<=3",
                               *small])
    assert set(capped["bits"].values()) == {3} and capped["bits_per_weight"] == 4.1875
    assert capped["note"] == ("the budget (7.0000 bits per weight) is above the widest plan "
                              "the constraints allow (4.1875); this plan stores 4.1875")
    main(["plan", elastic, "--max-bytes", "1GB", "--out", str(folder / "all8.json"),
          "--granularity", "layer", *small])
    printed = capsys.readouterr().out
    # in bytes, not as a budget of bits per weight far past any width
    assert ("note: the budget of 1,000,000,000 bytes is more than the widest plan of this model "
            "needs: every layer at 8 bits, ") in printed
    # refused before anything is measured: a budget they rule out, a pattern matching nothing
    assert main(["plan", elastic, "--avg-bits", "4.0", "--out", str(folder / "x.json"),
                 "--constraint", "model.layers.0.*=8", *small]) == 2
    err = capsys.readouterr().err
    assert "under the constraints model.layers.0.*=8 range from 6.3125" in err
    assert main(["plan", elastic, "--avg-bits", "6.5", "--out", str(folder / "x.json"),
                 "--constraint", "model.layers.0=8", *small]) == 2
    assert "for the linears under model.layers.0 write model.layers.0.*" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["plan", elastic, "--avg-bits", "6.5", "--out", "x.json", "--constraint", "*=9"])
    assert "constraint '*=9': bit-width 9 is outside 2..8" in capsys.readouterr().err
    assert not (folder / "x.json").exists()


def test_a_dry_run_says_what_a_plan_would_measure_and_writes_nothing(folder, capsys):
    text = str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    fresh = folder / "dry"
    shutil.copytree(folder / "elastic", fresh, ignore=shutil.ignore_patterns("*.json.*"))
    for name in ("sensitivity.json", "sweeps.json"):
        (fresh / name).unlink(missing_ok=True)
    before = sorted(p.name for p in fresh.iterdir())
    dry = run_json(capsys, ["plan", str(fresh), "--avg-bits", "4.0,5.0", "--dry-run",
                            "--json", *small])
    assert sorted(p.name for p in fresh.iterdir()) == before  # nothing measured or written
    assert dry["dry_run"] and not dry["sensitivity_cached"] and dry["check_shape"] == [2, 16]
    first = dry["plans"][0]
    assert first["budget"] == {"avg_bits": 4.0}
    assert first["bits_per_weight_range"] == [3.125, 9.5]  # W2 and W8 at group 16
    assert (first["uniform_below"], first["uniform_above"]) == (2, 3)
    assert [(s["base"], s["alt"], s["cached"]) for s in first["in_context_sweeps"]] == [
        (2, 3, False), (3, 2, False), (3, 4, False)]
    # the plan then measures exactly those sweeps, and a second dry run finds them cached
    res = run_json(capsys, ["plan", str(fresh), "--avg-bits", "4.0", "--out",
                            str(folder / "dry.json"), "--json", *small])
    assert res["in_context_sweeps"] == {"measured": 3, "reused": 0}
    again = run_json(capsys, ["plan", str(fresh), "--avg-bits", "4.0", "--dry-run", "--json",
                              *small])
    assert again["sensitivity_cached"]
    assert all(s["cached"] for s in again["plans"][0]["in_context_sweeps"])
    main(["plan", str(fresh), "--max-bytes", "60kB", "--dry-run", "--constraint",
          "model.layers.0.*=8", *small])
    printed = capsys.readouterr().out
    assert "dry run, nothing measured or written; sensitivity table: cached" in printed
    assert ("60,000 bytes: plans under the constraints model.layers.0.*=8 range from 6.3125 to "
            "9.5000 stored bits per weight; uniform W2 fits, W3 does not") in printed
    assert main(["plan", str(fresh), "--avg-bits", "4.0", *small]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["plan", str(fresh), "--avg-bits", "2.0", "--dry-run", *small]) == 2
    assert "infeasible" in capsys.readouterr().err


def test_plan_on_the_exact_sensitivity_table(folder, capsys):
    small = ["--calib-text", str(folder / "calib.txt"), "--samples", "2", "--seq-len", "16"]
    exact = folder / "exact"
    shutil.copytree(folder / "elastic", exact, ignore=shutil.ignore_patterns("*.json.*"))
    for name in ("sensitivity.json", "sweeps.json"):
        (exact / name).unlink(missing_ok=True)
    dry = run_json(capsys, ["plan", str(exact), "--avg-bits", "4.0", "--dry-run", "--json",
                            "--sensitivity", "exact", *small])
    assert dry["sensitivity_method"] == "exact" and not dry["sensitivity_cached"]
    main(["plan", str(exact), "--avg-bits", "4.0", "--dry-run", "--sensitivity", "exact", *small])
    model = quept.load(exact)[0]
    layers, n = len(elastic_layers(model)), len(model.quept_spec.bits)
    assert f"exact: {layers} layers x {n} widths = {layers * n} forwards" in capsys.readouterr().out
    res = run_json(capsys, ["plan", str(exact), "--avg-bits", "4.0", "--out",
                            str(folder / "exact.json"), "--granularity", "layer",
                            "--sensitivity", "exact", "--json", *small])
    assert res["bits_per_weight"] <= 4.0 and res["sensitivity_seconds"] > 0
    assert res["sensitivity"] == "exact"
    assert (exact / "sensitivity-exact.json").is_file()
    assert not (exact / "sensitivity.json").exists()  # the fast table's file is its own
    table = json.loads((exact / "sensitivity-exact.json").read_text())
    assert table["settings"]["method"] == "exact-forwards"
    again = run_json(capsys, ["plan", str(exact), "--avg-bits", "4.0", "--dry-run", "--json",
                              "--sensitivity", "exact", *small])
    assert again["sensitivity_cached"]
    assert main(["plan", str(exact), "--avg-bits", "4.0", "--out", str(folder / "exact2.json"),
                 "--granularity", "layer", "--sensitivity", "exact", *small]) == 0
    assert "(sensitivity exact table " in capsys.readouterr().out  # the cached one, reused
    assert main(["plan", str(exact), "--avg-bits", "4.0", "--out", str(folder / "x.json"),
                 "--sensitivity", "exact", "--batch-size", "0", *small]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    fast = run_json(capsys, ["plan", str(exact), "--avg-bits", "4.0", "--dry-run", "--json",
                             *small])
    assert not fast["sensitivity_cached"]  # an exact table is not taken for a fast one
    info = run_json(capsys, ["info", str(exact), "--json"])
    assert "sensitivity" not in info and info["sensitivity_exact"]["layers"] == layers
    main(["info", str(exact)])
    out = capsys.readouterr().out
    assert f"exact sensitivity table cached ({layers} layers x {n} widths" in out
    assert "`quept plan --sensitivity exact` reuses it" in out


def test_refine_rounds_from_the_command_line(folder, capsys):
    elastic, text = folder / "elastic", str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    out = folder / "refined.json"
    for bad, err in ((["--refine", "-1"], "--refine must be >= 0 (rounds of local search), got -1"),
                     (["--refine", "1", "--granularity", "block"],
                      "--refine starts from the plan --granularity auto keeps")):
        assert main(["plan", str(elastic), "--avg-bits", "4.0", "--out", str(out), *bad,
                     *small]) == 2
        assert err in capsys.readouterr().err
    assert not out.exists()
    dry = run_json(capsys, ["plan", str(elastic), "--avg-bits", "4.0", "--dry-run", "--refine",
                            "2", "--json", *small])
    assert dry["refine"] == 2
    main(["plan", str(elastic), "--avg-bits", "4.0", "--dry-run", "--refine", "2", *small])
    assert ("then up to 2 round(s) of refinement around the plan kept (two forwards per block "
            "each on 2 x 16 tokens; not cached)") in capsys.readouterr().out
    plain = run_json(capsys, ["plan", str(elastic), "--avg-bits", "4.0", "--out",
                              str(folder / "plain.json"), "--json", *small])
    res = run_json(capsys, ["plan", str(elastic), "--avg-bits", "4.0", "--out", str(out),
                            "--refine", "2", "--json", *small])
    kls = res["checked_kl"]
    assert res["bits_per_weight"] <= 4.0 and res["chosen"] == min(kls, key=kls.get)
    assert {k: v for k, v in kls.items() if "refined" not in k} == plain["checked_kl"]
    assert all(k.startswith(plain["chosen"] + ", refined x") for k in kls
               if k not in plain["checked_kl"])
    assert Plan.load(out).widths == res["bits"]


def test_auto_plans_over_several_budgets_never_measure_worse_at_a_larger_one(folder, capsys):
    elastic, text = folder / "elastic", str(folder / "calib.txt")
    small = ["--calib-text", text, "--samples", "2", "--seq-len", "16", "--probes", "2"]
    res = run_json(capsys, ["plan", str(elastic), "--avg-bits", "3.6,3.2,3.4", "--out",
                            str(folder / "auto"), "--json", *small])
    plans = res["plans"]
    assert [p["budget"]["avg_bits"] for p in plans] == [3.2, 3.4, 3.6]  # smallest first
    kept = [p["checked_kl"][p["chosen"]] for p in plans]
    assert kept == sorted(kept, reverse=True), kept
    for smaller, larger in zip(plans, plans[1:]):
        # the smaller budget's plan was measured again as a candidate of the larger one
        assert any(k.endswith(f"(the {smaller['budget']['avg_bits']:g}-bit plan's)")
                   or larger["checked_kl"][k] == pytest.approx(kept[plans.index(smaller)],
                                                               rel=1e-5)
                   for k in larger["checked_kl"])
