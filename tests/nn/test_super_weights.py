"""Super-weight protection (ElasticSpec.protect_outliers): finding the weights that make a
massive activation and holding their groups' clips at 1 on their side."""

import pytest
import torch
from torch import nn

from quept.config import ConfigError, ElasticSpec
from quept.nn import ElasticLinear
from quept.nn.elastic_linear import NO_CLIP_LOGIT

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=16, protect_outliers=100.0)


def layer_with_super_weights() -> tuple[ElasticLinear, torch.Tensor]:
    """A 24 x 64 layer whose input channel 37 is massive (1000) and feeds only row 5 (+4.0);
    channel 50 (300) feeds only row 11 (-3.0). Every other input is at most 1."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.uniform_(-0.1, 0.1)
        lin.weight[:, 37] = 0.0
        lin.weight[:, 50] = 0.0
        lin.weight[5, 37] = 4.0
        lin.weight[11, 50] = -3.0
    amax = torch.ones(64)
    amax[37], amax[50] = 1000.0, 300.0
    return ElasticLinear(lin, SPEC, generator=torch.Generator().manual_seed(0)), amax


def test_finds_the_weights_that_make_massive_activations():
    m, amax = layer_with_super_weights()
    assert sorted(m.find_super_weights(amax, 100.0)) == [(5, 37), (11, 50)]
    # The median row's largest contribution is ~0.1 (x 1): 4 * 1000 is ~40000 times that,
    # 3 * 300 ~9000 times.
    assert m.find_super_weights(amax, 20000.0) == [(5, 37)]
    assert m.find_super_weights(torch.ones(64), 100.0) == []  # no massive input: nothing


def test_holds_the_clip_of_the_weight_side_at_every_clipped_width():
    m, amax = layer_with_super_weights()
    m.protected = m.find_super_weights(amax, 100.0)
    with torch.no_grad():
        for d in (m.clip_hi, m.clip_lo):
            for p in d.values():
                p.fill_(0.0)  # factor 0.5 everywhere
    m.hold_protected_clips()
    for b in SPEC.bits:
        hi, lo = m.clip_hi[str(b)], m.clip_lo[str(b)]
        # Row 5's weight is positive: the max side of its group (37 // 16 = 2) is unclipped.
        assert hi[5, 2] == NO_CLIP_LOGIT and lo[5, 2] == 0.0
        # Row 11's is negative: the min side of group 50 // 16 = 3.
        assert lo[11, 3] == NO_CLIP_LOGIT and hi[11, 3] == 0.0
        assert (hi != 0).sum() == 1 and (lo != 0).sum() == 1, b
        # So the quantized super weight is its group's top (bottom) level: within half a step
        # (the integer zero point) of its value, not cut to the clipped range (no adapter here).
        with torch.no_grad():
            m.lora_u.zero_()
            q = m.quantized_weight(b)
            w = m.weight
            ends = {(5, 37): w[5, 32:48].min() * 0.5, (11, 50): w[11, 48:64].max() * 0.5}
            for (r, j), far in ends.items():
                half_step = (w[r, j] - far).abs() / (2**b - 1) / 2
                assert (q[r, j] - w[r, j]).abs() <= half_step + 1e-5, (b, r, q[r, j])


def test_a_2_bit_clip_left_free_cuts_the_super_weight():
    # Why it is needed: at factor 0.5 the 2-bit top level of row 5's group is 2, not 4.
    m, _ = layer_with_super_weights()
    with torch.no_grad():
        m.lora_u.zero_()
        m.clip_hi["2"].fill_(0.0)
        assert m.quantized_weight(2)[5, 37] < 2.5


@pytest.mark.parametrize("bad", [0.5, 1.0, -3.0])
def test_ratio_must_be_off_or_above_one(bad):
    with pytest.raises(ConfigError, match="protect_outliers"):
        ElasticSpec(protect_outliers=bad)


def test_written_only_when_set():
    assert "protect_outliers" not in ElasticSpec().to_dict()
    d = SPEC.to_dict()
    assert d["protect_outliers"] == 100.0
    assert ElasticSpec.from_dict(d) == SPEC
