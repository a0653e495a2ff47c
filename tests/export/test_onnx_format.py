"""ONNX export: MatMulNBits packing, ONNX Runtime's outputs against the elastic model's for a
decoder (widths, a plan, the KV cache, left padding, greedy decoding in ONNX Runtime and ONNX
Runtime GenAI), a BERT encoder and a ViT, the CLI, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import quept
from quept.cli import main
from quept.config import ElasticSpec, weight_act_spec
from quept.nn import elastic_layers, set_bits

from .tiny import TEXT, elastic_folder, elastic_tiny, hf_folder, randomize

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from quept.export.onnx_format import write_onnx  # noqa: E402
from quept.export.onnx_nbits import (  # noqa: E402
    OnnxExportError,
    pack_low_first,
    unpack_low_first,
)
from quept.export.onnx_runtime import OrtModel  # noqa: E402


def session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def decoder_logits(folder, ids):
    """The exported decoder's logits for ``ids`` with an empty KV cache, fed by hand."""
    sess = session(folder)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64),
             "position_ids": np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0]


def test_packing_is_low_bits_first_and_round_trips():
    v = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_low_first(v, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert pack_low_first(torch.tensor([[5, 12, 7]], dtype=torch.uint8), 4).tolist() == [
        [5 | 12 << 4, 7]]
    gen = torch.Generator().manual_seed(0)
    for b in (2, 4, 8):
        x = torch.randint(0, 2**b, (3, 4, 37), generator=gen).to(torch.uint8)
        assert torch.equal(unpack_low_first(pack_low_first(x, b), b, 37), x)
    with pytest.raises(OnnxExportError, match="2, 4 or 8"):
        pack_low_first(x, 3)


@pytest.fixture(scope="module")
def model():
    return elastic_tiny(vocab_size=96)


def test_decoder_widths_and_a_plan_run_in_onnx_runtime_as_in_torch(model, tmp_path):
    ids = torch.randint(2, 96, (3, 19), generator=torch.Generator().manual_seed(1))
    names = list(elastic_layers(model))
    plan = {n: [2, 3, 5, None, 6, 7, 8][i % 7] for i, n in enumerate(names)}
    for bits in (3, 4, plan):
        out = tmp_path / f"m{len(str(bits))}"
        summary = write_onnx(model, None, out, bits)
        assert summary["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
        assert summary["inputs"][3:] == [f"past_key_values.{i}.{kv}" for i in range(2)
                                         for kv in ("key", "value")]
        assert summary["outputs"] == ["logits", "present.0.key", "present.0.value",
                                      "present.1.key", "present.1.value"]
        if bits == 3:
            assert summary["containers"] == {"3": 4}
            # container 4 bits + float32 scale + 4-bit zero-point per group of 32
            assert summary["bits_per_weight"] == pytest.approx(4 + 36 / 32)
        with torch.no_grad():
            ref = set_bits(model, bits)(ids).logits.numpy()
        got = decoder_logits(out, ids)
        np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())
    meta = json.loads((out / "quept-export.json").read_text())
    assert meta["bits"] == "mixed" and meta["float_layers"] == 2
    assert set(elastic_layers(model)) == set(names)  # the elastic layers are back


def test_accuracy_level_4_is_recorded_and_close(model, tmp_path):
    import onnx

    ids = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    summary = write_onnx(model, None, tmp_path / "i8", 4, accuracy_level=4)
    assert summary["accuracy_level"] == 4
    nodes = [n for n in onnx.load(str(tmp_path / "i8" / "model.onnx")).graph.node
             if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nodes)
    with torch.no_grad():
        ref = set_bits(model, 4)(ids).logits.numpy()
    got = decoder_logits(tmp_path / "i8", ids)
    np.testing.assert_allclose(got, ref, atol=5e-2 * np.abs(ref).max())
    with pytest.raises(OnnxExportError, match="accuracy level"):
        write_onnx(model, None, tmp_path / "x", 4, accuracy_level=5)


@pytest.fixture(scope="module")
def w4(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "w4"
    write_onnx(model, None, folder, 4)
    return folder


def test_decoding_with_the_cache_matches_the_whole_sequence(model, w4):
    ids = torch.randint(2, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    ort_model = OrtModel(w4)
    with torch.no_grad():
        full = set_bits(model, 4)(ids).logits
    out = ort_model(ids[:, :6], use_cache=True)
    assert [tuple(p.shape) for p in out.past_key_values] == [(2, 2, 6, 16)] * 4
    steps = [out.logits]
    for t in range(6, 11):  # one token at a time over the cache
        out = ort_model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert out.past_key_values[0].shape[2] == 11
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5 * full.abs().max(), rtol=0)


def test_left_padded_batch_matches_torch(model, w4):
    ids = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row is left-padded by 3
    with torch.no_grad():
        ref = set_bits(model, 4)(ids, attention_mask=mask).logits
    got = OrtModel(w4)(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=2e-5 * ref.abs().max(), rtol=0)


def test_greedy_generation_in_onnx_runtime_and_genai(model, w4):
    from quept.export.runtime import generate

    class Ids:  # a tokenizer over raw ids, for generate()
        eos_token_id = None

        @staticmethod
        def decode(tokens, **_):
            return " ".join(map(str, tokens.tolist()))

    prompt = torch.randint(2, 96, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = set_bits(model, 4).generate(prompt, max_new_tokens=8, do_sample=False,
                                          min_new_tokens=8)[0, 7:].tolist()
    got = generate(OrtModel(w4), Ids, prompt, 8)
    assert got.text == " ".join(map(str, ref)) and got.new_tokens == 8
    config = json.loads((w4 / "genai_config.json").read_text())
    assert config["model"]["type"] == "llama" and config["model"]["decoder"][
        "num_key_value_heads"] == 2
    og = pytest.importorskip("onnxruntime_genai")
    genai_model = og.Model(str(w4))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=15, do_sample=False)
    gen = og.Generator(genai_model, params)
    gen.append_tokens(prompt.numpy().astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert list(map(int, gen.get_sequence(0)))[7:] == ref


def test_info_reads_the_export_summary(w4):
    from quept.info import describe, render

    info = describe(w4)
    summary = json.loads((w4 / "quept-export.json").read_text())
    assert info["kind"] == "onnx" and info["genai_config"]
    assert info["export"]["widths"] == {"4": 14} == summary["widths"]
    assert info["export"]["bits_per_weight"] == summary["bits_per_weight"]
    assert "ONNX Runtime model with genai_config.json" in render(info)


def test_a_decoder_export_without_a_cache_is_refused(model, tmp_path):
    from onnx import TensorProto, helper, save

    model.config.save_pretrained(tmp_path)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "old",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8),
         str(tmp_path / "model.onnx"))
    (tmp_path / "quept-export.json").write_text(json.dumps(
        {"format": "onnx", "task": "causal-lm", "output": "logits", "bits": 4,
         "widths": {"4": 14}, "bits_per_weight": 4.5}))
    with pytest.raises(OnnxExportError, match="without a KV cache"):
        OrtModel(tmp_path)


def test_encoder_and_vit_export(tmp_path):
    from tests.test_encoder import tiny_bert
    from tests.test_vit import tiny_vit

    torch.set_grad_enabled(False)
    try:
        bert = randomize(quept.prepare(tiny_bert(), ElasticSpec(ranks=(2, 2, 2, 2))))
        write_onnx(bert, None, tmp_path / "bert", 2)
        ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        ref = set_bits(bert, 2)(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        got = session(tmp_path / "bert").run(
            None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())

        vit = randomize(quept.prepare(tiny_vit(), ElasticSpec(ranks=(2, 2, 2, 2))))
        summary = write_onnx(vit, None, tmp_path / "vit", 6)
        assert summary["inputs"] == ["pixel_values"] and summary["containers"] == {"6": 8}
        px = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
        ref = set_bits(vit, 6)(pixel_values=px).logits.numpy()
        got = session(tmp_path / "vit").run(None, {"pixel_values": px.numpy()})[0]
        np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())
    finally:
        torch.set_grad_enabled(True)


def test_refusals(model, tmp_path):
    with pytest.raises(OnnxExportError, match="activations"):
        write_onnx(elastic_tiny(weight_act_spec(ElasticSpec(default_group_size=32))), None,
                   tmp_path / "x", 4)
    with pytest.raises(OnnxExportError, match="kv_bits"):
        write_onnx(elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32,
                                            kv_bits=4)), None, tmp_path / "x", 4)
    odd = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=48),
                       hidden_size=48, intermediate_size=96)
    layers = dict(elastic_layers(odd))
    with pytest.raises(OnnxExportError, match="power-of-two block of at least 16 inputs; the "
                       "2-bit group is 48"):
        write_onnx(odd, None, tmp_path / "x", 2)
    assert elastic_layers(odd) == layers  # swapped back after the refusal
    assert not (tmp_path / "x" / "model.onnx").exists()


def run_json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_export_then_eval_in_onnx_runtime(tmp_path, capsys):
    base = hf_folder(tmp_path / "base")
    elastic = elastic_folder(tmp_path / "elastic", base)
    (tmp_path / "text.txt").write_text(TEXT)
    ev = ["--text", str(tmp_path / "text.txt"), "--windows", "2", "--seq-len", "32", "--json"]
    res = run_json(capsys, ["export", str(elastic), "--bits", "4", "--format", "onnx", "--out",
                            str(tmp_path / "o4"), "--json"])
    assert res["format"] == "onnx" and res["bits"] == 4
    direct = run_json(capsys, ["eval", str(elastic), "--bits", "4", *ev])["rows"][1]["ppl"]
    (row,) = run_json(capsys, ["eval", str(tmp_path / "o4"), *ev])["rows"]
    assert row["bits"] == 4 and row["bits_per_weight"] == pytest.approx(res["bits_per_weight"])
    assert row["ppl"] == pytest.approx(direct, rel=1e-4)
    gen = ["--prompt", "It is", "--max-new-tokens", "5", "--no-eos", "--json"]
    run = run_json(capsys, ["run", str(tmp_path / "o4"), *gen])
    assert run["kind"] == "onnx" and run["new_tokens"] == 5
    assert run["text"] == run_json(capsys, ["run", str(elastic), "--bits", "4", *gen])["text"]
    assert main(["export", str(elastic), "--bits", "4", "--format", "onnx", "--scale-dtype",
                 "float16", "--out", str(tmp_path / "x")]) != 0
    assert "MatMulNBits takes float32" in capsys.readouterr().err
