"""The language model inside a vision-language model (LLaVA-OneVision): only its decoder blocks are
quantized, calibration is text-only, save/load, packed export, the plan path and the GGUF refusal,
on a tiny random LLaVA-OneVision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quept
from quept.config import CalibConfig, ConfigError, ElasticSpec, QuEPTConfig
from quept.models import family_for
from quept.nn import ElasticLinear, elastic_layers
from quept.search import SensitivityConfig
from tests.export.tiny import char_tokenizer, randomize

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)
VOCAB, IMAGE_TOKEN = 256, 255
BLOCKS = "model.language_model.layers"


def tiny_vlm(seed: int = 0, text_kind: str = "qwen2"):
    from transformers import (
        LlamaConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    text_config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[text_kind]
    text = text_config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                       max_position_embeddings=128, initializer_range=0.1)
    cfg = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[28, 28]])
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval().requires_grad_(False)


def text_ids(n: int, t: int, seed: int = 0) -> torch.Tensor:
    """Random text token ids (N, T), never the image placeholder token."""
    return torch.randint(2, IMAGE_TOKEN, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def vlm_folder(tmp_path):
    """A tiny LLaVA-OneVision folder with a (character) tokenizer, as a real one ships."""
    path = tmp_path / "vlm"
    tiny_vlm().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_family_wraps_only_the_language_model_block_linears():
    model = quept.prepare(tiny_vlm(), SPEC)
    fam = family_for(model)
    assert fam.name == "llava-ov-language" and fam.is_causal_lm and fam.is_text
    layers = elastic_layers(model)
    assert len(layers) == 2 * 7 and all(n.startswith(f"{BLOCKS}.") for n in layers)
    assert isinstance(model.model.language_model.layers[1].mlp.down_proj, ElasticLinear)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, ElasticLinear)
    outside = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not n.startswith(f"{BLOCKS}.")]
    assert any(n.startswith("model.vision_tower.") for n in outside)
    assert any(n.startswith("model.multi_modal_projector.") for n in outside)
    assert "lm_head" in outside
    assert not any(isinstance(model.get_submodule(n), ElasticLinear) for n in outside)


def test_text_only_calibration_lowers_the_loss_and_widths_order_the_perplexity():
    model = quept.prepare(tiny_vlm(), SPEC)
    ids = text_ids(8, 32)
    cfg = CalibConfig(n_samples=8, seq_len=32, batch_size=4, epochs=2)
    reports = quept.calibrate(model, ids, cfg, progress=False)
    assert len(reports) == 2
    low = reports[0].bits.index(min(reports[0].bits))
    assert all(r.loss_after[low] < r.loss_before[low] for r in reports)
    rows = {r.bits: r for r in quept.evaluate(model, text_ids(4, 32, seed=1), [None, 2, 8],
                                              progress=False)}
    # a random model's perplexity means little; its distance to the float one orders the widths
    gap = {b: abs(rows[b].ppl - rows[None].ppl) for b in (2, 8)}
    assert gap[8] < gap[2] and gap[8] < 0.02 * rows[None].ppl
    assert rows[2].bits_per_weight == pytest.approx(2 + 18 / 32)


def test_text_holding_the_image_placeholder_token_is_refused():
    """Text-only calibration, perplexity and sensitivity feed no image: a placeholder token in
    the text would stand for features that never come."""
    model = quept.prepare(tiny_vlm(), SPEC)
    ids = text_ids(2, 16)
    ids[1, 5] = IMAGE_TOKEN
    says = f"hold the image placeholder token {IMAGE_TOKEN} \\(first in sample 1, position 5\\)"
    with pytest.raises(ConfigError, match=says):
        quept.calibrate(model, ids, CalibConfig(n_samples=2, seq_len=16), progress=False)
    with pytest.raises(ConfigError, match=says):
        quept.evaluate(model, ids, [4], progress=False)
    with pytest.raises(ConfigError, match=says):
        quept.sensitivity(model, ids)


def test_save_load_and_packed_export_keep_the_logits(vlm_folder, tmp_path):
    model, tok = quept.load_model(vlm_folder)
    assert tok is not None and family_for(model).name == "llava-ov-language"
    randomize(quept.prepare(model, SPEC))
    x = text_ids(2, 16, seed=2)
    quept.set_bits(model, 4)
    want = model(input_ids=x, use_cache=False).logits
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")
    for b in (None, 2, 4):
        quept.set_bits(model, b)
        quept.set_bits(loaded, b)
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits), b
    summary = quept.api.export(loaded, 4, tmp_path / "w4", tokenizer=tok)
    assert set(summary["layers"]) == set(elastic_layers(model))
    packed, ptok = quept.api.load_packed(tmp_path / "w4")
    assert ptok is not None
    assert not elastic_layers(packed)
    got = packed(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=5e-3, rtol=1e-3)
    # the vision tower travels unchanged, with the buffers it derives (its position ids are in
    # no file and no initialiser of the whole model fills them)
    torch.testing.assert_close(packed.model.vision_tower.state_dict(),
                               model.model.vision_tower.state_dict(), atol=0, rtol=0)
    _same_buffers(packed, model)
    image = dict(input_ids=torch.cat([x[:1, :4], torch.full((1, 10), IMAGE_TOKEN), x[:1, 4:8]],
                                     1),
                 pixel_values=torch.randn(1, 2, 3, 28, 28, generator=torch.Generator()
                                          .manual_seed(0)),
                 image_sizes=torch.tensor([[28, 28]]))
    torch.testing.assert_close(packed(**image).logits, model(**image).logits, atol=5e-3,
                               rtol=1e-3)
    # switched at run time from its compact checkpoint: the codes export writes from that
    quept.api.save_compact(loaded, tmp_path / "compact", tokenizer=tok)
    compact, _ = quept.api.load_compact(tmp_path / "compact")
    quept.api.export(compact, 4, tmp_path / "c4", tokenizer=tok)
    switch, _ = quept.load_switchable(tmp_path / "compact", 2)
    quept.set_bits(switch, 4)
    c4, _ = quept.api.load_packed(tmp_path / "c4")
    assert torch.equal(switch(input_ids=x).logits, c4(input_ids=x).logits)
    for net in (compact, switch, c4):
        _same_buffers(net, model)
    pytest.importorskip("compressed_tensors")
    quept.api.export(loaded, 4, tmp_path / "ct", "compressed-tensors", tokenizer=tok)
    _same_buffers(quept.load_model(tmp_path / "ct")[0], model)


def _same_buffers(net, model):
    """``net`` holds every buffer of ``model`` outside the quantized linears, equal."""
    want = {n: b for n, b in model.named_buffers() if n in dict(net.named_buffers())}
    assert any("vision_tower" in n for n in want)
    for n, b in want.items():
        assert torch.equal(dict(net.named_buffers())[n], b), n


def test_sensitivity_and_plan_cover_the_language_model():
    model = randomize(quept.prepare(tiny_vlm(), SPEC))
    ids = text_ids(4, 16, seed=3)
    table = quept.sensitivity(model, ids, SensitivityConfig(n_samples=4, seq_len=16,
                                                            batch_size=4, n_probes=1),
                              progress=False)
    assert list(table.shapes) == list(elastic_layers(model))
    plan = quept.plan(model, table, avg_bits=3.5, granularity="layer")
    assert set(plan.widths) == set(elastic_layers(model))
    assert plan.bits_per_weight <= 3.5 + 1e-9
    quept.set_bits(model, plan)
    assert {n: m.bits for n, m in elastic_layers(model).items()} == plan.widths


def test_gguf_export_refuses_a_vision_language_model(tmp_path):
    pytest.importorskip("gguf")
    from quept.export.gguf import GGUFExportError

    for text in ("qwen2", "llama"):  # the message names the decoder inside
        model = randomize(quept.prepare(tiny_vlm(text_kind=text), SPEC))
        with pytest.raises(GGUFExportError, match=f"'llava_onevision': it is the {text} language "
                                                  f"model .*vision-language model; llama.cpp "
                                                  f"runs that from a {text} text GGUF"):
            quept.api.export(model, 4, tmp_path / "m.gguf", "gguf", tokenizer=char_tokenizer())
        assert not (tmp_path / "m.gguf").exists()


def test_hadamard_rotation_of_the_language_model_keeps_its_float_logits():
    from dataclasses import replace

    from quept.config import weight_act_spec

    x = text_ids(2, 16, seed=4)
    want = tiny_vlm()(input_ids=x).logits
    spec = replace(weight_act_spec(SPEC), rotation="hadamard")
    model = quept.prepare(tiny_vlm(), spec)
    quept.set_bits(model, None)
    torch.testing.assert_close(model(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
    assert sum(m.in_rotation for m in elastic_layers(model).values()) == 2


def test_the_language_models_kv_cache_is_quantized_and_decodes_from_codes():
    """kv_bits on the language model: its attention quantizes (not the vision tower's), and
    text decoding through a QuantizedKVCache follows transformers' cache of the same values."""
    from dataclasses import replace

    from quept.export.kv_cache import QuantizedKVCache
    from quept.nn.kv import ATTENTION

    model = randomize(quept.prepare(tiny_vlm(), replace(SPEC, kv_bits=4)))
    quept.set_bits(model, 4)
    kinds = {n: m.config._attn_implementation for n, m in model.named_modules()
             if n.endswith("self_attn")}
    assert {n for n, k in kinds.items() if k == ATTENTION} == {
        f"{BLOCKS}.{i}.self_attn" for i in range(2)}
    ids = text_ids(1, 10)
    full = model(input_ids=ids).logits
    cache = QuantizedKVCache(model)
    out = model(input_ids=ids[:, :6], cache=cache, use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(6, 10):
        out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 5:9], atol=1e-4, rtol=1e-4)
    assert 0 < cache.nbytes < cache.float_nbytes() / 2
