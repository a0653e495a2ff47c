"""Perplexity and the per-window NLLs it is made of."""

import math

import pytest
import torch
import torch.nn.functional as F

from quept.config import ConfigError
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


def test_logits_that_are_not_finite_stop_with_the_window_named():
    model = tiny_model()
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    token = int(windows[3, 0])  # a token id only the fourth window holds
    assert all(token not in w for w in windows[:3])

    def nan_at_token(module, args, out):  # as if that token's embedding were NaN
        return out.masked_fill((args[0] == token)[..., None], float("nan"))

    model.get_input_embeddings().register_forward_hook(nan_at_token)
    with pytest.raises(FloatingPointError, match="W3: the next-token loss of window 3 is nan"):
        window_nll(model, windows, batch_size=2, desc="W3")


def test_windows_and_batch_sizes_that_cannot_be_measured_are_refused():
    model = tiny_model()
    good = torch.randint(0, 256, (2, 8))
    for bad in (good.float(), good[0], good[:0], good[:, :1], good.tolist()):
        with pytest.raises(ConfigError, match="W3: the windows must be \\(n, T\\) integer token ids"):
            window_nll(model, bad, desc="W3")
    for size in (0, 1.5, True):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
            window_nll(model, good, batch_size=size)
