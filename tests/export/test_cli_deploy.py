"""quept compact / export / run / eval on tiny model folders."""

import json

import pytest

from quept.cli import main
from quept.nn import elastic_layers

from .tiny import TEXT, elastic_folder, hf_folder, run_json


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    base = hf_folder(root / "base")
    elastic = elastic_folder(root / "elastic", base)
    (root / "text.txt").write_text(TEXT)
    return root, base, elastic


def test_compact_export_eval_run(folders, capsys):
    root, base, elastic = folders
    text = str(root / "text.txt")
    ev = ["--text", text, "--windows", "2", "--seq-len", "32", "--json"]
    res = run_json(capsys, ["compact", str(elastic), "--out", str(root / "c"), "--json"])
    assert 8.375 < res["bits_per_weight"] < 16
    direct = run_json(capsys, ["eval", str(elastic), "--bits", "3", *ev])["rows"]
    comp = run_json(capsys, ["eval", str(root / "c"), "--bits", "3", *ev])["rows"]
    assert [r["bits"] for r in comp] == [None, 3]
    assert comp[1]["ppl"] == pytest.approx(direct[1]["ppl"], rel=0.05)

    res = run_json(capsys, ["export", str(root / "c"), "--bits", "3", "--out",
                            str(root / "p3"), "--json"])
    assert res["bits"] == 3 and res["sizes"]["bits_per_weight"] == pytest.approx(3 + 19 / 32)
    packed = run_json(capsys, ["eval", str(root / "p3"), *ev])
    assert packed["packed"] and packed["rows"][0]["bits"] == 3
    assert packed["rows"][0]["ppl"] == pytest.approx(comp[1]["ppl"], rel=1e-3)

    gen = run_json(capsys, ["run", str(root / "p3"), "--prompt", "It is a truth",
                            "--max-new-tokens", "6", "--no-eos", "--json"])
    assert gen["kind"] == "packed" and gen["new_tokens"] == 6 and gen["prompt_tokens"] == 13
    assert gen["prefill_tokens_per_second"] > 0 and gen["decode_tokens_per_second"] > 0
    fake = run_json(capsys, ["run", str(root / "c"), "--bits", "3", "--fake-quant", "--prompt",
                             "It is a truth", "--max-new-tokens", "6", "--no-eos", "--json"])
    assert fake["text"] == gen["text"]  # packed generates what the fake-quantized model does
    flt = run_json(capsys, ["run", str(base), "--prompt", "It is", "--max-new-tokens", "3",
                            "--no-eos", "--json"])
    assert flt["kind"] == "hf" and flt["new_tokens"] == 3


def test_export_a_plan_file(folders, capsys):
    root, _, elastic = folders
    import quept

    model, _ = quept.load(elastic)
    names = list(elastic_layers(model))
    plan = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    (root / "plan.json").write_text(json.dumps({"plan": plan}))
    res = run_json(capsys, ["export", str(elastic), "--plan", str(root / "plan.json"), "--out",
                            str(root / "pm"), "--json"])
    assert res["bits"] == "mixed"
    assert {n: v["bits"] for n, v in res["layers"].items()} == plan
    assert res["sizes"]["bits_per_weight"] == pytest.approx(quept.stored_bits(model, plan))


def test_clear_errors(folders, capsys):
    root, base, elastic = folders
    assert main(["export", str(base), "--bits", "3", "--out", str(root / "x")]) == 2
    assert "is a hf folder" in capsys.readouterr().err
    assert main(["export", str(elastic), "--bits", "9", "--out", str(root / "x")]) == 2
    assert "outside 2..8" in capsys.readouterr().err
    assert main(["run", str(elastic), "--prompt", "a"]) == 2
    assert "--bits and --plan are for elastic or compact" in capsys.readouterr().err
    (root / "bad.json").write_text("[1, 2]")
    assert main(["export", str(elastic), "--plan", str(root / "bad.json"), "--out",
                 str(root / "x")]) == 2
    assert "layer name: bits" in capsys.readouterr().err
    assert main(["run", str(root / "missing"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err
