"""Two zero-shot tasks made from an evaluation text, for accuracy beside perplexity.

Both are built deterministically from the paragraphs of a text (blank-line separated; the
default is *Pride and Prejudice*, which calibration never sees), so they need no downloads:

- ``last-word``: a paragraph of 30 to 150 words without its last word; the model must give
  that word. Accuracy counts the word as right only when greedy decoding produces every one of
  its tokens (as LAMBADA is scored); the task also reports the word's perplexity.
- ``next-sentence``: one to a few sentences of a paragraph, then four candidates for the next
  sentence: the true one and three sentences of similar length from other paragraphs. The
  model picks the candidate with the highest log-likelihood (``acc``) or the highest
  log-likelihood per character (``acc_norm``); chance is 25%.

:func:`task_documents` returns the items; :mod:`quept.eval.harness` runs them (and any task of
lm-evaluation-harness) on a model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

LAST_WORD, NEXT_SENTENCE = "last-word", "next-sentence"
BUILTIN_TASKS = (LAST_WORD, NEXT_SENTENCE)
# Bump when the way items are made changes (the cached item files carry it in their names).
BUILDER_VERSION = 1

_LAST_WORD_RANGE = (30, 150)  # words per paragraph
_SENTENCE_RANGE = (5, 40)  # words per candidate sentence
_CONTEXT_WORDS = 80  # at most this many words of context before the next sentence
_CHOICES = 4

_TRAILING_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+)[^A-Za-z]*$", re.S)
# A sentence ends at . ! or ? (then any closing quotes or brackets) before a space and a
# capital letter or an opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z])")
# Titles whose full stop does not end a sentence.
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Col|Capt|Lt|Gen|Esq|Messrs|Rev|Sir)\.$")


class NotEnoughItemsError(ValueError):
    """The text yields too few items for a task."""


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs of ``text``, each on one line (whitespace collapsed)."""
    out = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [p for p in out if p]


def sentences(paragraph: str) -> list[str]:
    """``paragraph`` split into sentences (titles such as "Mr." do not end one)."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        piece = paragraph[start:m.end(1)]
        if _ABBREVIATION.search(piece):
            continue
        pieces.append(piece.strip())
        start = m.end()
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]


def last_word_items(text: str, seed: int = 0) -> list[dict[str, str]]:
    """One item per paragraph of 30..150 words that ends in a word: its text up to that word
    (``context``) and the word (``target``). ``seed`` is unused (the items are the paragraphs
    in order); it is accepted so that every builder has one signature."""
    lo, hi = _LAST_WORD_RANGE
    items, seen = [], set()
    for p in paragraphs(text):
        if not lo <= len(p.split()) <= hi or p in seen:
            continue
        seen.add(p)
        m = _TRAILING_WORD.match(p)
        if m:
            items.append({"context": m.group(1), "target": m.group(2)})
    return items


def next_sentence_items(text: str, seed: int = 0) -> list[dict[str, object]]:
    """One item per paragraph of three or more sentences: a context of whole sentences (at most
    80 words, at least one sentence), and four candidate next sentences, the true one at index
    ``gold``; the three others are drawn (seeded) from other paragraphs among the sentences
    whose length is nearest the true one's."""
    rng = random.Random(seed)
    lo, hi = _SENTENCE_RANGE
    paras = [s for s in (sentences(p) for p in paragraphs(text)) if len(s) >= 3]
    by_length: dict[int, list[tuple[int, str]]] = {}
    for j, sents in enumerate(paras):
        for s in sents:
            if lo <= len(s.split()) <= hi:
                by_length.setdefault(len(s.split()), []).append((j, s))
    items = []
    for i, sents in enumerate(paras):
        cut = rng.randrange(1, len(sents))
        target = sents[cut]
        n = len(target.split())
        if not lo <= n <= hi:
            continue
        context = [sents[cut - 1]]
        for s in reversed(sents[:cut - 1]):
            if sum(len(c.split()) for c in context) + len(s.split()) > _CONTEXT_WORDS:
                break
            context.insert(0, s)
        # the (at least) 12 sentences of other paragraphs nearest in length; three drawn
        near: list[str] = []
        for d in range(hi - lo + 1):
            for length in sorted({n - d, n + d}):
                near += [s for j, s in by_length.get(length, ()) if j != i and s != target]
            if len(near) >= 12:
                break
        if len(near) < _CHOICES - 1:
            continue
        choices = rng.sample(near, _CHOICES - 1) + [target]
        rng.shuffle(choices)
        items.append({"context": " ".join(context), "choices": choices,
                      "gold": choices.index(target)})
    return items


BUILDERS: dict[str, Callable[[str, int], list]] = {
    LAST_WORD: last_word_items,
    NEXT_SENTENCE: next_sentence_items,
}


def task_documents(name: str, text: str, seed: int = 0, min_items: int = 20) -> list:
    """The items of built-in task ``name`` made from ``text``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown built-in task {name!r}; the built-in tasks are "
                         f"{', '.join(BUILTIN_TASKS)}")
    items = BUILDERS[name](text, seed)
    if len(items) < min_items:
        raise NotEnoughItemsError(
            f"the text yields {len(items)} {name} items, fewer than {min_items}: give a longer "
            "text with blank-line separated paragraphs (--text FILE)")
    return items
