"""Tiny elastic models shared by the search tests."""

import torch

import quept
from tests.conftest import tiny_model

SPEC = quept.ElasticSpec(default_group_size=16)


def elastic_tiny(seed: int = 0, layers: int = 1):
    """A tiny prepared decoder whose adapters are non-zero (as after calibration)."""
    model = tiny_model(seed=seed, num_hidden_layers=layers)
    quept.prepare(model, SPEC, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in quept.nn.elastic_layers(model).values():
            m.lora_u.copy_(0.01 * torch.randn(m.lora_u.shape, generator=gen))
    return model


def token_ids(n: int = 4, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))
