import json

import pytest
import torch

import quept
from quept import api
from quept.export.load import load_packed
from quept.export.packed import (
    PACKED_JSON,
    PACKED_WEIGHTS,
    PackedFormatError,
    write_packed,
)
from quept.nn import ElasticLinear, PackedLinear, elastic_layers
from quept.ops.quant import dequantize

from .tiny import char_tokenizer, elastic_tiny

IDS = torch.randint(2, 96, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return elastic_tiny()


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits


def mixed_plan(model):
    widths = [2, 3, 4, 5, 6, 7, 8]
    return {n: widths[i % 7] for i, n in enumerate(elastic_layers(model))}


@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_logits_equal_fake_quant_logits(model, bits, tmp_path):
    write_packed(model, bits, tmp_path, None, scale_dtype="float32")
    packed = load_packed(tmp_path)
    quept.set_bits(model, bits)
    ref = logits(model)
    torch.testing.assert_close(logits(packed), ref, rtol=0, atol=2e-5)  # float rounding
    torch.testing.assert_close(logits(packed, IDS[:1, :3]), logits(model, IDS[:1, :3]),
                               rtol=0, atol=2e-5)  # the decode-size kernel path too
    assert not any(isinstance(m, ElasticLinear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 14


@pytest.mark.parametrize("bits", range(2, 9))
def test_fp16_scales_move_the_logits_by_their_rounding_only(model, bits, tmp_path):
    """The default float16 scales: not the elastic model's logits, but within 0.2% of the
    largest (docs/deployment.md says so)."""
    write_packed(model, bits, tmp_path, None)
    quept.set_bits(model, bits)
    ref = logits(model)
    err = (logits(load_packed(tmp_path)) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 2e-3


def test_mixed_plan_and_fp16_scales(model, tmp_path):
    plan = mixed_plan(model)
    meta = api.export(model, plan, tmp_path, scale_dtype="float16")
    packed, tok = api.load_packed(tmp_path)
    assert tok is None and meta["bits"] == "mixed"
    assert {n: m.bits for n, m in packed.named_modules() if isinstance(m, PackedLinear)} == plan
    quept.set_bits(model, plan)
    ref = logits(model)
    # fp16 scales: the only difference is the scales' rounding (relative 2^-11 at most).
    err = (logits(packed) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 2e-3
    # Stored size: exactly the bits per weight the elastic model reports for this plan.
    assert meta["sizes"]["bits_per_weight"] == pytest.approx(api.stored_bits(model, plan))


def test_folder_is_self_contained_and_ties_embeddings_once(model, tmp_path):
    write_packed(model, 4, tmp_path, char_tokenizer())
    from safetensors import safe_open

    with safe_open(str(tmp_path / PACKED_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "model.layers.0.mlp.up_proj.qweight" in keys
    assert not any(k.endswith(("lora_u", "lora_v")) or ".clip_" in k for k in keys)
    packed, tok = api.load_packed(tmp_path)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    assert tok.decode(tok("a truth").input_ids) == "a truth"


def test_load_builds_no_elastic_layer(model, tmp_path, monkeypatch):
    write_packed(model, 3, tmp_path, None)

    def forbidden(*a, **k):
        raise AssertionError("the packed load must not build calibration modules")

    monkeypatch.setattr(ElasticLinear, "__init__", forbidden)
    assert isinstance(load_packed(tmp_path).model.layers[0].mlp.down_proj, PackedLinear)


def test_corrupt_or_mismatched_folders_fail_clearly(model, tmp_path):
    with pytest.raises(PackedFormatError, match="no quept-packed.json"):
        load_packed(tmp_path)
    write_packed(model, 4, tmp_path, None)
    meta_path = tmp_path / PACKED_JSON
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(PackedFormatError, match="version 99"):
        load_packed(tmp_path)

    bad = json.loads(json.dumps(meta))
    bad["layers"]["model.layers.0.mlp.up_proj"]["bits"] = 3
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(PackedFormatError, match="its \"bits\" says 4, but its layers entries "
                       "hold layers at 3, 4 bits, which it labels 'mixed'"):
        load_packed(tmp_path)
    meta_path.write_text(json.dumps({**bad, "bits": "mixed"}))
    with pytest.raises(PackedFormatError, match="says layer model.layers.0.mlp.up_proj has bits "
                       "3, but .* holds model.layers.0.mlp.up_proj.qweight of shape"):
        load_packed(tmp_path)

    bad = json.loads(json.dumps(meta))
    bad["layers"]["model.layers.0.mlp.nope"] = bad["layers"]["model.layers.0.mlp.up_proj"]
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(PackedFormatError, match="does not exist in the model"):
        load_packed(tmp_path)

    meta_path.write_text(json.dumps(meta))
    weights = tmp_path / PACKED_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PackedFormatError, match="cannot be read"):
        load_packed(tmp_path)


def test_plans_must_name_every_layer_with_a_width(model, tmp_path):
    plan = mixed_plan(model)
    with pytest.raises(PackedFormatError, match="1 layer missing"):
        write_packed(model, dict(list(plan.items())[1:]), tmp_path, None)
    with pytest.raises(PackedFormatError, match="no float layers"):
        write_packed(model, {**plan, next(iter(plan)): None}, tmp_path, None)
    with pytest.raises(ValueError, match="outside 2..8"):
        write_packed(model, 9, tmp_path, None)


def test_packed_head_shares_one_table_with_the_tied_embedding(model, tmp_path):
    from quept.export.packed import minmax_codes
    from quept.nn.packed_linear import PackedEmbedding

    meta = write_packed(model, 4, tmp_path, None, head_bits=8)
    plain = write_packed(model, 4, tmp_path / "plain", None)
    packed = load_packed(tmp_path)
    assert isinstance(packed.lm_head, PackedLinear)
    assert isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert packed.model.embed_tokens.qweight is packed.lm_head.qweight  # stored and loaded once
    vocab, dim = model.lm_head.weight.shape
    assert meta["sizes"]["head_bytes"] == vocab * dim + vocab * (dim // 64) * 3
    assert meta["sizes"]["other_bytes"] == plain["sizes"]["other_bytes"] - vocab * dim * 4
    # The embedding lookup returns the dequantized 8-bit rows of the tied table.
    codes, scale, zero = minmax_codes(model.lm_head.weight, 8, 64)
    table = dequantize(codes, scale.float(), zero.float(), 64)
    ids = torch.tensor([[5, 7, 250]])
    torch.testing.assert_close(packed.model.embed_tokens(ids)[0], table[ids[0]])
    # Logits stay close to the float-head model (8-bit rounding of the head and embedding).
    quept.set_bits(model, 4)
    ref = logits(model)
    err = (logits(packed) - ref).norm() / ref.norm()
    assert err < 0.02
