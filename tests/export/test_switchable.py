"""Switchable packed models: packed layers that re-pack in memory for another width or plan."""

import json

import pytest
import torch

import quept
from quept.cli import main
from quept.export.packed import PackedFormatError
from quept.nn import ElasticLinear, elastic_layers
from quept.nn.packed_linear import PackedLinear

from .tiny import TEXT, elastic_folder, hf_folder, run_json

IDS = torch.tensor([[5, 9, 14, 3, 27, 40, 11, 2, 60, 33, 7, 19]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    base = hf_folder(root / "base")
    elastic = elastic_folder(root / "elastic", base)
    model, tok = quept.load(elastic)
    quept.api.save_compact(model, root / "compact", tokenizer=tok)
    compact, _ = quept.api.load_compact(root / "compact")
    names = list(elastic_layers(compact))
    plan = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    for label, config in (("p3", 3), ("p2", 2), ("pplan", plan)):
        quept.api.export(compact, config, root / label, tokenizer=tok)
    quept.api.export(model, 4, root / "e4", tokenizer=tok)
    quept.api.export(compact, 2, root / "h2", tokenizer=tok, head_bits=8)
    (root / "plan.json").write_text(json.dumps({"plan": plan}))
    (root / "text.txt").write_text(TEXT)
    return root, elastic, plan


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def packed_logits(folder):
    return logits(quept.api.load_packed(folder)[0])


def test_compact_switches_to_exactly_the_exported_codes(folders):
    root, _, plan = folders
    model, tok = quept.load_switchable(root / "compact", 3)
    assert tok is not None
    assert not any(isinstance(m, ElasticLinear) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == len(plan) and {m.bits for m in layers} == {3}
    w3 = logits(model)
    assert torch.equal(w3, packed_logits(root / "p3"))

    sw = model.quept_switch
    report = sw.set_bits(2)
    assert report.repacked == len(plan) and report.bits_per_weight == pytest.approx(2 + 18 / 32)
    assert torch.equal(logits(model), packed_logits(root / "p2"))
    quept.set_bits(model, plan)  # the public verb re-packs a switchable model
    assert sw.widths == plan
    assert torch.equal(logits(model), packed_logits(root / "pplan"))
    assert sw.set_bits(3).repacked == sum(b != 3 for b in plan.values())
    assert torch.equal(logits(model), w3)  # switching back gives the same model


def test_only_changed_layers_are_repacked_and_sizes_add_up(folders):
    root, _, plan = folders
    model, _ = quept.load_switchable(root / "compact", plan)
    sw = model.quept_switch
    first = next(iter(sw.skeletons()))
    other = 8 if plan[first] != 8 else 2
    report = sw.set_bits({**plan, first: other})
    assert report.repacked == 1 and sw.widths[first] == other
    assert model.get_submodule(first).bits == other
    s = sw.sizes()
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert s["packed_bytes"] == sum(m.code_bytes() for m in packed)
    assert s["quantized_weights"] == sum(m.in_features * m.out_features for m in packed)
    assert s["source"] == "compact"
    # the compact source is smaller than the float32 layers it stands for
    assert 8 < s["source_bits_per_weight"] < 32
    compact_meta = json.loads((root / "compact" / "quept-compact.json").read_text())
    assert s["source_bytes"] == compact_meta["sizes"]["elastic_bytes"]


def test_kept_widths_switch_back_without_packing(folders):
    root, _, plan = folders
    n = len(plan)
    model, _ = quept.load_switchable(root / "compact", 3, keep_bytes=10**9)
    sw = model.quept_switch
    w3 = logits(model)
    assert sw.set_bits(2).repacked == n and sw.kept_bytes() > 0  # the W3 layers are kept
    back = sw.set_bits(3)
    assert (back.repacked, back.reused) == (0, n)
    assert torch.equal(logits(model), w3)
    # a budget of the W3 codes: on to W4, every W2 layer is kept and W3 layers are dropped,
    # least recently used first, until the kept codes fit
    w3_bytes = sum(m.stored_bytes() for m in model.modules() if isinstance(m, PackedLinear))
    model, _ = quept.load_switchable(root / "compact", 3, keep_bytes=w3_bytes)
    sw = model.quept_switch
    sw.set_bits(2)
    sw.set_bits(4)
    kept = [k for k in sw._kept]
    assert sorted(n for n, b in kept if b == 2) == sorted(plan)
    assert 0 < sum(b == 3 for _, b in kept) < n and sw.kept_bytes() <= w3_bytes
    assert kept[: sum(b == 3 for _, b in kept)] == [k for k in kept if k[1] == 3]  # oldest
    assert sw.set_bits(2).reused == n
    assert torch.equal(logits(model), packed_logits(root / "p2"))
    with pytest.raises(PackedFormatError, match="keep_bytes must be a whole number of bytes >= 0, got -1"):
        quept.load_switchable(root / "compact", 3, keep_bytes=-1)


def test_prefetch_makes_the_next_switch_a_swap(folders):
    root, _, plan = folders
    model, _ = quept.load_switchable(root / "compact", 3, keep_bytes=10**9)
    sw = model.quept_switch
    w3 = logits(model)
    assert sw.prefetch(2).repacked == len(plan)
    assert sw.widths == dict.fromkeys(plan, 3) and torch.equal(logits(model), w3)  # no switch
    assert sw.prefetch(2).repacked == 0  # already kept
    report = sw.set_bits(2)
    assert (report.repacked, report.reused) == (0, len(plan))
    assert torch.equal(logits(model), packed_logits(root / "p2"))
    plain, _ = quept.load_switchable(root / "compact", 3)
    with pytest.raises(PackedFormatError, match="keep_bytes budget"):
        plain.quept_switch.prefetch(2)


def test_evaluate_and_stored_bits_of_a_switchable_model(folders):
    from quept.eval import perplexity

    root, _, plan = folders
    model, _ = quept.load_switchable(root / "compact", 4)
    windows = torch.randint(2, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    rows = quept.evaluate(model, windows, [2, 3], progress=False)
    assert [r.bits for r in rows] == [2, 3]
    for row, folder in zip(rows, ("p2", "p3")):
        packed, _ = quept.api.load_packed(root / folder)
        assert row.ppl == pytest.approx(perplexity(packed, windows, progress=False), rel=1e-9)
        assert row.bits_per_weight == pytest.approx(row.bits + (16 + row.bits) / 32)
    assert model.quept_switch.widths == dict.fromkeys(plan, 4)  # back where it was
    assert quept.stored_bits(model) == pytest.approx(4 + 20 / 32)
    assert quept.stored_bits(model, 2) == pytest.approx(2 + 18 / 32)
    with pytest.raises(quept.ConfigError, match="no float layers and no RTN"):
        quept.evaluate(model, windows, [None, 2], progress=False)


def test_elastic_source(folders):
    root, elastic, _ = folders
    model, _ = quept.load_switchable(elastic, 4)
    assert model.quept_switch.source == "elastic"
    assert torch.equal(logits(model), packed_logits(root / "e4"))
    assert model.quept_switch.sizes()["source_bits_per_weight"] > 32  # float32 + adapters


def test_packed_head(folders):
    root, _, _ = folders
    model, _ = quept.load_switchable(root / "compact", 3, head_bits=8)
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.bits == 8
    quept.set_bits(model, 2)
    assert model.get_output_embeddings() is head  # the head does not switch
    assert torch.equal(logits(model), packed_logits(root / "h2"))
    s = model.quept_switch.sizes()
    assert s["head_bits"] == 8 and s["head_bytes"] == head.stored_bytes()
    with pytest.raises(quept.ConfigError, match="outside 2..8"):
        quept.load_switchable(root / "compact", 3, head_bits=9)


def test_bad_widths_and_plans_are_named(folders):
    root, _, plan = folders
    model, _ = quept.load_switchable(root / "compact", 4)
    with pytest.raises(quept.ConfigError, match="bit-width 9 is outside 2..8"):
        quept.set_bits(model, 9)
    with pytest.raises(PackedFormatError, match="no float layers"):
        quept.set_bits(model, None)
    with pytest.raises(PackedFormatError, match="1 layer missing"):
        quept.set_bits(model, dict(list(plan.items())[1:]))
    with pytest.raises(quept.ConfigError, match="round-to-nearest"):
        quept.set_bits(model, 3, rtn=True)
    assert {m.bits for m in model.modules() if isinstance(m, PackedLinear)} == {4}
    with pytest.raises(PackedFormatError, match="scale dtype"):
        quept.load_switchable(root / "compact", 4, scale_dtype="bfloat16")


def test_a_damaged_compact_source_is_named(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _, plan = folders
    shutil.copytree(root / "compact", tmp_path / "c")
    raw = load_file(str(tmp_path / "c" / "compact.safetensors"))
    first = next(iter(plan))
    del raw[f"{first}.master"]
    save_file(raw, str(tmp_path / "c" / "compact.safetensors"))
    with pytest.raises(PackedFormatError, match=f"layer {first} cannot be rebuilt"):
        quept.load_switchable(tmp_path / "c", 3)


def test_cli_runs_several_widths_in_one_model(folders, capsys):
    root, _, _ = folders
    gen = ["--prompt", "It is a truth", "--max-new-tokens", "5", "--no-eos", "--json"]
    res = run_json(capsys, ["run", str(root / "compact"), "--bits", "3,2", *gen])
    assert res["mode"] == "packed" and [r["config"] for r in res["runs"]] == ["W3", "W2"]
    assert res["runs"][0]["switch_seconds"] is None and res["runs"][1]["switch_seconds"] > 0
    assert res["runs"][1]["bits_per_weight"] == pytest.approx(2 + 18 / 32)
    assert res["memory"]["source"] == "compact" and res["memory"]["packed_bytes"] > 0
    for run, folder in zip(res["runs"], ("p3", "p2")):
        assert run["new_tokens"] == 5
        assert run["text"] == run_json(capsys, ["run", str(root / folder), *gen])["text"]
    fake = run_json(capsys, ["run", str(root / "compact"), "--bits", "3", "--fake-quant", *gen])
    assert fake["mode"] == "fake-quantized" and fake["text"] == res["runs"][0]["text"]
    kept = run_json(capsys, ["run", str(root / "compact"), "--bits", "3,2,3", "--keep-mb", "10",
                             *gen])
    assert [r["layers_kept"] for r in kept["runs"]] == [0, 0, len(_names(root))]
    assert kept["runs"][2]["text"] == res["runs"][0]["text"]
    headed = run_json(capsys, ["run", str(root / "compact"), "--bits", "2", "--head-bits", "8",
                               *gen])
    assert headed["memory"]["head_bits"] == 8
    assert headed["text"] == run_json(capsys, ["run", str(root / "h2"), *gen])["text"]
    planned = run_json(capsys, ["run", str(root / "compact"), "--plan",
                                str(root / "plan.json"), *gen])
    assert planned["text"] == run_json(capsys, ["run", str(root / "pplan"), *gen])["text"]
    plans = root / "plans"  # a folder of plans runs them fewest bits first
    plans.mkdir()
    _, _, widths = folders
    compact, _ = quept.api.load_compact(root / "compact")  # plans recording what they store
    quept.plan_record(compact, widths).save(plans / "a.json")
    quept.plan_record(compact, {n: 2 for n in widths}).save(plans / "b.json")
    both = run_json(capsys, ["run", str(root / "compact"), "--plan", str(plans), *gen])
    assert [r["config"] for r in both["runs"]] == [f"plan {plans / 'b.json'}",
                                                    f"plan {plans / 'a.json'}"]
    assert [r["text"] for r in both["runs"]] == [res["runs"][1]["text"], planned["text"]]


def test_cli_eval_packed(folders, capsys):
    root, _, _ = folders
    ev = ["--text", str(root / "text.txt"), "--windows", "2", "--seq-len", "32", "--json"]
    res = run_json(capsys, ["eval", str(root / "compact"), "--bits", "3,2", "--packed", *ev])
    assert res["packed"] and [r["bits"] for r in res["rows"]] == [3, 2]
    for row, folder in zip(res["rows"], ("p3", "p2")):
        ref = run_json(capsys, ["eval", str(root / folder), *ev])["rows"][0]
        assert row["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)
        assert row["bits_per_weight"] == pytest.approx(ref["bits_per_weight"])
    fake = run_json(capsys, ["eval", str(root / "compact"), "--bits", "3", *ev])
    assert not fake["packed"] and [r["bits"] for r in fake["rows"]] == [None, 3]
    assert main(["eval", str(root / "compact"), "--packed", "--rtn"]) == 2
    assert "not with --rtn or --tasks" in capsys.readouterr().err
    assert main(["eval", str(root / "base"), "--packed"]) == 2
    assert "--packed applies to elastic and compact folders" in capsys.readouterr().err


def _names(root):
    return json.loads((root / "compact" / "quept-compact.json").read_text())["layers"]


def test_cli_run_errors(folders, capsys):
    root, elastic, _ = folders
    assert main(["run", str(elastic), "--bits", "4,x", "--prompt", "a"]) == 2
    assert "widths separated by commas" in capsys.readouterr().err
    assert main(["run", str(root / "p3"), "--bits", "3", "--prompt", "a"]) == 2
    assert ("holds a packed model, which runs as it was written: --bits and --plan pick the "
            "width of an elastic or compact folder") in capsys.readouterr().err
    assert main(["run", str(root / "p3"), "--fake-quant", "--prompt", "a"]) == 2
    assert "--fake-quant applies to elastic and compact" in capsys.readouterr().err
    assert main(["run", str(root / "p3"), "--head-bits", "8", "--prompt", "a"]) == 2
    assert "--head-bits applies to elastic and compact" in capsys.readouterr().err
    assert main(["run", str(root / "p3"), "--keep-mb", "8", "--prompt", "a"]) == 2
    assert "--keep-mb applies to elastic and compact" in capsys.readouterr().err
    assert main(["run", str(root / "compact"), "--bits", "9", "--prompt", "a"]) == 2
    assert "bit-width 9 is outside 2..8" in capsys.readouterr().err
    assert main(["run", str(elastic), "--bits", "3", "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    for option in ("--max-new-tokens", "--prefill-chunk"):
        with pytest.raises(SystemExit):
            main(["run", str(elastic), "--bits", "3", "--prompt", "a", option, "0"])
        assert "expected a positive number of tokens, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["kv-cache", "weight+activation"])
def test_quantized_cache_and_activations_follow_the_switch(mode, tmp_path):
    from quept.config import ElasticSpec, weight_act_spec
    from quept.export.switchable import make_switchable

    from .tiny import elastic_tiny

    spec = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=16,
                       kv_bits=4 if mode == "kv-cache" else None)
    model = elastic_tiny(spec if mode == "kv-cache" else weight_act_spec(spec))
    quept.api.export(model, 4, tmp_path / "p4")
    quept.api.export(model, 6, tmp_path / "p6")
    make_switchable(model, 6)
    assert torch.equal(logits(model), packed_logits(tmp_path / "p6"))
    quept.set_bits(model, 4)
    assert torch.equal(logits(model), packed_logits(tmp_path / "p4"))
    if mode == "kv-cache":  # generation keeps the switched model's cache as codes
        from quept.export.runtime import generate

        from .tiny import char_tokenizer

        tok = char_tokenizer()
        mine = generate(model, tok, "It is a truth", 6, stop_at_eos=False, kv_cache="quantized")
        ref = generate(quept.api.load_packed(tmp_path / "p4")[0], tok, "It is a truth", 6,
                       stop_at_eos=False, kv_cache="quantized")
        assert mine.kv_cache_bytes is not None and mine.text == ref.text
    if mode == "weight+activation":
        with pytest.raises(quept.ConfigError, match="not in this elastic model's widths"):
            quept.set_bits(model, 3)
    k_proj = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert isinstance(k_proj, PackedLinear) and k_proj.bits == 4
    assert (k_proj.act_bits == 4) == (mode == "weight+activation")
    assert (k_proj.kv_quant is not None) == (mode == "kv-cache")


def test_a_packed_folder_does_not_switch(folders):
    root, _, _ = folders
    with pytest.raises(quept.ArtifactError, match="packed folder of one configuration"):
        quept.load_switchable(root / "p3", 2)
