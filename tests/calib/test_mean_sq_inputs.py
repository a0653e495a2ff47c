"""The per-channel input statistics behind the activation-aware clip search."""

import torch
from torch import nn

from quept.calib.capture import mean_sq_inputs


def test_means_over_every_token_and_hooks_removed():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    x1, x2 = torch.randn(2, 5, 3), torch.randn(1, 7, 3)
    with mean_sq_inputs({"a": a, "b": b}) as sq:
        h1, h2 = a(x1), a(x2)
        b(h1)
        b(h2)
    xs = torch.cat([x1.reshape(-1, 3), x2.reshape(-1, 3)])
    hs = torch.cat([h1.reshape(-1, 4), h2.reshape(-1, 4)]).detach()
    torch.testing.assert_close(sq["a"], xs.pow(2).mean(0))
    torch.testing.assert_close(sq["b"], hs.pow(2).mean(0))
    assert not a._forward_hooks and not b._forward_hooks


def test_amax_holds_the_largest_absolute_input_per_channel():
    torch.manual_seed(0)
    a = nn.Linear(3, 4)
    x1, x2 = torch.randn(2, 5, 3), torch.randn(1, 7, 3)
    x2[0, 3, 1] = -50.0
    amax: dict = {}
    with mean_sq_inputs({"a": a}, amax):
        a(x1)
        a(x2)
    xs = torch.cat([x1.reshape(-1, 3), x2.reshape(-1, 3)])
    torch.testing.assert_close(amax["a"], xs.abs().amax(0))
    assert amax["a"][1] == 50.0
