"""Weight+activation mode (W4A4..W8A8): the per-token activation quantizer, the spec, the
elastic and packed layers, calibration, save/load, export and the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import quept
from quept.cli import main
from quept.config import CalibConfig, ConfigError, ElasticSpec, QuEPTConfig, weight_act_spec
from quept.nn import elastic_layers
from quept.ops import fake_quant_act
from tests.conftest import tiny_model
from tests.export.tiny import char_tokenizer, hf_folder, randomize

SPEC = weight_act_spec(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32))


def test_per_token_quantizer_uses_one_symmetric_grid_per_token():
    x = torch.randn(3, 5, 64) * torch.tensor([1.0, 10.0, 100.0])[:, None, None]
    q = fake_quant_act(x, 4)
    for t in q.reshape(-1, 64):  # each token: integers -7..7 times its own step
        step = t.abs().max() / 7
        assert torch.allclose(t / step, (t / step).round(), atol=1e-4)
        assert (t / step).round().unique().numel() <= 15
    torch.testing.assert_close(q.abs().amax(-1), x.abs().amax(-1))  # the largest value is kept
    err = (q - x).abs().amax(-1) / x.abs().amax(-1)
    assert err.max() <= 0.5 / 7 + 1e-6  # at most half a step
    assert (fake_quant_act(x, 8) - x).abs().amax() < (q - x).abs().amax()
    x.requires_grad_(True)
    fake_quant_act(x, 4).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_spec_refuses_low_widths_with_activations_and_round_trips():
    with pytest.raises(ConfigError, match=r"W4A4..W8A8; widths \[2, 3\] are below 4"):
        ElasticSpec(activations="per-token")
    with pytest.raises(ConfigError, match="activations must be one of"):
        ElasticSpec(activations="per-channel")
    assert SPEC.bit_groups == ((7, 8), (5, 6), (4,)) and SPEC.merge_weights == (0.3, 0.3, 0.4)
    assert SPEC.default_group_size == 32 and SPEC.activations == "per-token"
    assert ElasticSpec.from_dict(SPEC.to_dict()) == SPEC
    assert "activations" not in ElasticSpec().to_dict()  # weight-only folders read as before
    assert weight_act_spec(SPEC) == SPEC


def test_elastic_layer_quantizes_its_input_at_its_width_rtn_included():
    model = randomize(quept.prepare(tiny_model(), SPEC))
    layer = elastic_layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 7, layer.in_features)
    for rtn in (False, True):
        layer.set_bits(4, rtn=rtn)
        want = torch.nn.functional.linear(fake_quant_act(x, 4), layer.current_weight())
        torch.testing.assert_close(layer(x), want)
    layer.set_bits(None)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_calibration_save_load_and_packed_export(tmp_path):
    model, _ = quept.load_model(hf_folder(tmp_path / "base"))
    quept.prepare(model, SPEC)
    ids = torch.randint(2, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    reports = quept.calibrate(model, ids, CalibConfig(n_samples=8, seq_len=32, batch_size=4,
                                                      epochs=2), progress=False)
    low = reports[0].bits.index(4)
    assert all(r.loss_after[low] < r.loss_before[low] for r in reports)
    rows = {r.bits: r for r in quept.evaluate(model, ids[:4], [None, 4, 8], rtn=True,
                                              progress=False)}
    assert abs(rows[8].ppl - rows[None].ppl) < abs(rows[4].ppl - rows[None].ppl)
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")
    assert loaded.quept_spec.activations == "per-token"
    quept.set_bits(model, 4)
    quept.set_bits(loaded, 4)
    want = model(ids[:2]).logits
    assert torch.equal(loaded(ids[:2]).logits, want)
    # float32 scales: the packed weights are the elastic ones up to the last bit of some (the
    # kernel's q * s - z * s), so a rare activation code may flip (docs/weight-activation.md)
    meta = quept.api.export(loaded, 4, tmp_path / "w4a4", tokenizer=char_tokenizer(),
                            scale_dtype="float32")
    assert {i["act_bits"] for i in meta["layers"].values()} == {4}
    packed, _ = quept.api.load_packed(tmp_path / "w4a4")
    torch.testing.assert_close(packed(ids[:2]).logits, want, atol=2e-3, rtol=1e-3)
    exact, _ = quept.api.load_packed(tmp_path / "w4a4", backend="dequant")
    assert torch.equal(exact(ids[:2]).logits, want)  # (q - z) * s in float32: the elastic model
    # the activation quantizers are part of the packed model: without them the logits move
    layers = [m for m in packed.modules() if getattr(m, "act_bits", None)]
    assert len(layers) == len(elastic_layers(model))
    for m in layers:
        m.act_bits = None
    assert (packed(ids[:2]).logits - want).abs().max() > 1e-2


def test_gguf_refuses_and_unknown_packed_quantizers_fail(tmp_path):
    pytest.importorskip("gguf")
    from quept.export.gguf import GGUFExportError
    from quept.export.packed import PACKED_JSON, PackedFormatError

    model = randomize(quept.prepare(tiny_model(), SPEC))
    with pytest.raises(GGUFExportError, match="weight-only: .*per-token activation"):
        quept.api.export(model, 4, tmp_path / "m.gguf", "gguf", tokenizer=char_tokenizer())
    quept.api.export(model, 8, tmp_path / "w8", tokenizer=char_tokenizer())
    meta = json.loads((tmp_path / "w8" / PACKED_JSON).read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["act_quant"] = "per-channel"
    (tmp_path / "w8" / PACKED_JSON).write_text(json.dumps(meta))
    with pytest.raises(PackedFormatError, match="activation quantizer 'per-channel' is unknown"):
        quept.api.load_packed(tmp_path / "w8")


def test_cli_quantize_and_eval_in_weight_activation_mode(tmp_path, capsys):
    base = hf_folder(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 60)
    out = tmp_path / "el"
    assert main(["quantize", "--model", str(base), "--out", str(out), "--calib-text", str(text),
                 "--eval-text", str(text), "--samples", "4", "--seq-len", "32",
                 "--group-size", "32", "--activations", "per-token", "--eval-windows", "2",
                 "--eval-bits", "4,8"]) == 0
    shown = capsys.readouterr().out
    assert "W4A4" in shown and "W8A8" in shown
    spec = quept.api.read_meta(out)["config"]["spec"]
    assert spec["activations"] == "per-token" and spec["bit_groups"] == [[7, 8], [5, 6], [4]]
    assert spec["rotation"] == "hadamard"  # the default for a LLaMA-family decoder
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "plain"),
                 "--calib-text", str(text), "--samples", "4", "--seq-len", "32",
                 "--group-size", "32", "--activations", "per-token", "--rotation", "none",
                 "--eval-windows", "0"]) == 0
    assert "rotation" not in quept.api.read_meta(tmp_path / "plain")["config"]["spec"]
    assert main(["eval", str(out), "--text", str(text), "--windows", "2", "--seq-len", "64",
                 "--bits", "2"]) == 2
    assert "bit-width 2 is not in this elastic model's widths" in capsys.readouterr().err
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "x"),
                 "--calib-text", str(text), "--activations", "per-token",
                 "--bit-groups", "8/4,3"]) == 2
    assert "W4A4..W8A8; widths [3] are below 4" in capsys.readouterr().err


def test_weight_act_spec_keeps_only_the_high_widths_of_a_preset():
    from quept.config import PRESET_SPECS

    wa = weight_act_spec(PRESET_SPECS["cpu-long"])
    assert min(wa.bits) == 4 and wa.activations == "per-token"
    assert all(b >= 4 for b, _ in wa.group_size)
    assert replace(wa, activations="none").bits == (8, 7, 6, 5, 4)
