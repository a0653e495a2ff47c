import pytest
import torch

from quept.config import ConfigError
from quept.data.tokens import (
    NotEnoughTextError,
    calibration_samples,
    calibration_starts,
    eval_windows,
    heldout_windows,
)


def test_calibration_samples_are_seeded_windows():
    ids = torch.arange(1000)
    a = calibration_samples(ids, 5, 16, seed=3)
    assert a.shape == (5, 16)
    assert torch.equal(a, calibration_samples(ids, 5, 16, seed=3))
    assert not torch.equal(a, calibration_samples(ids, 5, 16, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 15, dtype=torch.long))  # contiguous


def test_windows_that_cover_a_short_text_many_times_over_are_warned_of(caplog):
    ids = torch.arange(1000)
    with caplog.at_level("WARNING", logger="quept.data.tokens"):
        calibration_samples(ids, 250, 16, seed=0)  # 4 times over: no warning
        assert not caplog.records
        calibration_samples(ids, 320, 16, seed=0)
    assert "320 calibration windows of 16 tokens cover a text of 1000 tokens 5 times" in (
        caplog.text)


def test_eval_windows_from_start_and_errors():
    ids = torch.arange(100)
    w = eval_windows(ids, 32, 3)
    assert torch.equal(w.reshape(-1), ids[:96])
    assert eval_windows(ids, 32, None).shape == (3, 32)
    with pytest.raises(NotEnoughTextError, match="3 windows of 32"):
        eval_windows(ids, 32, 4)
    with pytest.raises(NotEnoughTextError, match="need more than seq_len"):
        calibration_samples(ids, 2, 100, seed=0)
    for seq_len in (0, 1, 2.5):
        with pytest.raises(ConfigError, match="seq_len must be an integer >= 2"):
            eval_windows(ids, seq_len, 1)
    for n in (0, -1, 1.0):
        with pytest.raises(ConfigError, match="n_windows must be a positive integer"):
            eval_windows(ids, 32, n)


def test_heldout_windows_avoid_the_calibration_samples():
    ids = torch.arange(4000)
    starts = calibration_starts(ids.numel(), 12, 64, seed=0)
    samples = calibration_samples(ids, 12, 64, seed=0)
    assert [int(w[0]) for w in samples] == starts
    win = heldout_windows(ids, 8, 100, starts, 64)
    assert win.shape == (8, 100)
    seen = set(samples.flatten().tolist())
    assert not seen & set(win.flatten().tolist())
    assert len(set(win.flatten().tolist())) == win.numel()  # no two windows overlap
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 100)) for w in win)
    with pytest.raises(NotEnoughTextError, match="unused tokens"):
        heldout_windows(ids, 8, 100, list(range(0, 4000, 50)), 64)
