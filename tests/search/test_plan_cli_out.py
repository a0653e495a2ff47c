"""`quept plan --out` refuses to overwrite what is not a plan (model files, the caches an
artifact folder keeps), and the uniform widths a plan is bracketed by honour the constraints
(`--dry-run`, :func:`quept.api.plan_preview`, the in-context sweeps)."""

import json
import shutil

import pytest

from quept.api.mixed import plan_preview
from quept.cli import main
from quept.config import ConfigError
from quept.search.candidates import bracketing_widths, in_context_sweeps
from tests.export.tiny import TEXT, elastic_folder, hf_folder
from tests.search.test_constraints import model, table_of  # noqa: F401 (fixture)

SMALL = ["--samples", "4", "--seq-len", "32", "--check-samples", "2", "--probes", "2"]


# --- the uniform widths around a budget, under constraints -------------------------------------

def test_a_cap_brackets_the_budget_with_widths_the_constraints_allow(model):  # noqa: F811
    table = table_of(model)  # group 16: W2 3.125, W3 4.1875, W4 5.25 ... W8 9.5 bits per weight
    # every layer at most 2 bits: uniform W3..W8 are all W2, so W2 is the widest uniform width
    assert bracketing_widths(table, avg_bits=4.0, constraints=["*<=2"]) == (2, None)
    assert bracketing_widths(table, avg_bits=20.0, constraints=["*<=3"]) == (3, None)
    assert in_context_sweeps(table, avg_bits=20.0, constraints=["*<=3"]) == []
    # between W3 and W4 under *<=4: no third sweep to a W5 the cap makes W4 again
    assert bracketing_widths(table, avg_bits=5.0, constraints=["*<=4"]) == (3, 4)
    assert in_context_sweeps(table, avg_bits=5.0, constraints=["*<=4"]) == [(3, 4), (4, 3)]
    assert in_context_sweeps(table, avg_bits=5.0) == [(3, 4), (4, 3), (4, 5)]
    # a floor makes uniform W2 and W3 the W4 model: W4 is the narrowest uniform width
    assert bracketing_widths(table, avg_bits=5.3, constraints=["*>=4"]) == (4, 5)
    # constraints on some layers leave every uniform width to the others
    assert bracketing_widths(table, avg_bits=7.0, constraints=["model.layers.0.*=8"]) == (3, 4)
    assert bracketing_widths(table, avg_bits=20.0) == (8, None)


def test_plan_preview_names_the_widest_uniform_width_a_cap_allows(model):  # noqa: F811
    capped = plan_preview(model, avg_bits=20.0, constraints=["*<=2"])
    assert (capped["uniform_below"], capped["uniform_above"]) == (2, None)
    assert capped["bits_per_weight_range"][0] == capped["bits_per_weight_range"][1]
    assert plan_preview(model, avg_bits=20.0)["uniform_below"] == 8


# --- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_out")
    base = hf_folder(root / "base")
    elastic_folder(root / "el", base)
    (root / "text.txt").write_text(TEXT * 8)
    assert main(["export", str(root / "el"), "--bits", "4", "--out", str(root / "pk")]) == 0
    return root


def plan_argv(root, folder, *more):
    return ["plan", str(folder), "--calib-text", str(root / "text.txt"), *SMALL,
            "--no-in-context", *more]


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_that_names_a_model_file_or_a_cache_is_refused_before_measuring(root, capsys):
    el, base, pk = root / "el-a", root / "base-a", root / "pk-a"
    for src, dst in ((root / "el", el), (root / "base", base), (root / "pk", pk)):
        shutil.copytree(src, dst)
    before = {f: files_of(f) for f in (el, base, pk)}
    for out, held, name in [(el / "quept.json", "an elastic model", "quept.json"),
                            (el / "elastic.safetensors", "an elastic model",
                             "elastic.safetensors"),
                            (el / "sensitivity.json", "an elastic model", "sensitivity.json"),
                            (el / "sensitivity-exact.json", "an elastic model",
                             "sensitivity-exact.json"),
                            (el / "sweeps.json", "an elastic model", "sweeps.json"),
                            (base / "config.json", "a Hugging Face model", "config.json"),
                            (base / "model.safetensors", "a Hugging Face model",
                             "model.safetensors"),
                            (pk / "packed.safetensors", "a packed model", "packed.safetensors"),
                            (pk / "quept-packed.json", "a packed model", "quept-packed.json")]:
        assert main(plan_argv(root, el, "--avg-bits", "3", "--out", str(out))) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            f"quept: error: --out {out}: {out.parent} holds {held}, which keeps the name "
            f"{name} for its own files; writing the plan there would spoil it; give the plan "
            f"another name, e.g. {out.parent / 'plan.json'}"], err
    # nothing measured (no sensitivity table cached), nothing written
    assert {f: files_of(f) for f in (el, base, pk)} == before
    # so are several budgets into an artifact folder, before any plan is made
    for folder, held in ((el, "an elastic model"), (pk, "a packed model")):
        assert main(plan_argv(root, el, "--avg-bits", "2.8,3", "--out", str(folder))) == 2
        assert capsys.readouterr().err.strip() == (
            f"quept: error: --out {folder} holds {held}; writing 2 plans there would mix them "
            "with its files; give another folder")
    assert {f: files_of(f) for f in (el, base, pk)} == before
    # a dry run, which writes nothing, says so too
    assert main(plan_argv(root, el, "--avg-bits", "3", "--dry-run", "--out",
                          str(el / "quept.json"))) == 2
    assert "which keeps the name quept.json" in capsys.readouterr().err


def test_out_overwrites_a_plan_but_no_other_file(root, capsys):
    el = root / "el-b"
    shutil.copytree(root / "el", el)
    work = root / "work"
    work.mkdir()
    notes = work / "notes.json"
    notes.write_text('{"format": "something-else"}')
    text = work / "text.txt"
    text.write_text("not a plan")
    for out in (notes, text):
        assert main(plan_argv(root, el, "--avg-bits", "3", "--out", str(out))) == 2
        assert capsys.readouterr().err.strip() == (
            f"quept: error: --out {out} is a file that is not a quept plan; writing the plan "
            "there would overwrite it; give another file name (a plan file `quept plan` "
            "wrote is replaced)")
    assert notes.read_text() == '{"format": "something-else"}' and text.read_text() == (
        "not a plan")
    assert not (el / "sensitivity.json").exists()  # refused before measuring
    # a plan file is replaced, beside the model or elsewhere
    for out in (el / "plan.json", work / "plan.json"):
        for bits in ("3", "3.5"):
            assert main(plan_argv(root, el, "--avg-bits", bits, "--out", str(out))) == 0
            capsys.readouterr()
            plan = json.loads(out.read_text())
            assert plan["format"] == "quept-plan" and plan["budget"] == {"avg_bits": float(bits)}
    # several budgets: the folder's earlier plans are replaced, another file is not
    plans = work / "plans"
    argv = plan_argv(root, el, "--avg-bits", "2.8,3", "--out", str(plans))
    assert main(argv) == 0 and main(argv) == 0
    capsys.readouterr()
    (plans / "plan-3bits.json").write_text("[1, 2]")
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"quept: error: --out {plans / 'plan-3bits.json'} is a file that is not a quept plan; "
        "writing the plan there would overwrite it; give another file name (a plan file "
        "`quept plan` wrote is replaced)")
    assert (plans / "plan-3bits.json").read_text() == "[1, 2]"


def test_check_plan_out_reads_no_big_file(tmp_path):
    from quept.api.folders import check_plan_out

    big = tmp_path / "big.bin"
    big.write_bytes(b"{" + b" " * 2**20)
    with pytest.raises(ConfigError, match="is a file that is not a quept plan"):
        check_plan_out(big, "--out ")
    check_plan_out(tmp_path / "new.json")  # a file not there yet is fine


DRY = ["--dry-run"]


def dry_line(root, capsys, *more):
    assert main(plan_argv(root, root / "el", *DRY, *more)) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "stored bits per weight" in x]
    assert len(lines) == 1, lines
    return lines[0]


def test_dry_run_names_the_uniform_width_the_constraints_allow(root, capsys):
    # the tiny model's W2 stores 2.5625 bits per weight, W3 3.5938 (group 32)
    assert dry_line(root, capsys, "--avg-bits", "3", "--constraint", "*<=2") == (
        "--avg-bits 3: plans under the constraints *<=2 range from 2.5625 to 2.5625 stored "
        "bits per weight; uniform W2 fits, the widest the constraints allow; the budget is above "
        "every plan they allow")
    assert dry_line(root, capsys, "--max-bytes", "25kB", "--constraint", "*<=2").endswith(
        "uniform W2 fits, the widest the constraints allow; the budget is above every plan "
        "they allow")
    assert dry_line(root, capsys, "--avg-bits", "4", "--constraint", "*<=3").endswith(
        "range from 2.5625 to 3.5938 stored bits per weight; uniform W3 fits, the widest the "
        "constraints allow; the budget is above every plan they allow")
    assert dry_line(root, capsys, "--avg-bits", "3.59375", "--constraint", "*<=3").endswith(
        "uniform W3 fits, the widest the constraints allow")
    assert dry_line(root, capsys, "--avg-bits", "3", "--constraint", "*<=3").endswith(
        "uniform W2 fits, W3 does not")
    assert main(plan_argv(root, root / "el", *DRY, "--json", "--avg-bits", "4",
                          "--constraint", "*<=3")) == 0
    row, = json.loads(capsys.readouterr().out)["plans"]
    assert (row["uniform_below"], row["uniform_above"], row["in_context_sweeps"]) == (
        3, None, [])
    # without constraints, as before
    assert dry_line(root, capsys, "--avg-bits", "3") == (
        "--avg-bits 3: plans range from 2.5625 to 8.7500 stored bits per weight; uniform W2 "
        "fits, W3 does not")
    assert dry_line(root, capsys, "--avg-bits", "9") == (
        "--avg-bits 9: plans range from 2.5625 to 8.7500 stored bits per weight; uniform W8 "
        "fits")
