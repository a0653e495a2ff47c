"""Turn text into calibration samples and evaluation windows of token ids."""

from __future__ import annotations

import logging
from typing import Any

import torch

from quept.checks import ConfigError, check_count

log = logging.getLogger(__name__)

REUSE_WARNING = 4  # windows that cover the text more times than this over are worth a warning
REUSE_LIMIT = 100
"""Windows that would cover the text more times than this over are refused before they are
cut: past it more samples add no new text, only memory (the samples, and every block's
activations for each, N x T x hidden floats per stream), enough to kill the process."""


class NotEnoughTextError(ConfigError):
    """The text is too short for the requested samples or windows."""


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids, no special tokens added."""
    ids = tokenizer(
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from ``ids`` (1-D): (n, seq_len). Windows
    that would cover the text more than :data:`REUSE_LIMIT` times over, or outnumber the
    places a window can start (so that some would repeat another exactly), are refused."""
    _check_windows(ids.numel(), n, seq_len)
    starts = calibration_starts(ids.numel(), n, seq_len, seed)
    return torch.stack([ids[s : s + seq_len] for s in starts])


def _check_windows(n_tokens: int, n: int, seq_len: int) -> None:
    """:func:`calibration_samples`'s refusals and its warning, before anything is cut."""
    if n_tokens <= seq_len:
        raise NotEnoughTextError(
            f"calibration text has {n_tokens} tokens; need more than seq_len={seq_len}")
    places = n_tokens - seq_len  # where calibration_starts may start a window
    cover = n * seq_len / n_tokens
    most = min(REUSE_LIMIT * n_tokens // seq_len, places)
    if cover > REUSE_LIMIT:
        raise NotEnoughTextError(
            f"{n} calibration windows of {seq_len} tokens would cover a text of {n_tokens} "
            f"tokens {cover:.0f} times over, past the {REUSE_LIMIT} allowed: more windows add no "
            "new text, only memory (the samples, and every block's activations for each); "
            f"ask for at most {most} windows of this length, or give a longer text")
    if n > places:
        raise NotEnoughTextError(
            f"{n} calibration windows of {seq_len} tokens from a text of {n_tokens} tokens: "
            f"the text holds only {places} distinct window(s) of that length (one per place the "
            f"draw can start one), so at least {n - places} would repeat another exactly; ask "
            f"for {most} or fewer windows, shorter windows, or give a longer text")
    if cover > REUSE_WARNING:
        log.warning("%d calibration windows of %d tokens cover a text of %d tokens %.0f times "
                    "over: the same tokens are seen again and again; a longer text (or fewer "
                    "samples) calibrates on more of the language", n, seq_len, n_tokens, cover)


def calibration_starts(n_tokens: int, n: int, seq_len: int, seed: int) -> list[int]:
    """Where :func:`calibration_samples` cuts its ``n`` windows from ``n_tokens`` ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n,), generator=gen).tolist()


def eval_windows(ids: torch.Tensor, seq_len: int = 512, n_windows: int | None = 32) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens from the start: (n_windows, seq_len).
    ``n_windows=None`` takes every full window."""
    check_count(seq_len, "seq_len", 2)  # a window predicts its seq_len - 1 last tokens
    if n_windows is not None:
        check_count(n_windows, "n_windows")
    available = ids.numel() // seq_len
    if available == 0:
        raise NotEnoughTextError(
            f"evaluation text has {ids.numel()} tokens, less than one window of {seq_len}; "
            "pass a shorter window length or a longer text")
    if n_windows is not None and n_windows > available:
        raise NotEnoughTextError(
            f"evaluation text has {ids.numel()} tokens: {available} windows of {seq_len}, "
            f"but {n_windows} were asked for; pass fewer windows or a longer text"
        )
    n = available if n_windows is None else n_windows
    return ids[: n * seq_len].reshape(n, seq_len)


def heldout_windows(ids: torch.Tensor, n: int, seq_len: int, used_starts: list[int],
                    used_len: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens spread evenly over ``ids`` (1-D), none sharing a
    token with the windows ``ids[s : s + used_len]`` (the calibration samples): each starts at
    its share's first token and moves forward past any used token. (n, seq_len)."""
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in used_starts:
        used[s : s + used_len] = True
    stride = ids.numel() // max(n, 1)
    out = []
    for k in range(n):
        start = k * stride
        while start + seq_len <= ids.numel() and used[start : start + seq_len].any():
            start += int(used[start : start + seq_len].nonzero()[-1]) + 1
        if start + seq_len > min(ids.numel(), (k + 1) * stride):
            raise NotEnoughTextError(
                f"no window of {seq_len} unused tokens in tokens {k * stride}..{(k + 1) * stride} "
                f"of {ids.numel()}; ask for fewer or shorter windows"
            )
        out.append(ids[start : start + seq_len])
    return torch.stack(out)
