"""BERT-style encoders: the family entry, [CLS]/[SEP] calibration windows, calibration, embedding
fidelity, save/load, packed export and the command line, on a tiny random BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quept
from quept.api import UnsupportedModelError
from quept.cli import main
from quept.config import CalibConfig, ElasticSpec
from quept.eval import NotEnoughSentencesError, fidelity, sentence_embeddings, sentences_from_text
from quept.models import family_for
from quept.nn import ElasticLinear, elastic_layers

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)
PARAGRAPH = ("it is a truth universally acknowledged that a single man in possession of a good "
             "fortune must be in want of a wife")
TEXT = "\n\n".join(" ".join(PARAGRAPH.split()[i:] + PARAGRAPH.split()[:i]) for i in range(24))


def char_bert_tokenizer():
    """Lower-case letters and space, one token per character, with [PAD] [UNK] [CLS] [SEP]
    added around every text as a BERT tokenizer does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, " ": 4,
             **{chr(c): c - 92 for c in range(97, 123)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, initializer_range=0.1)
    return BertModel(cfg).eval().requires_grad_(False)


@pytest.fixture
def bert_folder(tmp_path) -> Path:
    path = tmp_path / "bert"
    tiny_bert().save_pretrained(path)
    char_bert_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def texts(tmp_path) -> tuple[str, str]:
    calib, ev = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(TEXT * 4)
    ev.write_text(TEXT)
    return str(calib), str(ev)


def test_family_and_prepare_wrap_every_bert_linear():
    model = tiny_bert()
    fam = family_for(model)
    assert fam.name == "bert-encoder" and not fam.is_causal_lm
    quept.prepare(model, SPEC)
    layers = elastic_layers(model)
    assert len(layers) == 2 * 6
    assert isinstance(model.encoder.layer[1].attention.self.query, ElasticLinear)
    assert isinstance(model.encoder.layer[0].output.dense, ElasticLinear)
    assert not isinstance(model.pooler.dense, ElasticLinear)  # outside the blocks: float


def test_calibration_windows_get_cls_and_sep_for_a_bert_tokenizer():
    tok = char_bert_tokenizer()
    cfg = CalibConfig(n_samples=3, seq_len=20, seed=1)
    ids = quept.samples_from_text(tok, TEXT, cfg)
    assert ids.shape == (3, 20)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    inner = ids[:, 1:-1]  # no [PAD], [CLS] or [SEP] inside the window
    assert not torch.isin(inner, torch.tensor([0, 2, 3])).any()


def test_fidelity_measures_what_it_says():
    ref = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    same = fidelity(ref, ref)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["neighbour_agreement"] == 1.0
    noisy = torch.nn.functional.normalize(ref + 0.5 * torch.randn(6, 8), dim=-1)
    f = fidelity(noisy, ref)
    assert f["cosine_min"] <= f["cosine_mean"] < 1.0
    with pytest.raises(ValueError, match="same n"):
        fidelity(ref[:3], ref)


def test_sentences_need_enough_paragraphs():
    tok = char_bert_tokenizer()
    s = sentences_from_text(tok, TEXT, 5, max_len=40)
    assert s.input_ids.shape == (5, 40) and (s.input_ids[:, 0] == tok.cls_token_id).all()
    with pytest.raises(NotEnoughSentencesError, match="24 paragraphs"):
        sentences_from_text(tok, TEXT, 25)


def test_calibrate_then_fidelity_orders_widths_and_beats_rtn_at_2_bits():
    tok = char_bert_tokenizer()
    model = quept.prepare(tiny_bert(), SPEC)
    cfg = CalibConfig(n_samples=8, seq_len=32, batch_size=4, epochs=2)
    reports = quept.calibrate(model, quept.samples_from_text(tok, TEXT * 4, cfg), cfg,
                              progress=False)
    assert len(reports) == 2
    low = reports[0].bits.index(min(reports[0].bits))
    assert all(r.loss_after[low] < r.loss_before[low] for r in reports)
    sentences = sentences_from_text(tok, TEXT, 12, max_len=64)
    rows = quept.evaluate_embeddings(model, sentences, [None, 2, 4, 8], rtn=True, progress=False)
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        sentence_embeddings(model, sentences_from_text(tok, TEXT, 2))
    cos = {r.bits: r.cosine_mean for r in rows}
    assert cos[None] == pytest.approx(1.0)
    assert cos[2] < cos[4] < cos[8] <= 1.0 + 1e-6
    two = next(r for r in rows if r.bits == 2)
    assert two.cosine_mean > two.rtn["cosine_mean"]
    assert two.bits_per_weight == pytest.approx(2 + 18 / 32)


def test_save_load_round_trip_gives_identical_embeddings(bert_folder, tmp_path):
    model, tok = quept.load_model(bert_folder)
    quept.prepare(model, SPEC)
    with torch.no_grad():  # non-trivial adapters and clips, as calibration would leave them
        for m in elastic_layers(model).values():
            m.lora_u.normal_(0, 0.02)
    sentences = sentences_from_text(tok, TEXT, 6, max_len=64)
    quept.set_bits(model, 3)
    before = sentence_embeddings(model, sentences)
    quept.save(model, tmp_path / "el", quept.QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")
    quept.set_bits(loaded, 3)
    assert torch.equal(sentence_embeddings(loaded, sentences), before)
    # switched at run time from the elastic folder: the codes export writes
    quept.api.export(loaded, 2, tmp_path / "p2", tokenizer=tok)
    switch, _ = quept.load_switchable(tmp_path / "el", 3)
    quept.set_bits(switch, 2)
    p2, _ = quept.api.load_packed(tmp_path / "p2")
    assert torch.equal(sentence_embeddings(switch, sentences), sentence_embeddings(p2, sentences))


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_quantize_eval_export_on_an_encoder(bert_folder, texts, tmp_path, capsys):
    calib, ev = texts
    out = tmp_path / "elastic"
    res = run_json(capsys, [
        "quantize", "--model", str(bert_folder), "--out", str(out), "--calib-text", calib,
        "--eval-text", ev, "--samples", "8", "--seq-len", "32", "--batch-size", "4",
        "--group-size", "32", "--eval-sentences", "12", "--eval-bits", "2,4,8", "--json"])
    cos = {r["bits"]: r["cosine_mean"] for r in res["embedding_rows"]}
    assert res["sentences"] == 12 and cos[2] < cos[4] < cos[8]
    again = run_json(capsys, ["eval", str(out), "--bits", "4", "--text", ev, "--sentences",
                              "12", "--json"])
    assert again["embedding_rows"][0]["cosine_mean"] == pytest.approx(cos[4], abs=1e-6)

    packed = tmp_path / "w4"
    assert main(["export", str(out), "--bits", "4", "--out", str(packed)]) == 0
    capsys.readouterr()
    p = run_json(capsys, ["eval", str(packed), "--text", ev, "--sentences", "12", "--json"])
    assert p["packed"] and p["embedding_rows"][0]["cosine_mean"] == pytest.approx(cos[4], abs=2e-3)

    # mixed precision: the cost is one minus the embedding's cosine, per paragraph
    plan = run_json(capsys, ["plan", str(out), "--avg-bits", "3.5", "--out",
                             str(tmp_path / "p.json"), "--calib-text", calib, "--samples", "16",
                             "--seq-len", "48", "--check-samples", "8", "--json"])
    assert plan["objective"] == "embedding-distance" and plan["bits_per_weight"] <= 3.5
    assert len(set(plan["bits"].values())) > 1
    measured = run_json(capsys, ["eval", str(out), "--plan", str(tmp_path / "p.json"),
                                 "--plan", "*=3", "--text", ev, "--sentences", "12", "--json"])
    plans = {p["path"]: p for p in measured["plans"]}
    assert plans["*=3"]["cosine_mean"] == pytest.approx(
        run_json(capsys, ["eval", str(out), "--bits", "3", "--text", ev, "--sentences", "12",
                          "--json"])["embedding_rows"][0]["cosine_mean"], abs=1e-6)
    assert 0 < plans[str(tmp_path / "p.json")]["cosine_mean"] <= 1
    assert main(["info", str(tmp_path / "p.json")]) == 0
    assert "measured 1 - cosine per sentence" in capsys.readouterr().out

    for argv, match in (
        (["run", str(packed), "--prompt", "hi"], "does not generate"),
        (["eval", str(bert_folder), "--text", ev], "is not an elastic folder"),
        (["export", str(out), "--bits", "4", "--format", "gguf", "--out",
          str(tmp_path / "m.gguf")], "bert"),
    ):
        assert main(argv) == 2, argv
        assert match in capsys.readouterr().err


def test_unknown_encoder_type_is_refused_by_name(tmp_path):
    from transformers import DistilBertConfig

    DistilBertConfig().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'distilbert'.*'bert'"):
        quept.load_model(tmp_path)

