"""Embedding fidelity of a sentence encoder: how closely the quantized model's sentence
embeddings follow the float model's on the same sentences."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quept.checks import check_count, counted

log = logging.getLogger(__name__)


class NotEnoughSentencesError(ValueError):
    """The text has fewer usable passages than were asked for."""


@dataclass(frozen=True)
class Sentences:
    """Padded token ids (n, T) and their attention mask (n, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def sentences_from_text(tokenizer: Any, text: str, n: int, max_len: int = 128,
                        min_words: int = 8, seed: int | None = None) -> Sentences:
    """The first ``n`` paragraphs of ``text`` with at least ``min_words`` words (with ``seed``:
    ``n`` of them drawn at random, in text order), tokenized with the tokenizer's special
    tokens, truncated to ``max_len`` and padded to the longest. Logs (INFO) how many
    paragraphs were skipped as too short and how many of those chosen were truncated."""
    check_count(n, "sentences_from_text: n (the number of sentences)")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    usable = [p for p in paragraphs if len(p.split()) >= min_words]
    short = sum(1 for p in paragraphs if p) - len(usable)
    if short:
        log.info("sentences_from_text: skipped %d paragraphs of the text with fewer than %d "
                 "words", short, min_words)
    if seed is not None and len(usable) > n:
        gen = torch.Generator().manual_seed(seed)
        usable = [usable[i] for i in sorted(torch.randperm(len(usable), generator=gen)[:n].tolist())]
    chosen = usable[:n]
    if len(chosen) < n:
        raise NotEnoughSentencesError(
            f"the text has {counted(len(chosen), 'paragraph')} of at least {min_words} words; "
            f"{n} were asked for: pass fewer or a longer text")
    cut = _longer_than(tokenizer, chosen, max_len)
    if cut:
        log.info("sentences_from_text: truncated %d of the %d paragraphs to max_len=%d tokens",
                 cut, n, max_len)
    enc = tokenizer(chosen, padding=True, truncation=True, max_length=max_len,
                    return_tensors="pt")
    return Sentences(enc["input_ids"], enc["attention_mask"])


def _longer_than(tokenizer: Any, texts: list[str], max_len: int) -> int:
    """How many of ``texts`` tokenize (special tokens included) to more than ``max_len``
    tokens: cut at ``max_len + 1``, so a long text is never tokenized whole."""
    ids = tokenizer(texts, truncation=True, max_length=max_len + 1)["input_ids"]
    return sum(1 for row in ids if len(row) > max_len)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, sentences: Sentences, batch_size: int = 16,
                        progress: bool = False, desc: str = "embed") -> torch.Tensor:
    """Mean-pooled (over real tokens) and L2-normalised last hidden states: (n, C) float32,
    the pooling all-MiniLM-L6-v2 and most sentence encoders use."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and sentences.input_ids.shape[1] > limit:
        raise ValueError(f"sentences of {sentences.input_ids.shape[1]} tokens are longer than the "
                         f"model's {limit} positions: pass a smaller max_len")
    check_count(batch_size, f"{desc}: batch_size")
    device = next(model.parameters()).device
    out = []
    n = sentences.input_ids.shape[0]
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc=desc, leave=False):
        ids = sentences.input_ids[i : i + batch_size].to(device)
        mask = sentences.attention_mask[i : i + batch_size].to(device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def fidelity(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How ``emb`` (n, C) follows the reference embeddings ``ref`` (n, C), both normalised:
    mean and minimum cosine of each sentence with its reference, and the share of sentences
    whose nearest other sentence (by cosine) is the same as under the reference."""
    if emb.shape != ref.shape or emb.shape[0] < 2:
        raise ValueError(f"need two embeddings of the same n >= 2 rows, got {tuple(emb.shape)} "
                         f"and {tuple(ref.shape)}")
    cos = (emb * ref).sum(-1)
    eye = torch.eye(emb.shape[0], dtype=torch.bool)
    nn_q = (emb @ emb.T).masked_fill(eye, -2.0).argmax(-1)
    nn_r = (ref @ ref.T).masked_fill(eye, -2.0).argmax(-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "neighbour_agreement": (nn_q == nn_r).float().mean().item()}
