"""Learned rounding on the learned grid (quept.export.learned): the codes stay on the elastic
grid within one level of nearest, start from nearest, lower each block's loss on the
calibration inputs, drive the model's forward and every export, and leave other widths alone;
bad requests are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

import quept
from quept.config import ConfigError
from quept.export.learned import LearnedRoundingConfig, _Offsets
from quept.nn import elastic_layers
from quept.ops import quantize

from .tiny import SPEC, elastic_folder, elastic_tiny, hf_folder, run_json

IDS = torch.randint(2, 250, (8, 32), generator=torch.Generator().manual_seed(0))
FAST = LearnedRoundingConfig(iters=60, check_every=20)


def nearest_codes(m, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize(m.weight + m.delta(bits), bits, SPEC.group_size_for(bits),
                    *m.clip_factors(bits))


def test_zero_offsets_are_the_elastic_models_own_codes():
    model = elastic_tiny()
    for bits in (2, 3, 8):
        for m in elastic_layers(model).values():
            o = _Offsets(m, bits, SPEC.group_size_for(bits))
            got, want = o.codes(torch.zeros_like(o.v)), nearest_codes(m, bits)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
            torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
            with torch.no_grad():
                torch.testing.assert_close(o.weight(), m.quantized_weight(bits))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_learned_codes_stay_on_the_grid_and_lower_every_blocks_loss(bits):
    model = elastic_tiny()
    quept.set_bits(model, None)
    with torch.no_grad():
        ref = model(IDS).logits
    quept.set_bits(model, bits)
    with torch.no_grad():
        near = (model(IDS).logits - ref).pow(2).mean()
    info = quept.round_learned(model, bits, IDS, FAST, progress=False)
    assert info["layers"] == len(elastic_layers(model))
    assert all(b <= a for a, b in zip(info["loss_nearest"], info["loss_learned"]))
    assert info["blocks_improved"] == len(info["loss_nearest"]) > 0
    moved = 0
    for m in elastic_layers(model).values():
        codes, scale, zero = m.rounded[bits]
        want = nearest_codes(m, bits)
        torch.testing.assert_close(scale, want[1], rtol=0, atol=0)  # the same grid
        torch.testing.assert_close(zero, want[2], rtol=0, atol=0)
        step = codes.int() - want[0].int()
        assert int(codes.max()) <= 2**bits - 1 and step.abs().max() <= 1  # one level at most
        moved += int(step.ne(0).sum())
    assert moved > 0
    with torch.no_grad():
        learned = (model(IDS).logits - ref).pow(2).mean()
    assert learned < 0.8 * near, (learned, near)


def test_bf16_steps_learn_too_and_the_checks_stay_float32():
    model = elastic_tiny()
    quept.set_bits(model, None)
    with torch.no_grad():
        ref = model(IDS).logits
    quept.set_bits(model, 3)
    with torch.no_grad():
        near = (model(IDS).logits - ref).pow(2).mean()
    seen = []  # (grad enabled, output dtype) of one linear's calls
    layer = next(iter(elastic_layers(model).values()))
    layer.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    info = quept.round_learned(model, 3, IDS, LearnedRoundingConfig(
        iters=60, check_every=20, bf16=True), progress=False)
    assert {d for g, d in seen if g} == {torch.bfloat16}  # the training steps
    assert {d for g, d in seen if not g} == {torch.float32}  # targets and checks
    assert info["blocks_improved"] == len(info["loss_nearest"]) > 0
    with torch.no_grad():
        learned = (model(IDS).logits - ref).pow(2).mean()
    assert learned < 0.8 * near, (learned, near)


def test_a_block_that_cannot_improve_keeps_its_nearest_codes():
    model = elastic_tiny()
    # one step of the largest size moves every offset to +-1/2: about half the weights jump a
    # level at once, far past the minimum, so every block's loss rises and nearest is kept
    overshoot = LearnedRoundingConfig(iters=1, check_every=1, lr=0.5)
    info = quept.round_learned(model, 3, IDS, overshoot, progress=False)
    assert info["loss_learned"] == info["loss_nearest"] and info["blocks_improved"] == 0
    for m in elastic_layers(model).values():
        assert torch.equal(m.rounded[3][0], nearest_codes(m, 3)[0])


def test_a_plan_is_rounded_with_the_squared_error_too():
    model = elastic_tiny()
    names = list(elastic_layers(model))
    plan = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    info = quept.round_learned(model, plan, IDS, LearnedRoundingConfig(iters=5, loss="l2"),
                               progress=False)
    assert all(b <= a for a, b in zip(info["loss_nearest"], info["loss_learned"]))
    for n, m in elastic_layers(model).items():
        assert set(m.rounded) == {plan[n]} and m.bits == plan[n]


def test_a_loss_that_is_not_finite_stops_with_the_block_named():
    model = elastic_tiny()
    with torch.no_grad():
        next(iter(elastic_layers(model).values())).weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="block 0"):
        quept.round_learned(model, 3, IDS, FAST, progress=False)


def test_bad_settings_are_refused_by_name():
    for bad in ({"iters": 0}, {"lr": 0.0}, {"lr": 1.0}, {"loss": "huber"},
                {"massive_ratio": 1.0}, {"batch_size": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LearnedRoundingConfig(**bad)


def test_cli_export_with_learned_rounding(tmp_path, capsys, monkeypatch):
    elastic = elastic_folder(tmp_path / "elastic", hf_folder(tmp_path / "base"))
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    configs, real = [], quept.api.round_learned
    monkeypatch.setattr(quept.api, "round_learned",
                        lambda *args, **kw: configs.append(args[3]) or real(*args, **kw))
    out = run_json(capsys, ["export", str(elastic), "--bits", "3", "--out", str(tmp_path / "w3"),
                            "--rounding", "learned", "--iters", "5", "--calib-text", str(text),
                            "--samples", "4", "--seq-len", "24", "--bf16", "--json"])
    assert out["rounding"] == "learned" and out["rounding_seconds"] > 0
    assert [(c.iters, c.bf16) for c in configs] == [(5, True)]
    meta = json.loads((tmp_path / "w3" / "quept-packed.json").read_text())
    assert meta["source"]["rounding"] == "learned"
    info = run_json(capsys, ["info", str(tmp_path / "w3"), "--json"])
    assert info["source"]["rounding"] == "learned"
    from quept.cli import main

    assert main(["info", str(tmp_path / "w3")]) == 0
    assert "codes rounded with learned offsets" in capsys.readouterr().out

    assert main(["export", str(elastic), "--bits", "3", "--out", str(tmp_path / "x"),
                 "--iters", "5"]) != 0
    assert "--iters applies to --rounding learned" in capsys.readouterr().err
    assert main(["export", str(elastic), "--bits", "3", "--out", str(tmp_path / "x"),
                 "--rounding", "gptq", "--bf16"]) != 0
    assert "--bf16 applies to --rounding learned" in capsys.readouterr().err
    assert main(["export", str(elastic), "--bits", "3", "--out", str(tmp_path / "x"),
                 "--rounding", "learned", "--iters", "0"]) != 0
    assert "iters must be >= 1" in capsys.readouterr().err
