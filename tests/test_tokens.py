import pytest
import torch

from quept.data.tokens import NotEnoughTextError, calibration_samples, eval_windows


def test_calibration_samples_are_seeded_windows():
    ids = torch.arange(1000)
    a = calibration_samples(ids, 5, 16, seed=3)
    assert a.shape == (5, 16)
    assert torch.equal(a, calibration_samples(ids, 5, 16, seed=3))
    assert not torch.equal(a, calibration_samples(ids, 5, 16, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 15, dtype=torch.long))  # contiguous


def test_eval_windows_from_start_and_errors():
    ids = torch.arange(100)
    w = eval_windows(ids, 32, 3)
    assert torch.equal(w.reshape(-1), ids[:96])
    assert eval_windows(ids, 32, None).shape == (3, 32)
    with pytest.raises(NotEnoughTextError, match="3 windows of 32"):
        eval_windows(ids, 32, 4)
    with pytest.raises(NotEnoughTextError, match="need more than seq_len"):
        calibration_samples(ids, 2, 100, seed=0)
