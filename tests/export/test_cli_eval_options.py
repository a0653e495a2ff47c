"""quept eval and quept run refuse the options that do not apply to what a folder holds, rather
than ignore them, and say what a compact checkpoint's "float" row is."""

import pytest

from quept.cli import main

from .tiny import TEXT, elastic_folder, hf_folder, run_json


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-options")
    base = hf_folder(root / "base")
    elastic = elastic_folder(root / "elastic", base)
    (root / "text.txt").write_text(TEXT * 4)
    assert main(["compact", str(elastic), "--out", str(root / "compact")]) == 0
    assert main(["export", str(elastic), "--bits", "4", "--out", str(root / "w4")]) == 0
    return root, base, elastic


def _refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_options_that_do_not_apply(folders, capsys):
    root, base, elastic = folders
    text = ["--text", str(root / "text.txt"), "--seq-len", "64", "--windows", "2"]
    compact, w4 = str(root / "compact"), str(root / "w4")
    _refused(capsys, ["eval", compact, "--bits", "4", "--rtn", *text],
             "it keeps master codes, not the float weights, so RTN would round the master")
    _refused(capsys, ["eval", compact, "--bits", "4", "--model", str(base), *text],
             "--model names the base model of an elastic folder, or the float encoder")
    _refused(capsys, ["export", compact, "--bits", "4", "--model", str(base), "--out",
                      str(root / "x")], "is a compact checkpoint, which holds its own weights")
    _refused(capsys, ["eval", str(base), "--model", str(base), *text],
             "--model names the base model of an elastic folder, or the float encoder")
    _refused(capsys, ["eval", w4, "--sentences", "10", *text],
             "--sentences applies to an encoder; the model is a causal LM")
    _refused(capsys, ["eval", w4, "--model", str(base), *text],
             "which needs no base model: --model names the float encoder an encoder's export")
    _refused(capsys, ["eval", str(elastic), "--plan", "*=3", "--rtn", *text],
             "a plan has no RTN row: add --bits to compare with uniform widths")
    _refused(capsys, ["eval", str(elastic), "--bits", "4", "--text", str(root / "text.txt"),
                      "--seq-len", "10000", "--windows", "all"],
             "--seq-len 10000 is past the model's context of 1024 tokens: give 1024 or less")


def test_a_compact_checkpoints_float_row_is_named_as_its_master(folders, capsys):
    root, _, _ = folders
    text = ["--text", str(root / "text.txt"), "--seq-len", "64", "--windows", "2"]
    res = run_json(capsys, ["eval", str(root / "compact"), "--bits", "4", "--json", *text])
    assert res["float_is"].startswith("a compact checkpoint keeps 8-bit master codes")
    assert [r["bits"] for r in res["rows"]] == [None, 4]
    assert main(["eval", str(root / "compact"), "--bits", "4", *text]) == 0
    assert "note: a compact checkpoint keeps 8-bit master codes" in capsys.readouterr().out
    elastic = run_json(capsys, ["eval", str(root / "elastic"), "--bits", "4", "--json", *text])
    assert elastic["float_is"] is None


def test_run_refuses_a_backend_it_would_not_use_and_reports_no_decode_speed(folders, capsys):
    root, base, _ = folders
    _refused(capsys, ["run", str(base), "--backend", "dequant", "--prompt", "a"],
             "--backend picks the matmul of packed layers")
    res = run_json(capsys, ["run", str(root / "w4"), "--prompt", "It is", "--max-new-tokens",
                            "1", "--json"])
    assert res["runs"][0]["new_tokens"] == 1 and res["runs"][0]["decode_tokens_per_second"] is None
    assert main(["run", str(root / "w4"), "--prompt", "It is", "--max-new-tokens", "1"]) == 0
    assert "decode 0 tokens: n/a" in capsys.readouterr().out
