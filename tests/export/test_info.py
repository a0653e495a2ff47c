"""quept info: what each artifact holds, read from its JSON and tensor headers alone."""

import json

import pytest

import quept
from quept.cli import main
from quept.info import InfoError, describe, render
from quept.nn import elastic_layers

from .tiny import elastic_folder, hf_folder, run_json


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    base = hf_folder(root / "base")
    elastic = elastic_folder(root / "elastic", base)
    return root, base, elastic


def test_elastic_folder_counts_what_the_loaded_model_stores(folders, capsys):
    _, _, elastic = folders
    info = run_json(capsys, ["info", str(elastic), "--json"])
    model, _ = quept.load(elastic)
    layers = elastic_layers(model)
    assert info["kind"] == "elastic" and info["layers"] == len(layers) == 14
    assert info["quantized_weights"] == sum(m.in_features * m.out_features
                                            for m in layers.values())
    assert [r["bits"] for r in info["widths"]] == [2, 3, 4, 5, 6, 7, 8]
    for r in info["widths"]:
        assert r["bits_per_weight"] == pytest.approx(quept.stored_bits(model, r["bits"]))
        assert r["quantized_bytes"] == pytest.approx(r["bits_per_weight"]
                                                     * info["quantized_weights"] / 8)
    assert info["spec"]["ranks"] == [2, 2, 2, 2] and info["calibration"]["samples"] == 2
    assert "evaluation" not in info and "sensitivity" not in info
    text = render(info)
    assert "| W3 | 3.594 |" in text and "no sensitivity table yet" in text
    assert main(["info", str(elastic)]) == 0
    assert "elastic model" in capsys.readouterr().out


def quantize_argv(tmp_path) -> list[str]:
    """`quept quantize` of a tiny model into tmp_path/el, two 32-token samples, text t.txt."""
    base = hf_folder(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 40)
    return ["quantize", "--model", str(base), "--out", str(tmp_path / "el"), "--calib-text",
            str(text), "--eval-text", str(text), "--samples", "2", "--seq-len", "32",
            "--group-size", "32"]


def test_quantize_records_its_evaluation_for_info(tmp_path, capsys):
    out = tmp_path / "el"
    res = run_json(capsys, [*quantize_argv(tmp_path), "--eval-windows", "1", "--eval-bits", "3",
                            "--json"])
    info = describe(out)
    ev = info["evaluation"]
    assert ev["metric"] == "perplexity" and ev["data"] == "1 windows x 512 tokens of t.txt"
    assert [(r["bits"], r["value"], r["rtn"]) for r in ev["rows"]] == [
        (r["bits"], r["ppl"], r["ppl_rtn"]) for r in res["rows"]]
    assert info["calibration"]["seconds"] == pytest.approx(res["calibration_seconds"])
    shown = render(info)
    w3 = res["rows"][1]
    assert "| W3 | 3.594 | " in shown and f"| {w3['ppl']:.2f} | {w3['ppl_rtn']:.2f} |" in shown
    assert f"| float | 32 | | {res['rows'][0]['ppl']:.2f} |" in shown
    quept.load(out)  # the record leaves the folder loadable


def test_packed_plan_compact_and_compressed_tensors(folders, capsys):
    root, _, elastic = folders
    res = run_json(capsys, ["export", str(elastic), "--bits", "3", "--out", str(root / "p3"),
                            "--json"])
    info = run_json(capsys, ["info", str(root / "p3"), "--json"])
    assert info["kind"] == "packed" and info["bits"] == 3 and info["layer_widths"] == {"3": 14}
    assert info["bits_per_weight"] == res["sizes"]["bits_per_weight"]
    assert info["activations"] is None and info["kv_bits"] is None
    assert "W3 for all 14 quantized linears" in render(info)

    names = list(elastic_layers(quept.load(elastic)[0]))
    (root / "plan.json").write_text(json.dumps({n: (2, 4)[i % 2] for i, n in enumerate(names)}))
    run_json(capsys, ["export", str(elastic), "--plan", str(root / "plan.json"), "--out",
                      str(root / "pm"), "--json"])
    info = describe(root / "pm")
    assert info["bits"] == "mixed" and info["layer_widths"] == {"2": 7, "4": 7}
    assert "a plan (W2: 7, W4: 7)" in render(info)

    res = run_json(capsys, ["compact", str(elastic), "--out", str(root / "c"), "--json"])
    info = describe(root / "c")
    assert info["kind"] == "compact" and info["bits_per_weight"] == res["bits_per_weight"]
    assert info["widths"] == describe(elastic)["widths"]

    res = run_json(capsys, ["export", str(elastic), "--bits", "4", "--format",
                            "compressed-tensors", "--out", str(root / "ct"), "--json"])
    info = describe(root / "ct")
    assert info["kind"] == "compressed-tensors" and info["model_type"] == "llama"
    assert [(g["num_bits"], g["group_size"], g["symmetric"]) for g in info["groups"]] == [
        (4, 32, False)]
    assert info["export"]["bits_per_weight"] == res["bits_per_weight"]
    assert "4-bit asymmetric group weights, group size 32" in render(info)


def test_plain_model_folder_and_sensitivity_table(folders, capsys):
    root, base, elastic = folders
    info = describe(base)
    model, _ = quept.load_model(base)
    assert info["kind"] == "hf" and info["family"] == "llama-decoder"
    assert info["parameters"] == model.num_parameters()
    assert "not quantized; `quept quantize --model FOLDER` calibrates it" in render(info)
    cfg = json.loads((base / "config.json").read_text())
    other = root / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    assert "not supported by quept: model_type 'mamba'" in render(describe(other))

    table = {"format": "quept-sensitivity", "version": 1, "fingerprint": "0" * 16,
             "bits": [2, 3], "group_size": {"2": 32, "3": 32}, "seconds": 1.5,
             "settings": {"tokens": 64},
             "layers": {n: {"out": 64, "in": 64, "kl": [0.2, 0.1]} for n in ("a", "b")}}
    (elastic / "sensitivity.json").write_text(json.dumps(table))
    try:
        info = describe(elastic)
        assert info["sensitivity"]["layers"] == 2 and info["sensitivity"]["widths"] == [2, 3]
        assert "sensitivity table cached (2 layers x 2 widths" in render(info)
    finally:
        (elastic / "sensitivity.json").unlink()
    sweeps = elastic / "sweeps.json"
    try:
        sweeps.write_text("{not json")  # a broken cache is named, not fatal
        assert "in-context sweeps: " in render(describe(elastic))
        assert "is not valid JSON" in render(describe(elastic))
    finally:
        sweeps.unlink()


def test_gguf_file(tmp_path, capsys):
    pytest.importorskip("gguf")
    from quept.export.gguf import write_gguf
    from tests.export.test_gguf import elastic_tiny, tiny_tokenizer

    path = write_gguf(elastic_tiny(), tiny_tokenizer(), tmp_path / "m.gguf", 5)
    info = run_json(capsys, ["info", str(path), "--json"])
    assert info["kind"] == "gguf" and info["general.architecture"] == "llama"
    assert info["tensor_types"]["Q5_1"] == 14 and info["tensors"] > 14
    assert "GGUF file (llama)" in render(info)


def test_gguf_file_widths_and_bits_per_weight(tmp_path, capsys):
    # before: only tensor type counts ("F16 1, F32 5, Q4_1 14"), no widths or bits per weight
    pytest.importorskip("gguf")
    from quept.export.gguf import read_sizes, write_gguf
    from tests.export.test_gguf import elastic_tiny, tiny_tokenizer

    model = elastic_tiny()
    names = list(elastic_layers(model))
    plan = {n: (2, 5, 7, None)[i % 4] for i, n in enumerate(names)}
    path = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", plan)
    info = run_json(capsys, ["info", str(path), "--json"])
    types = info["linear_types"]
    assert {q: (r["layers"], r["widths"]) for q, r in types.items()} == {
        "Q4_1": (4, [2, 3, 4]), "Q5_1": (4, [5]), "Q8_0": (3, [6, 7, 8]), "F16": (3, [])}
    for qtype, bits in (("Q4_1", 5.0), ("Q5_1", 6.0), ("Q8_0", 8.5), ("F16", 16.0)):
        assert types[qtype]["bits_per_weight"] == bits  # GGUF's block sizes, scales included
    quantized = [n for n in names if plan[n] is not None]
    weights = sum(elastic_layers(model)[n].weight.numel() for n in quantized)
    assert info["quantized_linears"] == 11 and info["float_linears"] == 3
    assert info["quantized_weights"] == weights
    assert info["bits_per_weight"] == pytest.approx(info["quantized_bytes"] * 8 / weights)
    assert read_sizes(path) == {**{k: info[k] for k in (
        "linear_types", "quantized_linears", "float_linears", "quantized_weights",
        "quantized_bytes", "bits_per_weight")}, "file_bytes": path.stat().st_size}
    text = render(info)
    assert ("Q4_1 linears: 4, 2..4-bit codes (Q4_1 stores each of these widths alike: which one "
            "is not recorded); 5.000 bits per weight stored") in text
    assert "Q5_1 linears: 4, 5-bit codes; 6.000 bits per weight" in text
    assert "F16 linears: 3, float; 16.000 bits per weight" in text
    assert f"quantized linears: 11, {info['bits_per_weight']:.3f} bits per weight" in text


def test_a_truncated_gguf_file_is_named_truncated(tmp_path, capsys):
    pytest.importorskip("gguf")
    from quept.export.gguf import write_gguf
    from tests.export.test_gguf import elastic_tiny, tiny_tokenizer

    whole = write_gguf(elastic_tiny(), tiny_tokenizer(), tmp_path / "m.gguf", 4).read_bytes()
    for n in (10, 100, 2000, 5000, len(whole) // 2, len(whole) - 1):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(whole[:n])
        assert main(["info", str(cut)]) == 2, n
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"quept: error: {cut} is truncated or damaged: "), err
        assert "Traceback" not in err
    (tmp_path / "notes.gguf").write_text("not a gguf file at all")
    assert main(["info", str(tmp_path / "notes.gguf")]) == 2
    assert "does not start with the GGUF magic bytes" in capsys.readouterr().err


def test_bad_paths_and_damaged_folders_fail_clearly(folders, tmp_path, capsys):
    _, base, elastic = folders
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["info", str(tmp_path / "notes.txt")]) == 2
    assert "a .gguf file, a plan JSON from `quept plan`, or a folder" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "not a quept artifact or a Hugging Face model folder" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    assert main(["info", str(tmp_path / "bad.gguf")]) == 2
    assert "cannot be read as GGUF" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "quept.json").write_text((elastic / "quept.json").read_text())
    (broken / "elastic.safetensors").write_bytes(
        (elastic / "elastic.safetensors").read_bytes()[:100])
    assert main(["info", str(broken)]) == 2
    assert "elastic.safetensors cannot be read" in capsys.readouterr().err
    meta = json.loads((elastic / "quept.json").read_text())
    (broken / "elastic.safetensors").write_bytes((elastic / "elastic.safetensors").read_bytes())
    (broken / "quept.json").write_text(json.dumps({**meta, "layers": [*meta["layers"], "x.y"]}))
    assert main(["info", str(broken)]) == 2
    assert "has no adapter of layer x.y" in capsys.readouterr().err
    (broken / "quept.json").write_text("{")
    assert main(["info", str(broken)]) == 2
    assert "quept.json is not valid JSON" in capsys.readouterr().err


def test_unfinished_calibration_checkpoint(tmp_path, capsys):
    out = tmp_path / "el"
    assert main([*quantize_argv(tmp_path), "--eval-windows", "0", "--keep-streams"]) == 0
    capsys.readouterr()
    kept = describe(out)
    assert kept["kind"] == "elastic" and kept["checkpoint_bytes"] > 0
    assert "calibration checkpoint kept in .calib-checkpoint" in render(kept)

    # as if the run had been killed after block 0: no elastic folder yet, one block recorded
    (out / "quept.json").unlink()
    (out / "elastic.safetensors").unlink()
    ckpt = out / ".calib-checkpoint"
    prog = json.loads((ckpt / "progress.json").read_text())
    (ckpt / "progress.json").write_text(json.dumps(
        {**prog, "next_block": 1, "reports": prog["reports"][:1]}))
    for path in (out, ckpt):
        info = describe(path)
        assert info["kind"] == "calibration checkpoint" and info["blocks_done"] == 1
        assert info["seconds"] == pytest.approx(prog["reports"][0]["seconds"])
        assert info["spec"]["group_size"]["3"] == 32 and info["calibration"]["samples"] == 2
        assert info["last_block"]["block"] == 0
    shown = render(describe(out))
    assert "blocks 0..0 done" in shown and "resumes at block 1" in shown
    assert "block 0 loss before -> after training: W" in shown
    assert main(["eval", str(out)]) == 2
    assert "holds an unfinished calibration" in capsys.readouterr().err
    (ckpt / "progress.json").write_text("{}")
    assert main(["info", str(out)]) == 2
    assert "cannot be read as a calibration checkpoint" in capsys.readouterr().err


def test_metadata_with_a_field_missing_is_named_as_damaged(folders, tmp_path):
    _, _, elastic = folders
    assert main(["export", str(elastic), "--bits", "3", "--out", str(tmp_path / "p3")]) == 0
    meta = json.loads((tmp_path / "p3" / "quept-packed.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "quept-packed.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                        if k != "sizes"}))
    with pytest.raises(InfoError, match="quept-packed.json is damaged: it holds no 'sizes', "
                                        "which should be a JSON object"):
        describe(bare)


def test_plan_file(tmp_path, capsys):
    from quept.search import Plan

    widths = {f"model.layers.{k}.{ln}": b for k, b in ((0, 3), (1, 2))
              for ln in ("self_attn.q_proj", "mlp.down_proj")}
    widths["model.layers.2.mlp.down_proj"] = 4
    widths["model.layers.2.mlp.up_proj"] = 3
    plan = Plan(widths, 2.9922, 1234567.0, 4096, {"avg_bits": 3.0}, 0.25, True, "layer",
                {"layer": 0.31, "block, from W3": 0.27}, "table")
    path = plan.save(tmp_path / "plan.json")
    info = run_json(capsys, ["info", str(path), "--json"])
    assert info["kind"] == "plan" and info["layers"] == 6
    assert info["layers_per_width"] == {"2": 2, "3": 3, "4": 1}
    assert info["blocks"] == {"model.layers.0": [3], "model.layers.1": [2],
                              "model.layers.2": [3, 4]}
    text = render(info)
    assert "budget avg_bits 3; realised 2.9922 stored bits per weight, 1.23 MB" in text
    assert "layers per width: W2 2, W3 3, W4 1" in text
    assert "widths per block, in order: 3 2 3/4" in text
    assert "chosen: layer (measured KL per token, lowest kept: layer 0.3100" in text
    (tmp_path / "other.json").write_text('{"format": "quept-elastic"}')
    (tmp_path / "bad.json").write_text('{"format": "quept-plan", "version": 1, "bits": {}}')
    for name, why in (("other.json", "is not a plan from `quept plan`"),
                      ("bad.json", "'bits' must map layer names to widths")):
        assert main(["info", str(tmp_path / name)]) == 2
        assert why in capsys.readouterr().err


def test_hand_written_plan_file(tmp_path, capsys):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps({"*": 3, "*.mlp.down_proj": 5, "model.layers.0.mlp.up_proj": 8}))
    info = run_json(capsys, ["info", str(path), "--json"])
    assert info["kind"] == "hand plan" and info["patterns"] == 2 and info["names"] == 1
    assert info["widths"] == [3, 5, 8]
    text = render(info)
    assert "hand-written plan, 3 entries (2 patterns, 1 layer names), widths W3, W5, W8" in text
    assert ("in the order they apply (a later one wins where two match): *: 3, "
            "*.mlp.down_proj: 5, model.layers.0.mlp.up_proj: 8") in text
    names = {f"model.layers.{k}.mlp.down_proj": b for k, b in ((0, 3), (1, 2))}
    path.write_text(json.dumps({"plan": names}))
    text = render(run_json(capsys, ["info", str(path), "--json"]))
    assert "widths per block, in order: 3 2" in text
    path.write_text(json.dumps({"model.layers.0.mlp.down_proj": 9}))
    assert main(["info", str(path)]) == 2
    assert "entry 'model.layers.0.mlp.down_proj': bit-width 9 is outside 2..8" in (
        capsys.readouterr().err)


def test_folder_of_plans(tmp_path, capsys):
    from quept.search import Plan

    widths = {f"model.layers.{k}.mlp.down_proj": 3 for k in range(2)}
    plans = tmp_path / "plans"
    for name, bpw, low in (("plan-3.5bits.json", 3.4, 3), ("plan-2.5bits.json", 2.5, 2)):
        Plan({**widths, "model.layers.0.mlp.down_proj": low}, bpw, 1e6, 4096,
             {"avg_bits": float(name[5:8])}, 0.1, True, "layer").save(plans / name)
    info = run_json(capsys, ["info", str(plans), "--json"])
    assert info["kind"] == "plans"
    assert [d["path"] for d in info["plans"]] == [str(plans / "plan-2.5bits.json"),
                                                  str(plans / "plan-3.5bits.json")]
    text = render(info)
    assert "2 mixed-precision plans, fewest bits first" in text
    assert ("  plan-2.5bits.json: budget avg_bits 2.5; 2.5000 bits per weight, 1.00 MB; "
            "W2 1, W3 1; chosen: layer") in text
    (plans / "bad.json").write_text('{"format": "quept-plan", "version": 1, "bits": {}}')
    assert main(["info", str(plans)]) == 2
    assert "'bits' must map layer names to widths" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.json").write_text('{"a": 1}')
    assert main(["info", str(tmp_path / "other")]) == 2
    assert "config.json or plan files" in capsys.readouterr().err
