"""Every Python example in the README and docs/ runs as written.

The examples name the built-in models and texts. Here those names lead to tiny random models and
short texts (the same functions are patched, nothing in the examples is rewritten), so the
examples run in seconds on the CPU. What this checks is that each documented call exists, takes
the arguments shown and works on what the example before it produced. A renamed function, a
dropped argument or a changed return value fails here.

Some pages continue an earlier example (the deployment page starts from a loaded elastic model).
Each such page gets the few lines it assumes, listed in ``ASSUMED``, ahead of its first example.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from quept import data
from tests.export.tiny import char_tokenizer
from tests.test_encoder import char_bert_tokenizer
from tests.test_vit import fake_fashion_cache, tiny_vit

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)

# the pages with examples, in the order a reader meets them (the deployment and
# mixed-precision examples read the elastic folder the README's example wrote)
PAGES = ["README.md", "docs/api.md", "docs/encoders.md", "docs/vision.md", "docs/deployment.md",
         "docs/mixed-precision.md"]

# what a page's examples take from the text around them
ASSUMED = {
    "docs/deployment.md": "import quept\ntext = quept.data.calibration_text()\n",
    "docs/mixed-precision.md": (
        "import quept\n"
        "model, tok = quept.load('quept-elastic')\n"
        "ids = quept.samples_from_text(tok, quept.data.calibration_text(), quept.CalibConfig())\n"),
}

WORDS = ("it is a truth universally acknowledged that a single man in possession of a good "
         "fortune must be in want of a wife").split()


def paragraphs(n: int, seed: int) -> str:
    """``n`` lower-case paragraphs of shuffled words (every character in both tiny tokenizers)."""
    gen = torch.Generator().manual_seed(seed)
    return "\n\n".join(" ".join(WORDS[i] for i in torch.randperm(len(WORDS), generator=gen))
                       for _ in range(n))


def snippets(page: str) -> list[str]:
    return FENCE.findall((ROOT / page).read_text())


def test_every_page_with_a_python_example_is_run():
    pages = [p.relative_to(ROOT).as_posix()
             for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    assert sorted(p for p in pages if snippets(p)) == sorted(PAGES)


@pytest.fixture
def built_in(tmp_path, monkeypatch):
    """The built-in models and texts replaced by tiny ones; the working directory a fresh one."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    # made for the windows of the examples (512 tokens for the decoder, 256 for the encoder)
    decoder, encoder, vit = tmp_path / "decoder", tmp_path / "encoder", tmp_path / "vit"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=1024,
        tie_word_embeddings=True)).save_pretrained(decoder)
    char_tokenizer().save_pretrained(decoder)
    BertModel(BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=512)
              ).save_pretrained(encoder)
    char_bert_tokenizer().save_pretrained(encoder)
    tiny_vit().save_pretrained(vit)
    monkeypatch.setenv("QUEPT_CACHE", str(tmp_path / "cache"))
    fake_fashion_cache(tmp_path / "cache", n_train=1024, n_test=64)
    for name, path in (("default_model_dir", decoder), ("encoder_model_dir", encoder),
                       ("vit_model_dir", vit)):
        monkeypatch.setattr(data, name, lambda cache_dir=None, path=path: path)
    monkeypatch.setattr(data, "calibration_text", lambda cache_dir=None: paragraphs(300, 1))
    monkeypatch.setattr(data, "evaluation_text", lambda cache_dir=None: paragraphs(300, 2))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_the_examples_run_in_order(built_in, capsys):
    for page in PAGES:
        if page == "docs/deployment.md":  # the deployment page starts from `quept quantize`'s folder
            shutil.copytree(built_in / "my-elastic", built_in / "quept-elastic")
        scope: dict = {}
        exec(ASSUMED.get(page, ""), scope)
        for i, code in enumerate(snippets(page)):
            try:
                exec(compile(code, f"{page} example {i + 1}", "exec"), scope)
            except Exception as e:
                raise AssertionError(f"{page}, example {i + 1} fails: {type(e).__name__}: {e}"
                                     ) from e
        if page == "README.md":
            assert (built_in / "my-elastic" / "quept.json").is_file()
        if page == "docs/api.md":
            printed = capsys.readouterr().out.split("\n")
            rows = [line.split() for line in printed if line[:2] in ("2 ", "3 ", "4 ", "No")]
            assert [r[0] for r in rows] == ["2", "3", "4", "None"], printed
            assert all(float(r[2]) > 1 for r in rows)  # perplexities
        if page == "docs/vision.md":
            assert len(scope["rows"]) == 4
        if page == "docs/mixed-precision.md":
            assert scope["plan"].bits_per_weight <= 3.25
