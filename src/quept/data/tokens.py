"""Turn text into calibration samples and evaluation windows of token ids."""

from __future__ import annotations

from typing import Any

import torch


class NotEnoughTextError(ValueError):
    """The text is too short for the requested samples or windows."""


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids, no special tokens added."""
    ids = tokenizer(
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from ``ids`` (1-D): (n, seq_len)."""
    if ids.numel() <= seq_len:
        raise NotEnoughTextError(
            f"calibration text has {ids.numel()} tokens; need more than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seq_len: int = 512, n_windows: int | None = 32) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens from the start: (n_windows, seq_len).
    ``n_windows=None`` takes every full window."""
    available = ids.numel() // seq_len
    if available == 0 or (n_windows is not None and n_windows > available):
        raise NotEnoughTextError(
            f"evaluation text has {ids.numel()} tokens: {available} windows of {seq_len}, "
            f"but {n_windows} were asked for; pass fewer windows or a longer text"
        )
    n = available if n_windows is None else n_windows
    return ids[: n * seq_len].reshape(n, seq_len)
