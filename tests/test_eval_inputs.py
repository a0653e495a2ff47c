"""The evaluators refuse, up front and with a ConfigError, inputs they cannot measure (no
widths, one sentence, non-finite pixels, a bad sentence count) and take int32 token ids as
int64 ones; sentences_from_text says what it truncated and skipped."""

import logging
import sys

import pytest
import torch

import quept
from quept.config import ConfigError, ElasticSpec
from quept.eval import Sentences, sentences_from_text, window_nll
from tests.conftest import tiny_model
from tests.test_encoder import PARAGRAPH, char_bert_tokenizer, tiny_bert
from tests.test_vit import tiny_vit

SPEC = ElasticSpec(default_group_size=32)


@pytest.fixture(scope="module")
def lm():
    return quept.prepare(tiny_model(), SPEC)


@pytest.fixture(scope="module")
def bert():
    return quept.prepare(tiny_bert(), SPEC)


@pytest.fixture(scope="module")
def vit():
    return quept.prepare(tiny_vit(), SPEC)


def forbid_embedding(monkeypatch) -> None:
    """Make evaluate_embeddings fail if it embeds anything (its checks must come first)."""
    def embed(*args, **kwargs):
        raise AssertionError("sentences were embedded before the inputs were checked")

    monkeypatch.setattr(sys.modules["quept.api.evaluate"], "sentence_embeddings", embed)


def test_int32_windows_give_the_perplexity_of_int64_ones(lm):
    windows = torch.randint(0, 256, (2, 8))
    want = quept.evaluate(lm, windows, [4], progress=False)[0].ppl
    assert quept.evaluate(lm, windows.int(), [4], progress=False)[0].ppl == want
    assert torch.equal(window_nll(lm, windows.int()), window_nll(lm, windows))
    with pytest.raises(ConfigError, match=r"integer token ids \(int64 or int32\).*torch.int16"):
        quept.evaluate(lm, windows.short(), [4], progress=False)


def test_no_widths_are_refused_before_any_work(lm, vit, bert, monkeypatch):
    forbid_embedding(monkeypatch)
    says = "no widths to evaluate \\(bits is empty\\): pass at least one bit-width"
    with pytest.raises(ConfigError, match=says):
        quept.evaluate(lm, torch.randint(0, 256, (2, 8)), [], progress=False)
    with pytest.raises(ConfigError, match=says):
        quept.evaluate_accuracy(vit, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), [],
                                progress=False)
    ids = torch.randint(5, 32, (3, 10))
    with pytest.raises(ConfigError, match=says):
        quept.evaluate_embeddings(bert, Sentences(ids, torch.ones_like(ids)), [],
                                  progress=False)
    with pytest.raises(ConfigError, match="bit-width 9 is outside 2..8"):
        quept.evaluate_embeddings(bert, Sentences(ids, torch.ones_like(ids)), [9],
                                  progress=False)
    with pytest.raises(ConfigError, match="bits must be a width, None \\(float\\) or a list"):
        quept.evaluate(lm, torch.randint(0, 256, (2, 8)), 4.0, progress=False)


def test_embedding_fidelity_of_one_sentence_is_refused_before_any_work(bert, monkeypatch):
    ids = torch.randint(5, 32, (1, 10))
    forbid_embedding(monkeypatch)
    with pytest.raises(ConfigError, match="embedding fidelity needs at least 2 sentences, got "
                                          "1: its neighbour agreement compares"):
        quept.evaluate_embeddings(bert, Sentences(ids, torch.ones_like(ids)), [4],
                                  progress=False)


def test_non_finite_pixels_are_refused_by_every_stage(vit):
    labels = torch.randint(0, 10, (4,))
    nan = torch.full((4, 1, 28, 28), float("nan"))
    one_inf = torch.rand(4, 1, 28, 28)
    one_inf[2, 0, 3, 5] = float("inf")
    for pixels, count in ((nan, 4 * 28 * 28), (one_inf, 1)):
        says = f"hold {count} non-finite values \\(NaN or inf\\) of {4 * 28 * 28}"
        with pytest.raises(ConfigError, match=f"pixel values {says}"):
            quept.evaluate_accuracy(vit, pixels, labels, [4], progress=False)
        with pytest.raises(ConfigError, match=f"calibration inputs {says}"):
            quept.calibrate(vit, pixels, quept.CalibConfig(n_samples=4), progress=False)
        with pytest.raises(ConfigError, match=says):
            quept.sensitivity(vit, pixels, progress=False)


@pytest.mark.parametrize("n", [-1, 0, 2.5, True, "3"])
def test_sentences_from_text_wants_a_positive_count(n):
    with pytest.raises(ConfigError, match=r"sentences_from_text: n \(the number of sentences\) "
                                          "must be a positive integer"):
        sentences_from_text(char_bert_tokenizer(), "\n\n".join([PARAGRAPH] * 4), n)


def test_sentences_from_text_logs_what_it_truncates_and_skips(caplog):
    tok, short = char_bert_tokenizer(), "too few words here"
    text = "\n\n".join([PARAGRAPH, short, PARAGRAPH[:60], short, PARAGRAPH])
    with caplog.at_level(logging.INFO, logger="quept.eval.embedding"):
        got = sentences_from_text(tok, text, 3, max_len=64)
    assert got.input_ids.shape == (3, 64)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["sentences_from_text: skipped 2 paragraphs of the text with fewer than 8 "
                    "words",
                    "sentences_from_text: truncated 2 of the 3 paragraphs to max_len=64 tokens"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quept.eval.embedding"):
        sentences_from_text(tok, "\n\n".join([PARAGRAPH] * 2), 2, max_len=128)
    assert not caplog.records
