"""quept compact / export / run / eval on tiny model folders."""

import json

import pytest

import quept
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

    # the same hand-written file evaluates, as the fake-quantized model and as packed layers
    ev = ["--plan", str(root / "plan.json"), "--text", str(root / "text.txt"), "--windows", "2",
          "--seq-len", "32", "--json"]
    fake = run_json(capsys, ["eval", str(elastic), *ev])["plan"]
    packed = run_json(capsys, ["eval", str(elastic), "--packed", *ev])["plan"]
    exported = run_json(capsys, ["eval", str(root / "pm"), *ev[2:]])["rows"][0]["ppl"]
    for m in (fake, packed):
        assert m["bits_per_weight"] == pytest.approx(res["sizes"]["bits_per_weight"])
        assert m["stored_bytes"] == res["sizes"]["quantized_bytes"]
        assert m["widths"] == {str(b): list(plan.values()).count(b) for b in (2, 4, 8)}
    assert fake["ppl"] == pytest.approx(exported, rel=1e-3)
    assert packed["ppl"] == pytest.approx(exported, rel=1e-3)
    (root / "short.json").write_text(json.dumps(dict(list(plan.items())[1:])))
    assert main(["eval", str(elastic), "--plan", str(root / "short.json")]) == 2
    assert "short.json: plan does not match the model: 1 layer missing" in (
        capsys.readouterr().err)


def test_a_pattern_plan_is_the_plan_it_expands_to(folders, capsys, caplog):
    """A hand-written plan with patterns exports and evaluates as the full plan it stands
    for, through the command line."""
    root, _, elastic = folders
    import quept

    model, _ = quept.load(elastic)
    names = list(elastic_layers(model))
    full = {n: 4 if n.endswith("mlp.down_proj") else 8 if n == names[0] else 2 for n in names}
    (root / "pattern.json").write_text(json.dumps(
        {"*": 2, "*.mlp.down_proj": 4, names[0]: 8}))
    (root / "full.json").write_text(json.dumps(full))
    res = run_json(capsys, ["export", str(elastic), "--plan", str(root / "pattern.json"),
                            "--out", str(root / "pat"), "--json"])
    assert {n: v["bits"] for n, v in res["layers"].items()} == full
    ev = ["--text", str(root / "text.txt"), "--windows", "2", "--seq-len", "32", "--json"]
    got = [run_json(capsys, ["eval", str(elastic), "--plan", str(root / f), *ev])["plan"]
           for f in ("pattern.json", "full.json")]
    assert got[0]["ppl"] == got[1]["ppl"]
    assert got[0]["bits_per_weight"] == pytest.approx(res["sizes"]["bits_per_weight"])
    warned = [r.getMessage() for r in caplog.records if "different widths" in r.getMessage()]
    assert len(warned) == 3  # export and eval of pattern.json, eval of full.json
    assert all("gives the linears of 2 blocks different widths" in w for w in warned)
    # whole blocks at one width each: no warning
    caplog.clear()
    (root / "blocks.json").write_text(json.dumps({"*": 2, "model.layers.1.*": 4}))
    run_json(capsys, ["export", str(elastic), "--plan", str(root / "blocks.json"), "--out",
                      str(root / "blk"), "--json"])
    run_json(capsys, ["eval", str(elastic), "--plan", str(root / "blocks.json"), *ev])
    assert not [r for r in caplog.records if "different widths" in r.getMessage()]
    (root / "typo.json").write_text(json.dumps({"*": 2, "*.mlp.dwn_proj": 4}))
    assert main(["eval", str(elastic), "--plan", str(root / "typo.json")]) == 2
    assert "'*.mlp.dwn_proj' matches no layer" in capsys.readouterr().err
    # the same plan inline on the command line
    inline = f"*=2, *.mlp.down_proj=4, {names[0]}=8"
    same = run_json(capsys, ["eval", str(elastic), "--plan", inline, *ev])["plan"]
    assert same["ppl"] == got[0]["ppl"] and same["path"] == inline
    res = run_json(capsys, ["export", str(elastic), "--plan", inline, "--out",
                            str(root / "inl"), "--json"])
    assert {n: v["bits"] for n, v in res["layers"].items()} == full
    assert main(["eval", str(elastic), "--plan", "*=2,*.mlp.down_proj"]) == 2
    assert "cannot read an inline plan from '*=2,*.mlp.down_proj' (at '*.mlp.down_proj')" in (
        capsys.readouterr().err)
    assert main(["eval", str(elastic), "--plan", str(root / "nothing.json")]) == 2
    assert "a plan can also be given inline: '*=3,model.layers.0.*=8'" in (
        capsys.readouterr().err)


def test_clear_errors(folders, capsys):
    root, base, elastic = folders
    assert main(["export", str(base), "--bits", "3", "--out", str(root / "x")]) == 2
    assert "holds a Hugging Face model; this needs an elastic folder" in capsys.readouterr().err
    assert main(["export", str(elastic), "--bits", "9", "--out", str(root / "x")]) == 2
    assert "outside 2..8" in capsys.readouterr().err
    assert main(["run", str(elastic), "--prompt", "a"]) == 2
    assert ("holds an elastic model, which runs at any width: pick one with --bits"
            in capsys.readouterr().err)
    (root / "bad.json").write_text("[1, 2]")
    assert main(["export", str(elastic), "--plan", str(root / "bad.json"), "--out",
                 str(root / "x")]) == 2
    assert "layer name: bits" in capsys.readouterr().err
    assert main(["run", str(root / "missing"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_file_where_a_model_folder_is_read_is_named_as_a_file(folders, capsys):
    root, _, _ = folders
    (root / "notes.txt").write_text(TEXT)
    (root / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    for path, says in ((root / "notes.txt", "notes.txt is a file, not a folder: give a model "
                        "folder"),
                       (root / "model.gguf", "model.gguf is a GGUF file, not a model folder: "
                        "GGUF files run in llama.cpp")):
        for argv in (["export", str(path), "--bits", "4", "--out", str(root / "y")],
                     ["run", str(path), "--bits", "4", "--prompt", "It"],
                     ["compact", str(path), "--out", str(root / "y")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert says in err.strip().splitlines()[-1], err
    assert not (root / "y").exists()


def test_gguf_refusals_come_before_any_rounding_or_writing(folders, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from quept.cli import deploy

    root, _, elastic = folders
    (root / "t.txt").write_text(TEXT * 4)

    def no_rounding(*args, **kw):
        raise AssertionError("rounded before the export was checked")

    monkeypatch.setattr(deploy, "_export_round", no_rounding)
    argv = ["export", str(elastic), "--bits", "3", "--format", "gguf"]
    assert main([*argv, "--rounding", "gptq", "--calib-text", str(root / "t.txt"), "--samples",
                 "2", "--seq-len", "64", "--out", str(root / "gq.gguf")]) == 2
    assert "only byte-level BPE (gpt2-style) fast tokenizers" in capsys.readouterr().err
    assert not (root / "gq.gguf").exists()
    config = (elastic / "quept.json").read_bytes()
    (root / "keep.txt").write_text("the user's own file")
    for out, says in ((elastic / "quept.json", f"--out {elastic / 'quept.json'} is inside "
                       f"{elastic}, the folder being read; give a path outside it"),
                      (root / "keep.txt", "keep.txt is a file that is not a GGUF file; writing "
                       "the GGUF export there would replace it")):
        assert main([*argv, "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert says in err.strip().splitlines()[-1], err
    assert (elastic / "quept.json").read_bytes() == config
    assert (root / "keep.txt").read_text() == "the user's own file"


def test_bad_widths_and_texts_fail_before_any_model_loads(folders, capsys, monkeypatch):
    """A width the folder lacks or a text file that is missing is refused from the folder's
    JSON and the file system alone: no command loads a model first (minutes for a 7B)."""
    root, base, elastic = folders
    from quept import api

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    for name in ("load", "load_compact", "load_model", "load_switchable", "load_packed"):
        monkeypatch.setattr(api, name, no_load)
    (root / "plan9.json").write_text(json.dumps({"plan": {"model.layers.0.mlp.up_proj": 9}}))
    missing = str(root / "missing.txt")
    cases = [
        (["eval", str(elastic), "--bits", "3,9"], "--bits: bit-width 9 is outside 2..8"),
        (["eval", str(elastic), "--bits", "3", "--text", missing], "missing.txt' does not exist"),
        (["export", str(elastic), "--bits", "9", "--out", str(root / "x")], "--bits 9: bit-width 9"),
        (["export", str(elastic), "--plan", str(root / "plan9.json"), "--out", str(root / "x")],
         "plan9.json: entry 'model.layers.0.mlp.up_proj': bit-width 9"),
        (["export", str(elastic), "--bits", "3", "--rounding", "gptq", "--calib-text", missing,
          "--out", str(root / "x")], "missing.txt' does not exist"),
        (["run", str(elastic), "--bits", "4,9", "--prompt", "It"], "--bits 4,9: bit-width 9"),
        (["plan", str(elastic), "--avg-bits", "3", "--calib-text", missing, "--out",
          str(root / "p.json")], "missing.txt' does not exist"),
        (["quantize", "--model", str(base), "--calib-text", missing, "--out", str(root / "q")],
         "missing.txt' does not exist"),
        (["quantize", "--model", str(base), "--eval-text", missing, "--out", str(root / "q")],
         "missing.txt' does not exist"),
        (["quantize", "--model", str(base), "--eval-bits", "3,9", "--out", str(root / "q")],
         "--eval-bits: bit-width 9 is outside 2..8"),
        (["quantize", "--model", str(base), "--out", str(root / "plan9.json")],
         "plan9.json is a file"),
        (["export", str(elastic), "--bits", "3", "--format", "gguf", "--out", str(root)],
         "is a folder; give the path of the file to write there, e.g."),
        (["export", str(elastic), "--bits", "3", "--out", str(root / "plan9.json")],
         "plan9.json is a file; give a folder"),
        (["compact", str(elastic), "--out", str(root / "plan9.json")],
         "plan9.json is a file; give a folder"),
        (["compact", str(elastic), "--out", str(root / "c9"), "--master-bits", "1"],
         "master_bits must lie in 2..8"),
        # an --out that would spoil what it holds: the folder read, or a model of another kind
        (["export", str(elastic), "--bits", "3", "--out", str(elastic)],
         "is the folder being read; give another folder"),
        (["compact", str(elastic), "--out", str(elastic)], "is the folder being read"),
        (["export", str(elastic), "--bits", "3", "--out", str(base)],
         "holds a Hugging Face model; writing a packed model there would mix the two"),
        (["export", str(elastic), "--bits", "3", "--format", "onnx", "--out", str(elastic)],
         "is the folder being read"),
        (["compact", str(elastic), "--out", str(base)],
         "holds a Hugging Face model; writing a compact checkpoint there"),
        (["quantize", "--model", str(base), "--out", str(base)],
         "holds a Hugging Face model; writing an elastic model there"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (root / "x").exists() and not (root / "q").exists()


def test_a_text_changed_between_commands_is_read_again(folders, capsys):
    """Texts are kept for one command only: the second command sees the file's new content."""
    root, _, elastic = folders
    text = root / "changing.txt"
    ev = ["eval", str(elastic), "--bits", "3", "--text", str(text), "--windows", "all",
          "--seq-len", "32", "--json"]
    text.write_text(TEXT)
    first = run_json(capsys, ev)["windows"]
    text.write_text(TEXT * 2)
    assert run_json(capsys, ev)["windows"] >= 2 * first  # not the first read, kept


def quick_quantize(root, base, out) -> list[str]:
    """A quantize command line of a few seconds on the tiny model."""
    return ["quantize", "--model", str(base), "--out", str(out), "--calib-text",
            str(root / "text.txt"), "--samples", "2", "--seq-len", "16", "--ranks", "2,2,2,2",
            "--group-size", "32", "--eval-windows", "0", "--json"]


def test_quantize_into_a_folder_with_a_model_replaces_it_and_its_caches(folders, capsys,
                                                                       caplog):
    root, base, _ = folders
    out = root / "requantized"
    argv = quick_quantize(root, base, out)
    first = run_json(capsys, argv)
    assert "already holds an elastic model" not in caplog.text
    caches = ("sensitivity.json", "sensitivity-exact.json", "sweeps.json")
    for name in caches:
        (out / name).write_text("{}")  # as `quept plan` would have left them
    (out / "notes.txt").write_text("the user's own file")
    second = run_json(capsys, argv)
    assert "already holds an elastic model: this calibration replaces it" in caplog.text
    assert not any((out / name).exists() for name in caches)  # measured on the replaced model
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert second["out"] == first["out"] and (out / "quept.json").is_file()


def test_an_export_replaces_one_of_its_own_kind_but_not_another_kind(folders, capsys):
    root, base, elastic = folders
    out = root / "exported"
    run_json(capsys, ["export", str(elastic), "--bits", "3", "--out", str(out), "--json"])
    again = run_json(capsys, ["export", str(elastic), "--bits", "4", "--out", str(out),
                              "--json"])
    assert again["bits"] == 4
    assert run_json(capsys, ["info", str(out), "--json"])["bits"] == 4
    for argv, held in ((["export", str(elastic), "--bits", "3", "--format",
                         "compressed-tensors", "--out", str(out)], "a packed model"),
                       (["compact", str(elastic), "--out", str(out)], "a packed model"),
                       (["quantize", "--model", str(base), "--out", str(out)], "a packed model")):
        assert main(argv) == 2, argv
        assert f"--out {out} holds {held}" in capsys.readouterr().err
    assert run_json(capsys, ["info", str(out), "--json"])["bits"] == 4  # left as it was


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_interrupted_quantize_says_what_is_kept_and_resumes(folders, capsys, monkeypatch,
                                                               caplog, stop):
    """Ctrl-C, and SIGTERM (a scheduler's or `timeout`'s stop) the same way."""
    import os
    import signal
    import time

    from quept.calib import loop

    root, base, _ = folders
    out = root / f"interrupted-{stop}"
    argv = quick_quantize(root, base, out)
    real = loop.BlockCalibrator._train

    def ctrl_c_in_second_block(self, i, *args, **kw):
        if i == 1 and stop == "ctrl-c":
            raise KeyboardInterrupt
        if i == 1:  # the handler raises in this frame; without one the test process would end
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM did not stop the command")
        return real(self, i, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(loop.BlockCalibrator, "_train", ctrl_c_in_second_block)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "quept: interrupted: 1 block(s) are kept in" in err and "Traceback" not in err
    assert "the same command resumes at the next" in err
    with caplog.at_level("INFO", logger="quept.calib.checkpoint"):
        run_json(capsys, argv)
    assert "resuming calibration at block 1" in caplog.text
    assert (out / "quept.json").is_file()


def test_the_python_writers_refuse_a_folder_holding_another_kind(folders):
    from quept.config import ConfigError

    root, base, elastic = folders
    model, tok = quept.load(elastic)
    for write, says in ((lambda: quept.api.export(model, 3, elastic, tokenizer=tok),
                         "holds an elastic model; writing a packed model there"),
                        (lambda: quept.api.export(model, 3, base, "onnx", tokenizer=tok),
                         "holds a Hugging Face model; writing an ONNX export there"),
                        (lambda: quept.api.save_compact(model, base),
                         "holds a Hugging Face model; writing a compact checkpoint there"),
                        (lambda: quept.save(model, base, quept.QuEPTConfig(spec=model.quept_spec)),
                         "holds a Hugging Face model; writing an elastic model there")):
        with pytest.raises(ConfigError, match=says):
            write()
    assert quept.api.folder_kind(elastic) == "elastic" and quept.api.folder_kind(base) == "hf"


def test_run_refuses_a_keep_mb_that_is_no_size_and_a_prompt_of_no_tokens(folders, capsys):
    root, _, elastic = folders
    for value in ("nan", "inf", "-1"):
        assert main(["run", str(elastic), "--bits", "4", "--keep-mb", value, "--prompt",
                     "x"]) == 2
        assert "--keep-mb must be a finite number >= 0" in capsys.readouterr().err
    from quept.export.runtime import generate

    model, tok = quept.load(elastic)
    quept.set_bits(model, 4)
    with pytest.raises(ValueError, match="gives no tokens with this tokenizer"):
        generate(model, lambda text, **kw: tok("", **kw), "   ", 2, warmup=False)
