"""QuantizedKVCache: keys and values held as packed codes, attention computed over them,
decoding as the float cache of the same quantized values (up to float rounding);
transformers' generate, packed models, quept run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import quept
from quept.cli import main
from quept.config import ConfigError, ElasticSpec
from quept.export.kv_cache import QuantizedKVCache
from quept.ops import dequantize_kv, fake_quant_kv, quantize_kv
from quept.ops.pack import packed_length

from .tiny import char_tokenizer, elastic_tiny

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=16, kv_bits=4)
IDS = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rotate", [False, True])
def test_codes_dequantize_to_the_fake_quantizer_bit_for_bit(rotate):
    x = torch.randn(2, 7, 3 * 16, generator=torch.Generator().manual_seed(1)) * 5 + 1
    for bits in range(2, 9):
        codes, scale, zero = quantize_kv(x, bits, 16, rotate)
        assert codes.dtype == torch.uint8 and codes.shape == (2, 7, 3, 16)
        assert int(codes.max()) == 2**bits - 1 and scale.shape == zero.shape == (2, 7, 3, 1)
        assert torch.equal(dequantize_kv(codes, scale, zero, rotate),
                           fake_quant_kv(x, bits, 16, rotate))


def decode(model, cache, prefill=8):
    """Logits of a prefill, then one token at a time, with ``cache`` (None = transformers')."""
    out = model(IDS[:, :prefill], use_cache=True, cache=cache)
    steps, cache = [out.logits[:, -1]], out.cache
    for t in range(prefill, IDS.shape[1]):
        out = model(IDS[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), cache


@pytest.mark.parametrize("head_dim", [16, 12])  # a Hadamard-rotated basis, and none
@pytest.mark.parametrize("bits", [3, 4])
def test_attention_over_codes_equals_the_float_cache(head_dim, bits):
    model = elastic_tiny(replace(SPEC, kv_bits=bits), head_dim=head_dim)
    quept.set_bits(model, 3)
    assert model.model.layers[0].self_attn.k_proj.kv_quant == (bits, head_dim, head_dim == 16)
    want, _ = decode(model, None)
    # the float cache re-quantizes every key and value on each step: as one forward does
    torch.testing.assert_close(want, model(IDS).logits[:, 7:], atol=1e-5, rtol=1e-5)
    cache = QuantizedKVCache(model)
    got, used = decode(model, cache)
    assert used is cache and cache.get_seq_length() == IDS.shape[1]
    # the same sums in another order: float rounding apart (logits up to about 3 here)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # What it holds: per layer and token (2 x 12), the codes of 2 key and 2 value heads packed
    # at `bits` as one row, and a float32 step and an int16 zero-point per head.
    assert cache.nbytes == 2 * 2 * 12 * (packed_length(4 * head_dim, bits) + 4 * (4 + 2))
    assert cache.float_nbytes() == 2 * 2 * (2 * 12 * 2 * head_dim * 4)
    assert cache.nbytes < cache.float_nbytes() / 2
    cache.detach()
    assert all(getattr(m, "quept_kv_cache", None) is None for m in model.modules())
    assert torch.equal(decode(model, None)[0], want)


def test_a_prompt_in_chunks_over_the_codes_matches_one_forward():
    """Several new tokens over a past of codes: the causal mask over the new ones (no mask
    given: sdpa's causal shortcut), and a batch with a padding mask."""
    model = elastic_tiny(SPEC)
    quept.set_bits(model, 4)
    want = model(IDS).logits
    for mask in (None, torch.ones_like(IDS)):
        cache = QuantizedKVCache(model)
        kw = {} if mask is None else {"attention_mask": mask[:, :5]}
        first = model(IDS[:, :5], cache=cache, use_cache=True, **kw).logits
        kw = {} if mask is None else {"attention_mask": mask}
        rest = model(IDS[:, 5:], cache=cache, use_cache=True, **kw).logits
        torch.testing.assert_close(torch.cat([first, rest], 1), want, atol=1e-5, rtol=1e-5)


def test_transformers_generate_with_left_padding_on_a_packed_model(tmp_path):
    model = elastic_tiny(SPEC)
    quept.api.export(model, 4, tmp_path / "w4", tokenizer=char_tokenizer(),
                     scale_dtype="float32")
    packed, _ = quept.api.load_packed(tmp_path / "w4")
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    want = packed.generate(IDS, **kw)
    cache = QuantizedKVCache(packed)
    got = packed.generate(IDS, cache=cache, **kw)
    assert torch.equal(got, want) and cache.get_seq_length() == IDS.shape[1] + 5


def test_clear_errors():
    plain = elastic_tiny(replace(SPEC, kv_bits=None))
    with pytest.raises(ConfigError, match="needs a model calibrated with --kv-bits"):
        QuantizedKVCache(plain)
    model = elastic_tiny(SPEC)
    quept.set_bits(model, 4)
    cache = QuantizedKVCache(model)
    cache.detach()
    with pytest.raises(RuntimeError, match="not attached to the model's attention"):
        model(IDS, cache=cache, use_cache=True)
    QuantizedKVCache(model)
    newer = QuantizedKVCache(model)  # takes over: the first one is told so
    quept.set_bits(model, None)
    with pytest.raises(RuntimeError, match="runs this layer's keys or values in float"):
        model(IDS, cache=newer, use_cache=True)


def test_quept_run_uses_it_for_a_kv_quantized_folder(tmp_path, capsys):
    model = elastic_tiny(SPEC)
    quept.api.export(model, 4, tmp_path / "w4", tokenizer=char_tokenizer())
    argv = ["run", str(tmp_path / "w4"), "--prompt", "It is a truth", "--max-new-tokens", "6",
            "--no-eos", "--json"]
    outs = {}
    for kind in ("auto", "float"):
        assert main([*argv, "--kv-cache", kind]) == 0
        outs[kind] = json.loads(capsys.readouterr().out)
    assert outs["auto"]["kv_cache"] == "quantized" and outs["float"]["kv_cache"] == "float"
    assert outs["auto"]["text"] == outs["float"]["text"]
    assert 0 < outs["auto"]["kv_cache_bytes"] < outs["auto"]["kv_cache_float32_bytes"] / 2
    assert main(argv[:-1]) == 0
    assert "KV cache: 18 tokens as packed codes" in capsys.readouterr().out
    plain = elastic_tiny(replace(SPEC, kv_bits=None))
    quept.api.export(plain, 4, tmp_path / "p4", tokenizer=char_tokenizer())
    assert main(["run", str(tmp_path / "p4"), "--prompt", "a", "--kv-cache", "quantized"]) == 2
    assert "calibrated with --kv-bits" in capsys.readouterr().err


def test_rotated_quantizer_trains_after_running_under_inference_mode():
    """The rotation's matrix is cached: made first under inference_mode (a generation), it
    must still serve a calibration with autograd on."""
    with torch.inference_mode():
        fake_quant_kv(torch.randn(2, 32), 4, 16, rotate=True)
    x = torch.randn(2, 32, requires_grad=True)
    fake_quant_kv(x, 4, 16, rotate=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_compiled_kernel_reads_the_codes_as_the_torch_path(bits, monkeypatch):
    """SmolLM2's shape (3 KV heads of 64: the kernel's AVX2 path where the CPU has it), a
    batch of 2 grown in two appends; the torch path is the reference."""
    from quept.export import kv_cache
    from quept.ops import kernels

    if kernels.load() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    gen = torch.Generator().manual_seed(bits)
    store = kv_cache._Store(bits, 3, 64, rotate=True)
    for tokens in (5, 9):
        k, v = (torch.randn(2, 3, tokens, 64, generator=gen) * 4 for _ in range(2))
        store.append(k, v)
    assert kv_cache._kernel_reads(bits, 384, 64, torch.device("cpu"))
    fast = store.past(14)
    monkeypatch.setattr(kv_cache, "_kernel_reads", lambda *a: False)
    slow = store.past(14)
    for a, b in zip(fast, slow):
        assert a.shape == (2, 14, 3, 64)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_the_compiled_kernel_quantizes_and_packs_as_the_torch_path(bits, rotate):
    from quept.ops import kernels
    from quept.ops.pack import pack, unpack
    from quept.ops.quant import hadamard_matrix

    if kernels.load() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    x = torch.randn(40, 6 * 64, generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    x[:, 5] *= 20  # an outlier channel, as keys have
    packed, scale, zero, deq = kernels.kv_quantize(
        x, bits, 64, hadamard_matrix(64) if rotate else None)
    codes, step, zero_point = quantize_kv(x, bits, 64, rotate)
    torch.testing.assert_close(scale, step.squeeze(-1), atol=0, rtol=1e-5)
    assert (zero - zero_point.squeeze(-1)).abs().max() <= 1  # a rounding tie at most
    got = unpack(packed, bits, 6 * 64)
    want = codes.flatten(-2)
    # the rotation sums in another order than torch's matmul: a code on a rounding boundary
    # may land on the other side, never further
    assert (got.int() - want.int()).abs().max() <= 1
    assert (got == want).float().mean() > 0.99
    if not rotate:  # no sums to reorder: the same codes, packed the same way
        assert torch.equal(packed, pack(want, bits))
    torch.testing.assert_close(deq, dequantize_kv(codes, step, zero_point, rotate),
                               atol=float(step.max()) * 1.01, rtol=0)


def test_a_prompt_fed_in_chunks_generates_the_same_text(tmp_path, capsys):
    from quept.export.runtime import generate

    model = elastic_tiny(SPEC)
    quept.api.export(model, 4, tmp_path / "w4", tokenizer=char_tokenizer())
    packed, tok = quept.api.load_packed(tmp_path / "w4")
    prompt = "It is a truth universally acknowledged, that a single man"
    for kind in ("quantized", "float"):
        whole = generate(packed, tok, prompt, 8, stop_at_eos=False, kv_cache=kind)
        for chunk in (1, 7, 16):
            part = generate(packed, tok, prompt, 8, stop_at_eos=False, kv_cache=kind,
                            prefill_chunk=chunk)
            assert part.text == whole.text and part.prompt_tokens == whole.prompt_tokens
    assert part.kv_cache_bytes is None and whole.kv_cache == "float"
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        generate(packed, tok, prompt, 4, prefill_chunk=0)
    assert main(["run", str(tmp_path / "w4"), "--prompt", prompt, "--max-new-tokens", "8",
                 "--no-eos", "--prefill-chunk", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == whole.text


@pytest.mark.parametrize("rotate", [False, True])
def test_the_compiled_attention_matches_plain_softmax_attention(rotate):
    """SmolLM2's shape (3 KV heads of 64, 3 queries each), a batch of 2 with a padding mask:
    the kernel over the dequantized rows against softmax attention written out in torch."""
    from quept.export import kv_cache
    from quept.ops import kernels
    from quept.ops.quant import hadamard_matrix, rotate_heads

    if kernels.load() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    gen = torch.Generator().manual_seed(3)
    store = kv_cache._Store(4, 3, 64, rotate)
    store.append(*(torch.randn(2, 3, 20, 64, generator=gen) for _ in range(2)))
    new_k, new_v = (torch.randn(2, 3, 1, 64, generator=gen) for _ in range(2))
    q = torch.randn(2, 3, 3, 64, generator=gen) * 0.125
    qr = rotate_heads(q) if rotate else q
    mask = torch.zeros(2, 21)
    mask[1, :4] = float("-inf")  # the second sequence is left-padded by 4 tokens
    got = kernels.kv_attend(qr, q, store.rows(20), new_k, new_v, mask,
                            hadamard_matrix(64) if rotate else None)
    keys, values = (t.transpose(1, 2) for t in store.past(20))
    if rotate:  # rebuild the past keys and values in the plain basis
        keys, values = rotate_heads(keys), rotate_heads(values)
    keys, values = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    probs = (q @ keys.transpose(-1, -2) + mask[:, None, None]).softmax(-1)
    torch.testing.assert_close(got, probs @ values, atol=1e-5, rtol=1e-5)
    assert probs[1, ..., :4].abs().max() == 0
