"""KV-cache quantization (ElasticSpec.kv_bits): the per-head quantizer, the spec, the elastic
and packed layers, incremental decoding, calibration, save/load, export and the command line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import quept
from quept.cli import main
from quept.config import CalibConfig, ConfigError, ElasticSpec, QuEPTConfig
from quept.nn import elastic_layers
from quept.nn.kv import ATTENTION
from quept.ops import GroupSizeError, fake_quant_kv
from tests.conftest import tiny_model
from tests.export.tiny import char_tokenizer, hf_folder, randomize

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=4)
HEAD_DIM = 16  # tiny_config: hidden 64, 4 heads


def test_quantizer_gives_each_token_and_head_its_own_asymmetric_grid():
    x = torch.randn(3, 5, 4 * HEAD_DIM) * torch.tensor([1.0, 10.0, 100.0, 0.1]).repeat_interleave(
        HEAD_DIM) + 3.0
    q = fake_quant_kv(x, 4, HEAD_DIM)
    for xh, qh in zip(x.reshape(-1, HEAD_DIM), q.reshape(-1, HEAD_DIM)):
        lo, hi = xh.min(), xh.max()
        step = (hi - lo) / 15
        assert qh.unique().numel() <= 16
        assert (qh - xh).abs().max() <= step / 2 + 1e-4 * hi.abs()  # within half a step
        # an asymmetric grid reaches both ends of a head's range (one step of zero rounding)
        assert (qh.min() - lo).abs() <= step and (qh.max() - hi).abs() <= step
    assert (fake_quant_kv(x, 8, HEAD_DIM) - x).abs().amax() < (q - x).abs().amax()
    x.requires_grad_(True)
    fake_quant_kv(x, 2, HEAD_DIM).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(GroupSizeError, match="head dimension 24 does not divide"):
        fake_quant_kv(x, 4, 24)


def test_rotated_heads_spread_an_outlier_channel():
    from quept.ops.hadamard import hadamard_transform

    x = torch.randn(64, 2 * HEAD_DIM)
    x[:, 3] *= 30  # one outlier channel in the first head, as keys have
    q = fake_quant_kv(x, 4, HEAD_DIM, rotate=True)
    for head in hadamard_transform(q.unflatten(-1, (2, HEAD_DIM))).reshape(-1, HEAD_DIM):
        assert head.unique().numel() <= 16  # the codes live on the rotated head's grid
    plain = fake_quant_kv(x, 4, HEAD_DIM)
    first = slice(0, HEAD_DIM)
    assert (q - x)[:, first].pow(2).mean() < 0.5 * (plain - x)[:, first].pow(2).mean()
    with pytest.raises(GroupSizeError, match="power-of-two head dimension"):
        fake_quant_kv(torch.randn(2, 48), 4, 24, rotate=True)


def test_spec_checks_kv_bits_and_round_trips():
    assert ElasticSpec.from_dict(SPEC.to_dict()) == SPEC and SPEC.to_dict()["kv_bits"] == 4
    assert "kv_bits" not in ElasticSpec().to_dict()  # folders without it read as before
    for bad, says in ((1, "kv_bits must be an integer from 2 to 8"), (9, "from 2 to 8"),
                      (2.5, "field 'kv_bits' must be int"), (True, "field 'kv_bits' must be int")):
        with pytest.raises(ConfigError, match=says):
            ElasticSpec(kv_bits=bad)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: k_proj and v_proj have biases
def test_the_attention_quantizes_keys_after_the_rotary_embedding_and_values(kind):
    model = randomize(quept.prepare(tiny_model(kind), SPEC))
    layers = elastic_layers(model)
    kv = {n for n, m in layers.items() if m.kv_quant is not None}
    assert kv == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"}
    assert {layers[n].kv_quant for n in kv} == {(4, HEAD_DIM, True)}
    attn = model.model.layers[0].self_attn
    # the attention runs quept's quantizer through its own config; the model's masks do not
    assert attn.config._attn_implementation == ATTENTION != model.config._attn_implementation
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(x, torch.arange(7)[None].expand(2, 7))
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def by_hand(quantize):
        q, k, v = (getattr(attn, f"{p}_proj")(x).view(2, 7, -1, HEAD_DIM).transpose(1, 2)
                   for p in "qkv")
        q, k = rope(q, k, cos, sin)
        if quantize:
            k, v = (fake_quant_kv(t, 4, HEAD_DIM, rotate=True) for t in (k, v))
        k, v = (t.repeat_interleave(attn.num_key_value_groups, 1) for t in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.o_proj(o.transpose(1, 2).reshape(2, 7, -1))

    for rtn in (False, True):  # the cache is quantized under the RTN baseline too
        for m in layers.values():
            m.set_bits(6, rtn=rtn)
        got = attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
        torch.testing.assert_close(got, by_hand(True), atol=1e-5, rtol=1e-5)
        assert (got - by_hand(False)).abs().max() > 1e-4
    quept.set_bits(model, None)  # the float reference keeps a float cache
    got = attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
    torch.testing.assert_close(got, by_hand(False), atol=1e-5, rtol=1e-5)


def test_a_model_without_kv_cache_is_refused_by_name():
    from tests.test_encoder import tiny_bert

    with pytest.raises(ConfigError, match="bert-encoder models have none"):
        quept.prepare(tiny_bert(), SPEC)


def test_decoding_with_the_cache_matches_the_full_forward():
    """Keys and values are quantized per token, so a token's cached key and value are the same
    whether it was computed in a prefill or one step at a time (up to float rounding)."""
    model = randomize(quept.prepare(tiny_model(), SPEC))
    quept.set_bits(model, 3)
    ids = torch.randint(2, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    out = model(ids[:, :8], use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(8, 12):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 7:11], atol=1e-4, rtol=1e-4)
    no_kv = randomize(quept.prepare(tiny_model(), ElasticSpec(ranks=(2, 2, 2, 2),
                                                              default_group_size=32)))
    quept.set_bits(no_kv, 3)
    assert (no_kv(ids).logits - full).abs().max() > 1e-3  # the quantizer does change the logits


def test_calibration_save_load_packed_export_and_gguf_refusal(tmp_path):
    model, _ = quept.load_model(hf_folder(tmp_path / "base"))
    quept.prepare(model, SPEC)
    ids = torch.randint(2, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    reports = quept.calibrate(model, ids, CalibConfig(n_samples=8, seq_len=32, batch_size=4,
                                                      epochs=2), progress=False)
    low = reports[0].bits.index(2)
    assert all(r.loss_after[low] < r.loss_before[low] for r in reports)
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")
    assert loaded.quept_spec.kv_bits == 4
    quept.set_bits(model, 4)
    quept.set_bits(loaded, 4)
    want = model(ids[:2]).logits
    assert torch.equal(loaded(ids[:2]).logits, want)
    meta = quept.api.export(loaded, 4, tmp_path / "w4", tokenizer=char_tokenizer(),
                            scale_dtype="float32")
    kv = {n: i["kv_quant"] for n, i in meta["layers"].items() if "kv_quant" in i}
    assert len(kv) == 4 and {v["bits"] for v in kv.values()} == {4}
    packed, _ = quept.api.load_packed(tmp_path / "w4")
    torch.testing.assert_close(packed(ids[:2]).logits, want, atol=2e-3, rtol=1e-3)
    pytest.importorskip("gguf")
    from quept.export.gguf import GGUFExportError
    from quept.export.packed import PACKED_JSON, PackedFormatError

    with pytest.raises(GGUFExportError, match="4-bit KV cache"):
        quept.api.export(loaded, 4, tmp_path / "m.gguf", "gguf", tokenizer=char_tokenizer())
    path = tmp_path / "w4" / PACKED_JSON
    meta = json.loads(path.read_text())
    layer = next(iter(kv))
    meta["layers"][layer]["kv_quant"]["head_dim"] = 24
    path.write_text(json.dumps(meta))
    with pytest.raises(PackedFormatError, match="head_dim dividing"):
        quept.api.load_packed(tmp_path / "w4")
    # folders of the earlier layout (keys quantized before the rotary embedding) are refused
    meta["layers"][layer]["kv_quant"].update(head_dim=HEAD_DIM,
                                             kind="per-token-per-head-asymmetric")
    path.write_text(json.dumps(meta))
    with pytest.raises(PackedFormatError, match="before the rotary embedding"):
        quept.api.load_packed(tmp_path / "w4")
    old = SPEC.to_dict()
    del old["kv_keys"]
    with pytest.raises(ConfigError, match="before the rotary embedding"):
        ElasticSpec.from_dict(old)


def test_cli_quantize_and_eval_with_a_quantized_kv_cache(tmp_path, capsys):
    base = hf_folder(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 60)
    out = tmp_path / "el"
    assert main(["quantize", "--model", str(base), "--out", str(out), "--calib-text", str(text),
                 "--eval-text", str(text), "--samples", "4", "--seq-len", "32",
                 "--group-size", "32", "--kv-bits", "8", "--eval-windows", "2",
                 "--eval-bits", "4"]) == 0
    assert "with the KV cache at 8 bits" in capsys.readouterr().out
    assert quept.api.read_meta(out)["config"]["spec"]["kv_bits"] == 8
    assert main(["eval", str(out), "--text", str(text), "--windows", "2", "--seq-len", "64",
                 "--bits", "4"]) == 0
    assert "with the KV cache at 8 bits" in capsys.readouterr().out
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "x"),
                 "--calib-text", str(text), "--kv-bits", "1"]) == 2
    assert "kv_bits must be an integer from 2 to 8" in capsys.readouterr().err
