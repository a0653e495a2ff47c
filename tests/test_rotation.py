"""Hadamard matrices and transforms, and the rotated decoder (ElasticSpec.rotation): the float
function unchanged, save/load, compact, packed export, the refusals and the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import quept
from quept.cli import main
from quept.config import ConfigError, ElasticSpec, QuEPTConfig, weight_act_spec
from quept.export.packed import PACKED_JSON, PackedFormatError
from quept.nn import elastic_layers
from quept.ops.hadamard import HadamardSizeError, hadamard, hadamard_transform, random_hadamard
from tests.conftest import tiny_model
from tests.export.tiny import char_tokenizer, hf_folder, randomize

SPEC = replace(weight_act_spec(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)),
               rotation="hadamard")
IDS = torch.randint(2, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 192, 576, 1536])
def test_hadamard_is_orthonormal_with_equal_magnitudes_and_the_fast_transform_matches(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5))
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ h)
    r = random_hadamard(n, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64))


def test_unsupported_orders_are_named():
    with pytest.raises(HadamardSizeError, match="no Hadamard matrix of order 36"):
        hadamard(36)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rotation_keeps_the_float_model_and_spreads_an_outlier(kind):
    want = tiny_model(kind)(IDS).logits
    model = quept.prepare(tiny_model(kind), SPEC)
    assert not model.config.tie_word_embeddings  # the head now differs from the embedding
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.layers[0].input_layernorm.weight,
                       torch.ones_like(model.model.layers[0].input_layernorm.weight))
    quept.set_bits(model, None)
    torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)
    down = {n: m for n, m in elastic_layers(model).items() if m.in_rotation}
    assert sorted(down) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    x = torch.zeros(1, 64)
    x[0, 5] = 100.0  # one outlier channel becomes a flat vector
    assert hadamard_transform(x).abs().max() == pytest.approx(100 / 8)


def test_rotation_needs_a_decoder():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=128, vocab_size=64))
    with pytest.raises(ConfigError, match="rotation is implemented for LLaMA-family decoders"):
        quept.prepare(bert, replace(SPEC, activations="none"))
    with pytest.raises(ConfigError, match="rotation must be one of"):
        ElasticSpec(rotation="random")


def test_mean_square_inputs_of_a_rotated_layer_are_of_its_rotated_input():
    from quept.calib.capture import mean_sq_inputs

    model = quept.prepare(tiny_model(), SPEC)
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, down.in_features)
    with mean_sq_inputs({"down": down}) as sq:
        down(x)
    torch.testing.assert_close(sq["down"], hadamard_transform(x).pow(2).mean(0))


def test_save_load_compact_and_packed_export_of_a_rotated_model(tmp_path):
    base = hf_folder(tmp_path / "base")
    model, _ = quept.load_model(base)
    randomize(quept.prepare(model, SPEC))
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")  # rotated again from the base model, then checked
    for b in (None, 4, 8):
        quept.set_bits(model, b)
        quept.set_bits(loaded, b)
        assert torch.equal(loaded(IDS).logits, model(IDS).logits), b
    meta = quept.api.export(loaded, 4, tmp_path / "w4", tokenizer=char_tokenizer(),
                            scale_dtype="float32")
    rotated = [n for n, i in meta["layers"].items() if i.get("in_rotation") == "hadamard"]
    assert sorted(rotated) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    packed, _ = quept.api.load_packed(tmp_path / "w4")
    quept.set_bits(loaded, 4)
    torch.testing.assert_close(packed(IDS).logits, loaded(IDS).logits, atol=2e-3, rtol=1e-3)
    quept.api.save_compact(loaded, tmp_path / "c", tokenizer=char_tokenizer())
    compact, _ = quept.api.load_compact(tmp_path / "c")
    assert sum(m.in_rotation for m in elastic_layers(compact).values()) == 2
    quept.set_bits(compact, None)
    quept.set_bits(loaded, None)  # the compact master is 8-bit, the rest is stored as is
    got, ref = compact(IDS).logits, loaded(IDS).logits
    assert (got - ref).abs().mean() < 0.05 * ref.abs().mean()  # not rotated twice or undone
    info = json.loads((tmp_path / "w4" / PACKED_JSON).read_text())
    info["layers"][rotated[0]]["in_rotation"] = "random"
    (tmp_path / "w4" / PACKED_JSON).write_text(json.dumps(info))
    with pytest.raises(PackedFormatError, match="input rotation 'random' is unknown"):
        quept.api.load_packed(tmp_path / "w4")


def test_a_different_base_model_is_still_caught(tmp_path):
    model, _ = quept.load_model(hf_folder(tmp_path / "base"))
    quept.prepare(model, SPEC)
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC))
    other = tmp_path / "other"
    tiny_model(seed=5).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    with pytest.raises(quept.api.ArtifactError, match="base model weights differ"):
        quept.load(tmp_path / "el", model=other)


def test_gguf_refuses_a_rotated_model(tmp_path):
    pytest.importorskip("gguf")
    from quept.export.gguf import GGUFExportError

    weight_only = ElasticSpec(bit_groups=((8,), (4,)), ranks=(2, 2), merge_weights=(0.5, 0.5),
                              default_group_size=32, rotation="hadamard")
    model = randomize(quept.prepare(tiny_model(), weight_only))
    with pytest.raises(GGUFExportError, match="Hadamard rotation"):
        quept.api.export(model, 4, tmp_path / "m.gguf", "gguf", tokenizer=char_tokenizer())


def test_cli_rotation_with_activations(tmp_path, capsys):
    base = hf_folder(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 60)
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "el"),
                 "--calib-text", str(text), "--eval-text", str(text), "--samples", "4",
                 "--seq-len", "32", "--group-size", "32", "--activations", "per-token",
                 "--rotation", "hadamard", "--eval-windows", "2", "--eval-bits", "4"]) == 0
    assert "W4A4" in capsys.readouterr().out
    spec = quept.api.read_meta(tmp_path / "el")["config"]["spec"]
    assert spec["rotation"] == "hadamard" and spec["activations"] == "per-token"
