"""Static per-tensor activation quantizers for vision transformers (ElasticSpec.activations
"per-tensor"): the quantizer and its percentile search, the RepQ-ViT-style reparameterisation,
calibration, resume, save/load, compact and packed folders, on a tiny random ViT."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import quept
from quept.config import CalibConfig, ElasticSpec, QuEPTConfig, weight_act_spec
from quept.models import family_for, reparam
from quept.nn import elastic_layers
from quept.nn.state import elastic_state_dict
from quept.ops import fake_quant_static, search_act_range
from tests.test_vit import tiny_vit

SPEC = replace(weight_act_spec(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)),
               activations="per-tensor")
CFG = CalibConfig(n_samples=16, seq_len=1, batch_size=4, epochs=2)


def test_static_quantizer_uses_one_grid_and_the_search_clips_heavy_tails():
    x = torch.randn(1000)
    q = fake_quant_static(x, torch.tensor(0.1), 8.0, 4)
    assert q.unique().numel() <= 16
    torch.testing.assert_close(q.min(), torch.tensor(-0.8))
    assert q.max() <= 0.7 + 1e-6  # codes 0..15 around zero-point 8: -0.8..0.7
    step = torch.tensor(0.1, requires_grad=True)
    fake_quant_static(x, step, 8.0, 4).sum().backward()
    assert step.grad is not None and step.grad != 0
    uniform = torch.linspace(-1, 3, 10001)
    (s, z), = search_act_range(uniform, [4]).values()
    assert 0.97 * 4 / 15 < s <= 4 / 15 and z == 4.0  # no tail: at most a sliver clipped
    tailed = torch.cat([torch.randn(100000), torch.tensor([200.0])])
    (s, _), = search_act_range(tailed, [4]).values()
    assert s < 20 / 15  # one outlier of 200 does not set the range at 4 bits
    big = torch.randn(5000, 4000)  # beyond torch.quantile's 2^24 elements: read evenly spaced
    assert search_act_range(big, [4])[4][0] == pytest.approx(search_act_range(big[:1000], [4])[4][0],
                                                              rel=0.05)
    both = search_act_range(tailed, [4, 8])  # each width its own range: 8 bits keeps the outlier
    assert both[4][0] == s and both[8][0] == pytest.approx(200 / 255, rel=0.05)


def test_reparameterisation_keeps_the_function_and_equalises_the_channels():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.1, 1, 5, 2, 0.5, 3, 1, 8]))
        norm.bias.copy_(torch.tensor([0.0, 3, -2, 1, 0, 5, -1, 0.5]))
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(64, 8)
    want = lin(norm(x))
    layer = quept.nn.ElasticLinear(lin, replace(SPEC, default_group_size=0))
    y = norm(x)
    scale, shift = reparam.channel_transform(y.amin(0), y.amax(0))
    reparam.fold(norm, [layer], scale, shift)
    y2 = norm(x)
    width = y2.amax(0) - y2.amin(0)
    torch.testing.assert_close(width, width.mean().expand(8), rtol=1e-4, atol=1e-5)
    rel_zero = -y2.amin(0) / width  # zero sits at one relative place in every channel's range
    torch.testing.assert_close(rel_zero, rel_zero.mean().expand(8), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(y2), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already folded"):
        layer.fold_input_reparam(scale, shift)


def calibrated(checkpoint_dir=None):
    model = quept.prepare(tiny_vit(), SPEC)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reports = quept.calibrate(model, x, CFG, checkpoint_dir=checkpoint_dir, progress=False)
    return model, x, reports


def test_calibration_folds_the_norms_sets_the_quantizers_and_keeps_float_logits():
    ref = tiny_vit()
    model = quept.prepare(tiny_vit(), SPEC)
    layer = elastic_layers(model)["vit.layers.0.mlp.fc1"]
    with pytest.raises(RuntimeError, match="no range yet: calibrate"):
        quept.set_bits(model, 4)
        model(pixel_values=torch.randn(2, 1, 28, 28))
    model, x, reports = calibrated()
    quept.set_bits(model, None)
    torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits,
                               rtol=1e-4, atol=1e-4)
    layers = elastic_layers(model)
    assert all(m.reparam_folded for n, m in layers.items()
               if n.endswith(("q_proj", "k_proj", "v_proj", "fc1")))
    assert not any(m.reparam_folded for n, m in layers.items() if n.endswith(("o_proj", "fc2")))
    layer = layers["vit.layers.0.mlp.fc1"]
    assert not torch.isnan(layer.act_searched).any()
    # training moved the learned steps of the trained widths off their searched start
    moved = [b for b in (4, 5, 6) if layer.static_act_params(b)[0] != layer.static_act_params(
        b, rtn=True)[0]]
    assert moved
    err = {}
    for b in (4, 8):
        quept.set_bits(model, b)
        err[b] = (model(pixel_values=x).logits - ref(pixel_values=x).logits).abs().mean()
    assert err[8] < err[4]
    # the input quantizer is really in the forward: off, the logits change
    quept.set_bits(model, 4)
    a = model(pixel_values=x).logits
    model.quept_spec = replace(SPEC, activations="none")
    for m in layers.values():
        m.spec = model.quept_spec
    assert (model(pixel_values=x).logits - a).abs().max() > 1e-4


def test_resume_refolds_the_finished_blocks(tmp_path, monkeypatch):
    ref, x, _ = calibrated()
    from quept.calib import loop

    real = loop.BlockCalibrator._train

    def dies_in_second_block(self, i, *a, **k):
        if i == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i, *a, **k)

    monkeypatch.setattr(loop.BlockCalibrator, "_train", dies_in_second_block)
    with pytest.raises(KeyboardInterrupt):
        calibrated(checkpoint_dir=tmp_path)
    monkeypatch.setattr(loop.BlockCalibrator, "_train", real)
    resumed, _, _ = calibrated(checkpoint_dir=tmp_path)
    sr, sx = elastic_state_dict(ref), elastic_state_dict(resumed)
    assert all(torch.equal(sr[k], sx[k]) for k in sr)
    quept.set_bits(ref, 4)
    quept.set_bits(resumed, 4)
    assert torch.equal(resumed(pixel_values=x).logits, ref(pixel_values=x).logits)


def test_save_load_compact_and_packed_keep_the_logits(tmp_path):
    base = tmp_path / "vit"
    tiny_vit().save_pretrained(base)
    model, _ = quept.load_model(base)
    quept.prepare(model, SPEC)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    quept.calibrate(model, x, CFG, progress=False)
    quept.set_bits(model, 4)
    want = model(pixel_values=x).logits
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC, calib=CFG))
    loaded, _ = quept.load(tmp_path / "el")  # the base model again, reparameterised on load
    assert reparam.refold(loaded, family_for(loaded)) == 0  # already folded: nothing twice
    quept.set_bits(loaded, 4)
    torch.testing.assert_close(loaded(pixel_values=x).logits, want, rtol=1e-5, atol=1e-5)
    meta = quept.api.export(loaded, 4, tmp_path / "w4a4", scale_dtype="float32")
    assert {i["act_quant"] for i in meta["layers"].values()} == {"per-tensor"}
    packed, _ = quept.api.load_packed(tmp_path / "w4a4")
    torch.testing.assert_close(packed(pixel_values=x).logits, want, atol=2e-3, rtol=1e-3)
    quept.api.save_compact(loaded, tmp_path / "compact", QuEPTConfig(spec=SPEC, calib=CFG))
    compact, _ = quept.api.load_compact(tmp_path / "compact")
    kept = ("act_log_step", "act_searched", "in_scale", "in_shift")
    sl, sc = elastic_state_dict(loaded), elastic_state_dict(compact)
    assert all(torch.equal(sl[k], sc[k]) for k in sl if any(p in k for p in kept))
    norms = {n: p for n, p in loaded.named_parameters() if "layernorm_" in n}
    assert all(torch.equal(p, compact.get_parameter(n)) for n, p in norms.items())
    # the master's 8-bit rounding moves a tiny random ViT's W4A4 logits, by less than W4A4 does
    quept.set_bits(compact, 4)
    float_logits = tiny_vit()(pixel_values=x).logits
    got = compact(pixel_values=x).logits
    assert (got - want).abs().mean() < (want - float_logits).abs().mean()
    # switched at run time from the compact checkpoint: the codes export writes from it
    quept.api.export(compact, 4, tmp_path / "c4")
    switch, _ = quept.load_switchable(tmp_path / "compact", 5)
    quept.set_bits(switch, 4)
    c4, _ = quept.api.load_packed(tmp_path / "c4")
    assert torch.equal(switch(pixel_values=x).logits, c4(pixel_values=x).logits)


def test_cli_quantize_builds_static_quantizers(tmp_path, monkeypatch, capsys):
    from quept.cli import main
    from tests.test_vit import fake_fashion_cache

    monkeypatch.setenv("QUEPT_CACHE", str(tmp_path / "cache"))
    fake_fashion_cache(tmp_path / "cache")
    base = tmp_path / "vit"
    tiny_vit().save_pretrained(base)
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "el"),
                 "--activations", "per-tensor", "--samples", "16", "--batch-size", "8",
                 "--group-size", "32", "--eval-images", "20", "--eval-bits", "4,8"]) == 0
    assert "W4A4" in capsys.readouterr().out
    spec = quept.api.read_meta(tmp_path / "el")["config"]["spec"]
    assert spec["activations"] == "per-tensor" and spec["bit_groups"] == [[7, 8], [5, 6], [4]]
    loaded, _ = quept.load(tmp_path / "el")
    assert all(m.reparam_folded for n, m in elastic_layers(loaded).items() if n.endswith("fc1"))
