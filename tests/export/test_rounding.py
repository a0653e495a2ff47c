"""What both ways of choosing codes on the learned grid share (GPTQ, quept.export.gptq, and
learned offsets, quept.export.learned): the installed codes drive the forward and the packed
export of their width, other widths still round to nearest, clear_rounding restores nearest, a
plan is rounded layer by layer, a swin's stage exits are crossed, and bad requests are refused
by name. What is particular to each lives in test_gptq.py and test_learned.py."""

from __future__ import annotations

import json

import pytest
import torch

import quept
from quept.config import CalibConfig, ConfigError, weight_act_spec
from quept.export.gptq import GPTQConfig, clear_rounding
from quept.export.learned import LearnedRoundingConfig
from quept.export.load import load_packed
from quept.export.packed import write_packed
from quept.nn import elastic_layers
from quept.ops import dequantize
from tests.test_swin_deit import images
from tests.test_swin_deit import tiny as tiny_classifier

from .tiny import SPEC, elastic_tiny

IDS = torch.randint(2, 250, (8, 32), generator=torch.Generator().manual_seed(0))


def gptq(model, widths, inputs, **kw):
    return quept.round_gptq(model, widths, inputs, GPTQConfig(act_order=False), **kw)


def learned(model, widths, inputs, **kw):
    return quept.round_learned(model, widths, inputs,
                               LearnedRoundingConfig(iters=60, check_every=20), **kw)


ROUNDINGS = pytest.mark.parametrize("name, rounding", [("gptq", gptq), ("learned", learned)])


@ROUNDINGS
def test_the_codes_drive_the_forward_and_the_packed_export(name, rounding, tmp_path):
    model = elastic_tiny()
    quept.set_bits(model, 2)
    before_w2 = model(IDS[:2]).logits
    quept.set_bits(model, 3)
    nearest = model(IDS[:2]).logits
    info = rounding(model, 3, IDS, progress=False)
    layers = elastic_layers(model)
    assert info["layers"] == len(layers)
    assert all(set(m.rounded) == {3} and m.bits == 3 for m in layers.values())
    assert model.quept_rounding == name
    rounded = model(IDS[:2]).logits
    assert not torch.allclose(rounded, nearest)
    for m in layers.values():  # the forward runs the installed codes
        torch.testing.assert_close(m.current_weight(), dequantize(*m.rounded[3], 32))
    meta = quept.api.export(model, 3, tmp_path / "w3", scale_dtype="float32")
    assert meta["source"]["rounding"] == name
    torch.testing.assert_close(load_packed(tmp_path / "w3")(IDS[:2]).logits, rounded, rtol=0,
                               atol=2e-5)
    quept.set_bits(model, 2)  # another width still rounds to nearest
    torch.testing.assert_close(model(IDS[:2]).logits, before_w2, rtol=0, atol=0)
    clear_rounding(quept.set_bits(model, 3))
    assert not hasattr(model, "quept_rounding")
    torch.testing.assert_close(model(IDS[:2]).logits, nearest, rtol=0, atol=0)
    write_packed(model, 3, tmp_path / "n3", None, provenance={"base_model": "tiny"})
    assert "rounding" not in json.loads((tmp_path / "n3" / "quept-packed.json").read_text())[
        "source"]


@ROUNDINGS
def test_a_plan_is_rounded_layer_by_layer(name, rounding):
    model = elastic_tiny()
    names = list(elastic_layers(model))
    plan = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    info = rounding(model, plan, IDS, progress=False)
    assert info["layers"] == len(names)
    for n, m in elastic_layers(model).items():
        assert set(m.rounded) == {plan[n]} and m.bits == plan[n]


@ROUNDINGS
def test_the_stage_exits_of_a_swin_are_crossed(name, rounding):
    model = quept.prepare(tiny_classifier("swin"), SPEC)
    x = images(4)
    quept.set_bits(model, 3)
    with torch.no_grad():
        nearest = model(pixel_values=x).logits
    info = rounding(model, 3, x, progress=False)
    assert info["layers"] == len(elastic_layers(model))
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=x).logits).all()
        assert not torch.allclose(model(pixel_values=x).logits, nearest)


@ROUNDINGS
def test_bad_requests_are_refused_by_name(name, rounding):
    model = elastic_tiny()
    with pytest.raises(ConfigError, match="not float"):
        rounding(model, None, IDS)
    with pytest.raises(ConfigError, match="9"):
        rounding(model, 9, IDS)
    with pytest.raises(ConfigError, match="plan does not match"):
        rounding(model, {"model.layers.0.mlp.up_proj": 3}, IDS)
    rounding(model, 3, IDS[:2], progress=False)
    with pytest.raises(ConfigError, match="clear_rounding"):
        quept.calibrate(model, IDS[:2], CalibConfig(n_samples=2, seq_len=32, batch_size=2),
                        progress=False)
    wa = elastic_tiny(weight_act_spec(SPEC))
    with pytest.raises(ConfigError, match="weight-only"):
        rounding(wa, 4, IDS)
