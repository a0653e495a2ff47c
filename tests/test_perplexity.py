"""Perplexity and the per-window NLLs it is made of."""

import math

import pytest
import torch
import torch.nn.functional as F

from quept.eval import perplexity, window_nll
from tests.conftest import tiny_model


def test_window_nll_is_per_window_and_averages_to_the_perplexity():
    model = tiny_model()
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    nll = window_nll(model, windows, batch_size=2)
    assert nll.shape == (5,) and nll.dtype == torch.float64
    with torch.no_grad():  # the definition, over every predicted token at once
        logits = model(windows, use_cache=False).logits[:, :-1]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows) == pytest.approx(math.exp(total.item()), rel=1e-5)
    assert math.exp(nll.mean().item()) == pytest.approx(math.exp(total.item()), rel=1e-5)
    # each value is that window's own mean NLL, whatever the batch it ran in
    alone = window_nll(model, windows[3:4], batch_size=1)
    assert alone.item() == pytest.approx(nll[3].item(), rel=1e-5)
    assert len(set(nll.tolist())) == 5
