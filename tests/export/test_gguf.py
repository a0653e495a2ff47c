"""GGUF export: exact block mapping read back with the gguf package, and llama.cpp runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quept.api import prepare
from quept.config import ConfigError, ElasticSpec
from quept.data.smollm import unpermute_rope
from quept.nn import elastic_layers, set_bits
from quept.ops import dequantize
from tests.conftest import tiny_model

gguf = pytest.importorskip("gguf")
from quept.export.gguf import GGUFExportError, write_gguf  # noqa: E402

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
EXACT_TYPES = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1", 6: "Q8_0", 7: "Q8_0"}


def tiny_tokenizer():
    """A byte-level BPE (gpt2-style) tokenizer of 300 tokens, trained on one sentence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def elastic_tiny(spec: ElasticSpec | None = None, kind: str = "llama"):
    """Tiny llama (vocab 320 > the tokenizer's 300: padded) with non-zero adapters and clips."""
    model = prepare(tiny_model(kind, vocab_size=320), spec or ElasticSpec())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.lora_u.copy_(torch.randn(m.lora_u.shape, generator=gen) * 0.02)
            for p in [*m.clip_hi.values(), *m.clip_lo.values()]:
                p.copy_(torch.rand(p.shape, generator=gen) * 4)
    return model


@pytest.fixture(scope="module")
def model():
    return elastic_tiny()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def read_weights(path, model) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF back to {elastic layer name: (type, dequantized (out, in) in HF row order)}."""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    cfg = model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    out = {}
    for name, layer in elastic_layers(model).items():
        kind = name.rpartition(".")[2]
        t = by_name[f"blk.{name.split('.')[2]}.{short[kind]}.weight"]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(layer.out_features, -1)
        out[name] = (t.tensor_type.name, unpermute_rope(w, heads[kind]) if kind in heads else w)
    return out


def reference(layer, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our dequantized weight and, per weight, its code and zero-point (all (out, in))."""
    codes, scale, zero = layer.quantized_codes(bits)
    gs = layer.spec.group_size_for(bits)
    ours = dequantize(codes, scale, zero, gs)
    rep = codes.shape[1] // scale.shape[1]
    z = zero.repeat_interleave(rep, 1)
    s = scale.repeat_interleave(rep, 1)
    return ours.numpy(), codes.numpy().astype(np.float32), (z.numpy(), s.numpy())


def assert_exact(got: np.ndarray, layer, bits: int) -> None:
    """``got`` is our codes under fp16 d and m, bit for bit, so within the fp16 rounding of the
    scale and offset of our dequantized weight."""
    ours, q, (z, s) = reference(layer, bits)
    d = s.astype(np.float16).astype(np.float32)
    if EXACT_TYPES[bits] == "Q8_0":
        expected = d * (q - z)
    else:
        expected = d * q + (-z * s).astype(np.float16).astype(np.float32)
    assert np.array_equal(got, expected)
    assert (np.abs(got - ours) <= (q + z) * s * 2.0**-11 + 1e-7).all()


@pytest.mark.parametrize("bits", sorted(EXACT_TYPES))
def test_exact_widths_read_back_equal_to_our_dequantized_weights(model, tokenizer, tmp_path, bits):
    weights = read_weights(write_gguf(model, tokenizer, tmp_path / "m.gguf", bits), model)
    for name, layer in elastic_layers(model).items():
        qtype, got = weights[name]
        assert qtype == EXACT_TYPES[bits], name
        assert_exact(got, layer, bits)


def test_w8_is_q8_0_exact_where_codes_fit_else_within_half_a_step(model, tokenizer, tmp_path):
    weights = read_weights(write_gguf(model, tokenizer, tmp_path / "m.gguf", 8), model)
    n_exact = n_blocks = 0
    for name, layer in elastic_layers(model).items():
        qtype, got = weights[name]
        ours, q, (z, s) = reference(layer, 8)
        assert qtype == "Q8_0"
        fits = ((q - z >= -128) & (q - z <= 127)).reshape(q.shape[0], -1, 32).all(-1)
        exact = (s.astype(np.float16).astype(np.float32) * (q - z)).reshape(*fits.shape, 32)
        got_b, ours_b = got.reshape(exact.shape), ours.reshape(exact.shape)
        assert np.array_equal(got_b[fits], exact[fits]), name
        # Half a Q8_0 step d = absmax / 127, plus up to 127 times the fp16 rounding of d.
        step = np.abs(ours_b[~fits]).max(-1, keepdims=True) / 127
        assert (np.abs(got_b[~fits] - ours_b[~fits]) <= (0.5 + 127 / 2048) * step).all(), name
        n_exact, n_blocks = n_exact + fits.sum(), n_blocks + fits.size
    assert 0 < n_exact < n_blocks  # both paths are exercised


def test_mixed_plan_gives_each_tensor_its_type(model, tokenizer, tmp_path):
    layers = list(elastic_layers(model))
    plan = {n: (2, 5, 7, None)[i % 4] for i, n in enumerate(layers)}
    weights = read_weights(write_gguf(model, tokenizer, tmp_path / "m.gguf", plan), model)
    for name, layer in elastic_layers(model).items():
        qtype, got = weights[name]
        if plan[name] is None:
            assert qtype == "F16"
            np.testing.assert_allclose(got, layer.weight.numpy(), rtol=1e-3, atol=1e-6)
        else:
            assert qtype == EXACT_TYPES[plan[name]]
            assert_exact(got, layer, plan[name])


def test_tokenizer_and_hparams_metadata(model, tokenizer, tmp_path):
    reader = gguf.GGUFReader(str(write_gguf(model, tokenizer, tmp_path / "m.gguf", 4)))
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tokens = field["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = field["tokenizer.ggml.token_type"]
    assert types[vocab["<|endoftext|>"]] == gguf.TokenType.CONTROL
    assert set(types[300:]) == {gguf.TokenType.UNUSED}
    assert field["tokenizer.ggml.pre"] == "gpt-2" and field["tokenizer.ggml.model"] == "gpt2"
    assert len(field["tokenizer.ggml.merges"]) == 300 - 257  # every trained token is one merge
    assert field["llama.attention.head_count_kv"] == 2 and field["llama.block_count"] == 2
    assert field["llama.rope.dimension_count"] == 16
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses


def test_unexportable_models_and_widths_fail_clearly(model, tokenizer, tmp_path):
    with pytest.raises(GGUFExportError, match="model types"):
        write_gguf(elastic_tiny(kind="qwen2"), tokenizer, tmp_path / "q.gguf", 4)
    with pytest.raises(GGUFExportError, match="block of 32"):
        write_gguf(elastic_tiny(ElasticSpec(default_group_size=16)), tokenizer, tmp_path / "g.gguf", 4)
    with pytest.raises(ConfigError, match="outside"):
        write_gguf(model, tokenizer, tmp_path / "b.gguf", 9)
    with pytest.raises(GGUFExportError, match="plan does not match"):
        write_gguf(model, tokenizer, tmp_path / "p.gguf", {"model.layers.0.mlp.up_proj": 4})
    with pytest.raises(GGUFExportError, match="'\\*.down' matches no layer"):
        write_gguf(model, tokenizer, tmp_path / "p.gguf", {"*": 4, "*.down": 8})
    with pytest.raises(GGUFExportError, match="no elastic layers"):
        write_gguf(tiny_model(), tokenizer, tmp_path / "f.gguf", 4)


# --------------------------------------------------------------------------- llama.cpp
def llama_logits(path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True,
                          n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def test_llama_cpp_runs_the_w4_export_with_our_logits(model, tokenizer, tmp_path):
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", 4)
    ids = tokenizer(TEXT)["input_ids"]
    theirs = llama_logits(path, ids)
    with torch.no_grad():
        set_bits(model, 4)
        ours = model(torch.tensor([ids])).logits[0].numpy()
        set_bits(model, 8)
        ours_w8 = model(torch.tensor([ids])).logits[0].numpy()
        set_bits(model, None)
    gap = np.abs(ours - theirs).max()
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    # llama.cpp rounds activations to 8 bits and stores embeddings in fp16; a wrong RoPE order,
    # zero sign or block layout moves logits by as much as changing the width 4 -> 8 does.
    assert gap < 0.1 * np.abs(ours - ours_w8).max(), gap
    assert cos.min() > 0.999, cos.min()


@pytest.mark.slow
def test_llama_cpp_reads_the_default_model_tokenizer_and_logits(tmp_path):
    """Real SmolLM2 vocabulary ("smollm" pre-tokenizer), uncalibrated elastic model at W4."""
    from quept.api import load_model
    from quept.data import evaluation_text

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    net, tok = load_model()
    prepare(net, ElasticSpec())
    path = write_gguf(net, tok, tmp_path / "smollm2-w4.gguf", 4)
    text = evaluation_text()[:3000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2,
                          verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids[:128])
    theirs = np.array(llm.scores[:128], dtype=np.float32)
    with torch.no_grad():
        set_bits(net, 4)
        ours = net(torch.tensor([ids[:128]])).logits[0].numpy()
    # llama.cpp rounds the activations to 8 bits per block of 32 inside its Q4_1 matmuls; on the
    # memorised first sentence this alone moves a few positions' logits by several units.
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cos.mean() > 0.995, cos.mean()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9
    target = torch.tensor(ids[1:128])
    nll = [torch.nn.functional.cross_entropy(torch.from_numpy(x[:-1]), target).item()
           for x in (ours, theirs)]
    assert abs(nll[1] - nll[0]) < 0.1, nll  # 127 tokens: measured 3.840 (ours), 3.801


# --------------------------------------------------------------------------- checks before work
def test_check_gguf_refuses_what_write_gguf_would_before_any_codes(model, tokenizer, monkeypatch):
    from quept.export.gguf import check_gguf
    from tests.export.tiny import char_tokenizer

    def no_codes(*args, **kw):
        raise AssertionError("check_gguf computed codes")

    for layer in elastic_layers(model).values():
        monkeypatch.setattr(layer, "quantized_codes", no_codes)
    assert set(check_gguf(model, tokenizer, 4).values()) == {4}
    with pytest.raises(GGUFExportError, match="only byte-level BPE"):
        check_gguf(model, char_tokenizer(), 4)
    with pytest.raises(GGUFExportError, match="block of 32"):
        check_gguf(elastic_tiny(ElasticSpec(default_group_size=16)), tokenizer, 4)
    with pytest.raises(GGUFExportError, match="float_type"):
        check_gguf(model, tokenizer, 4, float_type="bf16")
    with pytest.raises(ConfigError, match="outside"):
        check_gguf(model, tokenizer, 9)


def test_the_api_export_writes_a_gguf_file_only_where_it_spoils_nothing(model, tokenizer,
                                                                         tmp_path):
    from quept.api import export, load_compact, save_compact

    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own file")
    with pytest.raises(ConfigError, match="notes.txt is a file that is not a GGUF file"):
        export(model, 4, notes, "gguf", tokenizer=tokenizer)
    assert notes.read_text() == "the user's own file"
    with pytest.raises(ConfigError, match="is a folder; give the path of the file"):
        export(model, 4, tmp_path, "gguf", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="notes.txt is a file, not a folder"):
        export(model, 4, notes / "m.gguf", "gguf", tokenizer=tokenizer)
    out = tmp_path / "m.gguf"
    export(model, 3, out, "gguf", tokenizer=tokenizer)
    export(model, 5, out, "gguf", tokenizer=tokenizer)  # an earlier GGUF export is replaced
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} >= {"Q5_1"}
    save_compact(model, tmp_path / "compact", tokenizer=tokenizer)
    compact, tok = load_compact(tmp_path / "compact")
    with pytest.raises(ConfigError, match="is inside .*compact, the folder being read"):
        export(compact, 4, tmp_path / "compact" / "m.gguf", "gguf", tokenizer=tok)
    assert not (tmp_path / "compact" / "m.gguf").exists()


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    """An elastic folder over a tiny llama with the byte-level BPE tokenizer."""
    from tests.export.tiny import elastic_folder

    root = tmp_path_factory.mktemp("gguf")
    tiny_model(max_position_embeddings=1024, vocab_size=320).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    return elastic_folder(root / "elastic", root / "base")


def test_cli_gguf_out_replaces_a_gguf_file_only(gguf_folder, capsys):
    from quept.cli import main

    root = gguf_folder.parent
    out = root / "m.gguf"
    for _ in range(2):  # the second export replaces the first
        assert main(["export", str(gguf_folder), "--bits", "4", "--format", "gguf", "--out",
                     str(out)]) == 0
    # before: the line gave no size; Q4_1 stores 4-bit codes with a float16 scale and offset
    # per block of 32: 5 bits per weight
    assert "gguf export written to" in (said := capsys.readouterr().out)
    assert ": 5.000 bits per quantized weight" in said, said
    config = (gguf_folder / "quept.json").read_bytes()
    (root / "afile.txt").write_text("the user's own file")
    for target, says in ((gguf_folder / "quept.json", "is inside"),
                         (gguf_folder / "m.gguf", "is inside"),
                         (root / "afile.txt", "afile.txt is a file that is not a GGUF file"),
                         (root, "is a folder; give the path of the file")):
        assert main(["export", str(gguf_folder), "--bits", "4", "--format", "gguf", "--out",
                     str(target)]) == 2, target
        err = capsys.readouterr().err
        assert says in err.strip().splitlines()[-1], err
    assert (gguf_folder / "quept.json").read_bytes() == config
    assert not (gguf_folder / "m.gguf").exists()
    assert (root / "afile.txt").read_text() == "the user's own file"
    # a GGUF file where a model folder is read is named as one
    for argv in (["run", str(out), "--prompt", "It", "--bits", "4"],
                 ["export", str(out), "--bits", "4", "--out", str(root / "p")]):
        assert main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{out} is a GGUF file, not a model folder: GGUF files run in llama.cpp" in last
        assert f"`quept info {out}` reads" in last
