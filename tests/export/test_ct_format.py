"""compressed-tensors export: the packing of the format, logits through transformers' own
loader and through the compressed-tensors package, plans of several widths, refusals."""

from __future__ import annotations

import json

import pytest
import torch

import quept
from quept.cli import main
from quept.config import ElasticSpec, weight_act_spec
from quept.export.ct_format import (
    CompressedTensorsExportError,
    load_compressed_tensors,
    pack_int32,
    unpack_int32,
    write_compressed_tensors,
)
from quept.nn import elastic_layers, set_bits

from .tiny import TEXT, elastic_folder, elastic_tiny, hf_folder, randomize

IDS = torch.randint(2, 96, (2, 24), generator=torch.Generator().manual_seed(0))


def test_packing_is_dense_low_bits_first_and_round_trips():
    # 3-bit elements 0..10: element 10 starts at bit 30 and crosses into the second word.
    v = torch.arange(11, dtype=torch.int16).reshape(1, -1) % 8 - 4
    packed = pack_int32(v, 3)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    bits = "".join(format(int(x) & 0xFFFFFFFF, "032b")[::-1] for x in packed[0])
    expect = "".join(format(int(u) + 4, "03b")[::-1] for u in v[0])
    assert bits[:33] == expect
    gen = torch.Generator().manual_seed(1)
    for b in range(2, 9):
        x = torch.randint(-(1 << (b - 1)), 1 << (b - 1), (5, 77), generator=gen)
        p = pack_int32(x, b)
        assert p.shape == (5, -(-77 * b // 32))
        assert torch.equal(unpack_int32(p, b, 77), x.to(torch.int8))


def test_packing_matches_the_compressed_tensors_package():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(2)
    for b in range(2, 9):
        x = torch.randint(-(1 << (b - 1)), 1 << (b - 1), (9, 100), generator=gen,
                          dtype=torch.int8)
        assert torch.equal(pack_int32(x, b), helpers.pack_to_int32(x, b)), b
        assert torch.equal(pack_int32(x.t().contiguous(), b).t(),
                           helpers.pack_to_int32(x, b, packed_dim=0)), b


@pytest.fixture(scope="module")
def model():
    return elastic_tiny(vocab_size=96)


def test_every_width_loads_in_transformers_with_the_elastic_logits(model, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    for b in range(2, 9):
        out = tmp_path / f"w{b}"
        summary = write_compressed_tensors(model, None, out, b, scale_dtype="float32")
        assert summary["bits"] == b and summary["widths"] == {str(b): 14}
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        (group,) = cfg["config_groups"].values()
        assert group["targets"] == ["Linear"] and cfg["ignore"] == ["lm_head"]
        assert group["weights"]["num_bits"] == b and group["weights"]["strategy"] == "group"
        assert group["weights"]["group_size"] == 32 and not group["weights"]["symmetric"]
        set_bits(model, b)
        ref = model(IDS).logits
        hf = AutoModelForCausalLM.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True))
        assert torch.equal(hf(IDS).logits, ref), b


def test_a_plan_with_float_layers_reads_back_through_compressed_tensors(model, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    names = list(elastic_layers(model))
    plan = {n: [2, 3, 5, None, 6, 7, 8][i % 7] for i, n in enumerate(names)}
    summary = write_compressed_tensors(model, None, tmp_path / "mix", plan, scale_dtype="float32")
    assert summary["bits"] == "mixed" and summary["float_layers"] == 2
    cfg = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: g["targets"] for g in cfg["config_groups"].values()}
    assert {b: sorted(t) for b, t in groups.items()} == {
        b: sorted(n for n in names if plan[n] == b) for b in (2, 3, 5, 6, 7, 8)}
    assert set(cfg["ignore"]) == {"lm_head", *(n for n in names if plan[n] is None)}
    set_bits(model, plan)
    ref = model(IDS).logits
    hf = load_compressed_tensors(tmp_path / "mix", AutoModelForCausalLM)
    info = hf.quept_compressed_tensors
    assert info["widths"] == {n: b for n, b in plan.items() if b is not None}
    assert info["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])
    assert torch.equal(hf(IDS).logits, ref)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight


def test_float16_scales_cost_16_bits_per_group_and_round_the_weights_only(model, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    summary = write_compressed_tensors(model, None, tmp_path / "w4", 4)
    # group 32: 4 bits + (16-bit scale + 4-bit zero) / 32
    assert summary["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    set_bits(model, 4)
    ref = model(IDS).logits
    got = load_compressed_tensors(tmp_path / "w4", AutoModelForCausalLM)(IDS).logits
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()


def test_bert_encoder_exports_and_reads_back(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import BertModel

    from tests.test_encoder import tiny_bert

    bert = randomize(quept.prepare(tiny_bert(), ElasticSpec(ranks=(2, 2, 2, 2))))
    write_compressed_tensors(bert, None, tmp_path / "bert", 3, scale_dtype="float32")
    set_bits(bert, 3)
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    ref = bert(input_ids=ids).last_hidden_state
    got = load_compressed_tensors(tmp_path / "bert", BertModel)(input_ids=ids).last_hidden_state
    assert torch.equal(got, ref)


def test_refusals_name_what_is_wrong(model, tmp_path):
    names = list(elastic_layers(model))
    with pytest.raises(CompressedTensorsExportError, match="scale dtype"):
        write_compressed_tensors(model, None, tmp_path / "x", 4, scale_dtype="int8")
    with pytest.raises(CompressedTensorsExportError, match="nothing to quantize"):
        write_compressed_tensors(model, None, tmp_path / "x", dict.fromkeys(names))
    with pytest.raises(CompressedTensorsExportError, match="1 layer missing"):
        write_compressed_tensors(model, None, tmp_path / "x", dict.fromkeys(names[1:], 4))
    with pytest.raises(ValueError, match="bit"):
        write_compressed_tensors(model, None, tmp_path / "x", 9)
    with pytest.raises(CompressedTensorsExportError, match="no elastic layers"):
        from tests.conftest import tiny_model

        write_compressed_tensors(tiny_model(), None, tmp_path / "x", 4)
    wa = elastic_tiny(weight_act_spec(ElasticSpec(default_group_size=32)))
    with pytest.raises(CompressedTensorsExportError, match="per-token activation"):
        write_compressed_tensors(wa, None, tmp_path / "x", 4)
    kv = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=4))
    with pytest.raises(CompressedTensorsExportError, match="4-bit KV cache"):
        write_compressed_tensors(kv, None, tmp_path / "x", 4)
    assert not (tmp_path / "x").exists()


def run_json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_export_then_eval_and_run_the_folder(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    base = hf_folder(tmp_path / "base")
    elastic = elastic_folder(tmp_path / "elastic", base)
    (tmp_path / "text.txt").write_text(TEXT)
    ev = ["--text", str(tmp_path / "text.txt"), "--windows", "2", "--seq-len", "32", "--json"]
    out = tmp_path / "ct3"
    res = run_json(capsys, ["export", str(elastic), "--bits", "3", "--format",
                            "compressed-tensors", "--scale-dtype", "float32", "--out", str(out),
                            "--json"])
    assert res["format"] == "compressed-tensors" and res["bits"] == 3
    assert res["bits_per_weight"] == pytest.approx(3 + 35 / 32)
    assert (out / "tokenizer.json").is_file()
    direct = run_json(capsys, ["eval", str(elastic), "--bits", "3", *ev])["rows"][1]["ppl"]
    (row,) = run_json(capsys, ["eval", str(out), *ev])["rows"]
    assert row["bits"] == 3 and row["bits_per_weight"] == pytest.approx(3 + 35 / 32)
    assert row["ppl"] == pytest.approx(direct, rel=1e-5)
    gen = run_json(capsys, ["run", str(out), "--prompt", "It is a truth", "--max-new-tokens",
                            "4", "--no-eos", "--json"])
    fake = run_json(capsys, ["run", str(elastic), "--bits", "3", "--prompt", "It is a truth",
                             "--max-new-tokens", "4", "--no-eos", "--json"])
    assert gen["text"] == fake["text"] and gen["new_tokens"] == 4
    assert gen["kind"] == "compressed-tensors"
    assert main(["export", str(elastic), "--bits", "3", "--format", "gguf", "--scale-dtype",
                 "float32", "--out", str(tmp_path / "x.gguf")]) != 0
    assert "--scale-dtype does not apply to gguf" in capsys.readouterr().err


def test_vision_language_model_keeps_its_vision_tower_float(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText

    from tests.test_vlm import SPEC as VLM_SPEC
    from tests.test_vlm import text_ids, tiny_vlm

    vlm = randomize(quept.prepare(tiny_vlm(), VLM_SPEC))
    write_compressed_tensors(vlm, None, tmp_path / "vlm", 4, scale_dtype="float32")
    cfg = json.loads((tmp_path / "vlm" / "config.json").read_text())["quantization_config"]
    assert any(n.startswith("model.vision_tower.") for n in cfg["ignore"])
    x = text_ids(2, 12, seed=4)
    set_bits(vlm, 4)
    ref = vlm(input_ids=x, use_cache=False).logits
    got = load_compressed_tensors(tmp_path / "vlm", AutoModelForImageTextToText)
    assert set(got.quept_compressed_tensors["widths"]) == set(elastic_layers(vlm))
    assert torch.equal(got(input_ids=x, use_cache=False).logits, ref)
