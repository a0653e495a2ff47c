"""Mixed precision for image classifiers and encoders: their objectives (class KL, one minus
the embedding's cosine), the fast estimate against the exact protocol, the exact checks and
in-context sweeps, and plans made from them, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quept
from quept.config import ConfigError
from quept.eval import Sentences, fidelity, sentence_embeddings
from quept.nn import elastic_layers
from quept.search import SensitivityConfig, estimate_sensitivity
from quept.search.exact import configuration_kl, exact_sensitivity, unit_swap_kl
from quept.search.objective import ClassKL, EmbeddingDistance, NextTokenKL, objective_for
from quept.search.plan import unit_of
from tests.search.helpers import elastic_tiny, token_ids
from tests.search.test_sensitivity import spearman
from tests.test_encoder import tiny_bert
from tests.test_swin_deit import tiny
from tests.test_vit import tiny_vit

SPEC = quept.ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)
CFG = SensitivityConfig(n_samples=16, batch_size=4, n_probes=16)


def elastic(model, seed: int = 0):
    """``model`` prepared with non-zero adapters (as after calibration)."""
    quept.prepare(model, SPEC, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.lora_u.copy_(0.01 * torch.randn(m.lora_u.shape, generator=gen))
    return model


def pixels(n: int, size: int = 28, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def sentences(n: int = 16, seed: int = 1) -> Sentences:
    """Token ids of varied lengths (padding at the end), as a BERT tokenizer pads."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 32, (n, 20), generator=gen)
    lengths = torch.randint(8, 21, (n,), generator=gen)
    mask = (torch.arange(20) < lengths[:, None]).long()
    return Sentences(ids * mask, mask)


MODELS = {
    "vit": (lambda: elastic(tiny_vit()), lambda: pixels(16)),
    "swin": (lambda: elastic(tiny("swin")), lambda: pixels(16, 32, 3)),
    "bert": (lambda: elastic(tiny_bert()), sentences),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    make_model, make_inputs = MODELS[request.param]
    model, inputs = make_model(), make_inputs()
    fast = estimate_sensitivity(model, inputs, CFG, progress=False)
    exact = exact_sensitivity(model, inputs, progress=False)
    return request.param, model, inputs, fast, exact


def test_objectives_follow_the_family_task():
    assert isinstance(objective_for(elastic(tiny_vit())), ClassKL)
    assert isinstance(objective_for(elastic(tiny("deit"))), ClassKL)
    assert isinstance(objective_for(elastic(tiny_bert())), EmbeddingDistance)
    assert isinstance(objective_for(elastic_tiny()), NextTokenKL)


def test_fast_estimate_agrees_with_the_exact_cost(case):
    kind, model, inputs, fast, exact = case
    names = list(exact)
    a = np.array([fast.kl[n] for n in names])
    b = np.array([exact[n] for n in names])
    assert fast.settings["objective"] == objective_for(model).name
    assert spearman(a.ravel(), b.ravel()) > 0.95, kind
    # the 2-bit cost of each layer near the exact one (second order, 16 x 16 probes)
    err = np.abs(a[:, 0] / b[:, 0] - 1)
    assert err.mean() < 0.2 and err.max() < 0.5, (kind, a[:, 0], b[:, 0])
    assert np.all(np.diff(a.sum(0)) < 0) and np.all(np.diff(b.sum(0)) < 0)


def test_embedding_cost_is_one_minus_the_cosine():
    model = elastic(tiny_bert())
    s = sentences()
    quept.set_bits(model, None)
    ref = sentence_embeddings(model, s)
    quept.set_bits(model, 2)
    cos = fidelity(sentence_embeddings(model, s), ref)["cosine_mean"]
    (cost,) = configuration_kl(model, s, [2])
    assert cost == pytest.approx(1 - cos, rel=1e-4)


def test_class_kl_and_in_context_sweeps_of_a_vit():
    model = elastic(tiny_vit())
    x = pixels(12)
    quept.set_bits(model, None)
    with torch.no_grad():
        ref = model(pixel_values=x).logits.log_softmax(-1)
        quept.set_bits(model, 3)
        lp = model(pixel_values=x).logits.log_softmax(-1)
    direct = F.kl_div(lp, ref, log_target=True, reduction="sum").item() / 12
    (kl,) = configuration_kl(model, x, [3], batch_size=5)
    assert kl == pytest.approx(direct, rel=1e-5)

    layers = list(elastic_layers(model))
    units: dict[str, list[str]] = {}
    for n in layers:
        units.setdefault(unit_of(n, "block"), []).append(n)
    kl_base, deltas = unit_swap_kl(model, x, units, 3, 2, progress=False)
    configs = [3, *({n: 2 if n in names else 3 for n in layers} for names in units.values())]
    measured = configuration_kl(model, x, configs)
    assert kl_base == pytest.approx(measured[0], rel=1e-5)
    assert list(deltas.values()) == pytest.approx([m - measured[0] for m in measured[1:]],
                                                  rel=1e-4, abs=1e-9)


def test_swin_blocks_are_units_of_their_own():
    model = elastic(tiny("swin"))
    blocks = {unit_of(n, "block") for n in elastic_layers(model)}
    assert blocks == {f"swin.encoder.layers.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)}


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_auto_plan_meets_the_budget_and_records_its_objective(kind):
    make_model, make_inputs = MODELS[kind]
    model, inputs = make_model(), make_inputs()
    table = quept.sensitivity(model, inputs, SensitivityConfig(n_samples=16, n_probes=4),
                              progress=False)
    objective = objective_for(model)
    check = objective.take(inputs, 0, 8)
    plan = quept.plan(model, table, avg_bits=3.5, check_ids=check)
    assert plan.objective == objective.name
    assert plan.bits_per_weight <= 3.5 and len(set(plan.widths.values())) > 1
    kls = configuration_kl(model, check, [plan])
    assert min(plan.checked_kl.values()) == pytest.approx(kls[0], rel=1e-6)
    assert quept.search.Plan.from_dict(plan.to_dict()).objective == objective.name


def test_inputs_of_another_task_are_refused():
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\) pixel values"):
        estimate_sensitivity(elastic(tiny_vit()), token_ids(), progress=False)
    with pytest.raises(ConfigError, match="Sentences"):
        configuration_kl(elastic(tiny_bert()), token_ids(), [3])
    with pytest.raises(ConfigError, match=r"\(N, T\) integer token ids"):
        estimate_sensitivity(elastic_tiny(), pixels(2), progress=False)
