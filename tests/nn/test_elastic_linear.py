from dataclasses import replace

import pytest
import torch
from torch import nn

from quept.config import ConfigError, ElasticSpec
from quept.nn import ElasticLinear, elastic_layers, set_bits
from quept.ops import rtn

SPEC = ElasticSpec(ranks=(2, 3, 4, 5), default_group_size=16)


def make(seed: int = 0) -> ElasticLinear:
    torch.manual_seed(seed)
    layer = ElasticLinear(nn.Linear(32, 24), SPEC, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_u.normal_()
    return layer


def test_nested_adapter_prefixes():
    m = make()
    assert m.rank_prefix == (2, 5, 9, 14)
    u, v = m.lora_u, m.lora_v
    for b, r in [(8, 2), (7, 2), (6, 5), (5, 5), (4, 9), (3, 9), (2, 14)]:
        assert torch.allclose(m.delta(b), u[:, :r] @ v[:r])
    # Each lower group = the group above + its own ranks.
    assert torch.allclose(m.delta(4) - m.delta(6), u[:, 5:9] @ v[5:9], atol=1e-5)


def test_adapter_starts_at_zero_and_float_pass_ignores_it():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    m = ElasticLinear(lin, SPEC)
    assert torch.count_nonzero(m.delta(2)) == 0
    with torch.no_grad():
        m.lora_u.normal_()
    x = torch.randn(3, 32)
    assert torch.equal(m(x), lin(x))  # bits=None: the float reference, no adapter


def test_rtn_mode_is_plain_round_to_nearest():
    m = make()
    m.set_bits(3, rtn=True)
    assert torch.equal(m.current_weight(), rtn(m.weight, 3, 16))


def test_bits_switch_changes_output_and_cache_tracks_updates():
    m = make()
    x = torch.randn(5, 32)
    with torch.no_grad():
        outs = {}
        for b in (8, 4, 2):
            m.set_bits(b)
            outs[b] = m(x)
        assert not torch.equal(outs[8], outs[2])
        m.set_bits(4)
        assert torch.equal(m(x), outs[4])  # cached weight reused
        m.clip_hi["4"].sub_(1.0)  # an optimizer-style in-place update invalidates the cache
        assert not torch.equal(m(x), outs[4])


def _fresh(m: ElasticLinear, x: torch.Tensor) -> torch.Tensor:
    """The output at the current width with nothing cached."""
    m.clear_cache()
    return m(x)


@pytest.mark.parametrize("change", ["weight edited in place", "cast to bfloat16",
                                    "weight replaced", "state loaded with assign"])
def test_cache_follows_every_change_of_what_it_was_made_from(change):
    # before: the cache keyed on the adapters' and clips' versions only, so each of these kept
    # serving the old quantized weight (float32 after a cast, the old weight after a load)
    m, other = make(0), make(1)
    x = torch.randn(5, 32)
    with torch.no_grad():
        m.set_bits(4)
        before = m(x)
        if change == "weight edited in place":
            m.weight.mul_(0.5)
        elif change == "cast to bfloat16":
            m.to(torch.bfloat16)
            x = x.to(torch.bfloat16)
        elif change == "weight replaced":
            m.weight = nn.Parameter(other.weight.clone(), requires_grad=False)
        else:
            m.load_state_dict(other.state_dict(), assign=True)
        after = m(x)
        assert after.dtype == x.dtype
        assert torch.equal(after, _fresh(m, x))
        assert not torch.equal(after.float(), before)
        m.set_bits(3)
        m(x)
        m.set_bits(4)
        assert torch.equal(m(x), after)  # switching away and back changes nothing


def test_gradients_reach_adapters_and_only_the_active_clips():
    m = make()
    for p in [m.lora_u, m.lora_v, *m.clip_hi.values(), *m.clip_lo.values()]:
        p.requires_grad_(True)
    m.set_bits(3)
    m(torch.randn(4, 32)).pow(2).sum().backward()
    assert m.lora_u.grad.abs().sum() > 0 and m.lora_v.grad.abs().sum() > 0
    assert m.clip_hi["3"].grad.abs().sum() > 0
    assert m.clip_hi["8"].grad is None


def test_set_bits_whole_model_and_plan(tiny_llama):
    from quept import prepare

    prepare(tiny_llama, SPEC)
    layers = elastic_layers(tiny_llama)
    assert len(layers) == 2 * 7
    set_bits(tiny_llama, 5)
    assert {m.bits for m in layers.values()} == {5}
    plan = {n: (2 if i % 2 else 8) for i, n in enumerate(layers)}
    set_bits(tiny_llama, plan)
    assert [m.bits for m in layers.values()] == list(plan.values())
    with pytest.raises(ConfigError, match="names none of the model's 14 layers: it was made "
                       "for another model"):
        set_bits(tiny_llama, {"nope": 4})
    with pytest.raises(ConfigError, match="plan does not match"):  # some layers, not all
        set_bits(tiny_llama, {next(iter(layers)): 4, "nope": 4})
    with pytest.raises(ConfigError, match="outside 2..8"):
        set_bits(tiny_llama, 9)
    with pytest.raises(ConfigError, match="not in this elastic model"):
        prepare_spec = ElasticSpec(
            bit_groups=((8,), (4,)), ranks=(1, 1), merge_weights=(0.5, 0.5), default_group_size=16
        )
        m = ElasticLinear(nn.Linear(16, 16), prepare_spec)
        m.set_bits(3)


def test_unclipped_widths_use_full_range_and_have_no_learnable_clips():
    spec = ElasticSpec(ranks=(2, 3, 4, 5), default_group_size=16, unclipped_bits=(7, 8))
    torch.manual_seed(0)
    m = ElasticLinear(nn.Linear(32, 24), spec)
    # Adapter still zero: an unclipped width is exactly round-to-nearest over min..max.
    for b in (7, 8):
        assert torch.equal(m.quantized_weight(b), rtn(m.weight, b, 16))
    assert not torch.equal(m.quantized_weight(6), rtn(m.weight, 6, 16))  # clip_init 0.98
    _, clips = m.trainable_parameters()
    learnable = {id(p) for p in clips}
    assert all(id(m.clip_hi[str(b)]) not in learnable for b in (7, 8))
    assert id(m.clip_hi["6"]) in learnable and len(clips) == 2 * 5
    assert spec.search_bits == (6, 5, 4, 3, 2)


def test_spec_rejects_unclipped_bits_outside_the_groups():
    with pytest.raises(ConfigError, match="unclipped_bits names bit 1"):
        ElasticSpec(unclipped_bits=(1,))


def test_clip_search_grid_and_fixed_widths():
    from quept.nn.elastic_linear import CLIP_GRID, HIGH_BITS_FLOOR, NO_CLIP_LOGIT, clip_grid
    from quept.ops import search_clip

    assert clip_grid(4) == CLIP_GRID
    assert clip_grid(6) == tuple(1 - k / 63 for k in range(7))
    g8 = clip_grid(8)
    assert g8[0] == 1.0 and min(g8) >= HIGH_BITS_FLOOR and len(g8) == 26
    assert all(abs((a - b) * 255 - 1) < 1e-9 for a, b in zip(g8, g8[1:]))
    spec = ElasticSpec(ranks=(2, 3, 4, 5), default_group_size=16)  # 7, 8 fixed by default
    torch.manual_seed(0)
    m = ElasticLinear(nn.Linear(64, 24), spec)
    col = torch.rand(64) + 0.1
    for b in (8, 6):
        m.init_clip_by_search(b, col)
        factors = search_clip(m.weight, b, 16, torch.tensor(clip_grid(b)), col, refine=1)
        for logits, alpha in zip((m.clip_hi, m.clip_lo), factors):
            got = torch.sigmoid(logits[str(b)])
            if b == 8:  # fixed: the searched factors, "no clip" exactly
                assert (alpha == 1).any()
                assert (logits["8"][alpha == 1] == NO_CLIP_LOGIT).all()
                assert torch.allclose(got, alpha)
            else:  # learned: kept below 1 so the clip still has a gradient
                assert torch.allclose(got, alpha.clamp(max=CLIP_GRID[0]))
                assert (got < 1).all()
    _, clips = m.trainable_parameters()
    assert {id(p) for p in clips}.isdisjoint({id(m.clip_hi["8"]), id(m.clip_lo["7"])})


def test_clip_search_at_low_widths_sets_max_and_min_factors_apart():
    from quept.nn.elastic_linear import clip_grid
    from quept.ops import search_clip

    spec = ElasticSpec(ranks=(2, 3, 4, 5), default_group_size=16)  # clip_refine 1 by default
    torch.manual_seed(1)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight[:, ::16] += 0.5  # one-sided outliers: max and min want different clips
    m = ElasticLinear(lin, spec)
    col = torch.rand(64) + 0.1
    m.init_clip_by_search(3, col)
    hi, lo = search_clip(m.weight, 3, 16, torch.tensor(clip_grid(3)), col, refine=1)
    assert torch.allclose(torch.sigmoid(m.clip_hi["3"]), hi.clamp(max=0.999))
    assert torch.allclose(torch.sigmoid(m.clip_lo["3"]), lo.clamp(max=0.999))
    assert not torch.equal(m.clip_hi["3"], m.clip_lo["3"])
    tied = ElasticLinear(lin, replace(spec, clip_refine=0))
    tied.init_clip_by_search(3, col)
    assert torch.equal(tied.clip_hi["3"], tied.clip_lo["3"])
