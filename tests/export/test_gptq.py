"""GPTQ rounding on the learned grid (quept.export.gptq): the codes stay on the elastic grid,
lower the output error on the calibration inputs, drive the model's forward and every export,
and leave other widths alone; bad requests are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

import quept
from quept.config import ConfigError
from quept.export.gptq import GPTQConfig, clear_rounding, gptq_codes
from quept.nn import elastic_layers
from quept.ops import dequantize, quantize

from .tiny import elastic_folder, elastic_tiny, hf_folder, run_json

IDS = torch.randint(2, 250, (8, 32), generator=torch.Generator().manual_seed(0))


def problem(out: int = 24, inn: int = 64, seed: int = 0):
    """A weight, clip factors for groups of 32 and correlated inputs (tokens, in)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    hi = 0.7 + 0.3 * torch.rand(out, inn // 32, generator=g)
    lo = 0.7 + 0.3 * torch.rand(out, inn // 32, generator=g)
    mix = torch.randn(inn, inn, generator=g) / inn**0.5 + torch.eye(inn)
    x = torch.randn(512, inn, generator=g) @ mix * (1 + 3 * torch.rand(inn, generator=g))
    return w, hi, lo, x


@pytest.mark.parametrize("act_order", [True, False])
def test_without_correlation_gptq_is_round_to_nearest_on_the_same_grid(act_order):
    w, hi, lo, _ = problem()
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5)
    codes, scale, zero = gptq_codes(w, h, 3, 32, hi, lo, GPTQConfig(act_order=act_order))
    want = quantize(w, 3, 32, hi, lo)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, want[0])
    torch.testing.assert_close(scale, want[1], rtol=0, atol=0)
    torch.testing.assert_close(zero, want[2], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_the_output_error_on_its_inputs(bits, act_order):
    w, hi, lo, x = problem(seed=bits)
    h = 2 * x.T @ x / x.shape[0]
    cfg = GPTQConfig(act_order=act_order, block_size=16)  # several column blocks
    codes, scale, zero = gptq_codes(w, h, bits, 32, hi, lo, cfg)
    assert int(codes.max()) <= 2**bits - 1
    near = quantize(w, bits, 32, hi, lo)
    torch.testing.assert_close(scale, near[1], rtol=0, atol=0)  # the same grid
    err = lambda c: ((w - dequantize(c, scale, zero, 32)) @ x.T).pow(2).mean()  # noqa: E731
    assert err(codes) < 0.8 * err(near[0])
    assert not torch.equal(codes, near[0])


def test_per_channel_grids_work_too():
    w, _, _, x = problem()
    hi, lo = torch.full((24, 1), 0.9), torch.full((24, 1), 0.95)
    codes, scale, zero = gptq_codes(w, x.T @ x, 3, 0, hi, lo)
    near = quantize(w, 3, 0, hi, lo)
    assert scale.shape == (24, 1) and torch.equal(scale, near[1])
    err = lambda c: ((w - dequantize(c, scale, zero, 0)) @ x.T).pow(2).mean()  # noqa: E731
    assert err(codes) < err(near[0])


def test_a_singular_input_moment_is_damped_and_a_dead_column_handled():
    w, hi, lo, x = problem()
    x[:, 5] = 0  # a channel that never fires
    x[:, 7] = x[:, 6]  # two equal channels: H singular without damping
    codes, scale, zero = gptq_codes(w, x.T @ x, 4, 32, hi, lo)
    assert torch.isfinite(dequantize(codes, scale, zero, 32)).all()


def test_on_the_calibration_inputs_gptq_beats_nearest_on_the_same_grid():
    model = elastic_tiny()
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.lora_u.zero_()  # nearest on the grid without the adapter, what GPTQ starts from
    quept.set_bits(model, None)
    ref = model(IDS).logits
    for bits in (2, 3):
        quept.set_bits(model, bits)
        near = (model(IDS).logits - ref).pow(2).mean()
        quept.round_gptq(model, bits, IDS, progress=False)
        gptq = (model(IDS).logits - ref).pow(2).mean()
        clear_rounding(model)
        assert gptq < near, (bits, gptq, near)


def test_a_plan_is_rounded_layer_by_layer_and_adapters_can_be_kept():
    model = elastic_tiny()
    names = list(elastic_layers(model))
    plan = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    quept.round_gptq(model, plan, IDS, GPTQConfig(adapters=True, act_order=False),
                     progress=False)
    for n, m in elastic_layers(model).items():
        assert set(m.rounded) == {plan[n]} and m.bits == plan[n]


def test_a_damping_that_is_not_positive_is_refused():
    with pytest.raises(ConfigError, match="damp"):
        GPTQConfig(damp=0)


@pytest.fixture
def folders(tmp_path):
    base = hf_folder(tmp_path / "base")
    return tmp_path, elastic_folder(tmp_path / "elastic", base)


def test_cli_export_with_gptq_rounding(folders, capsys):
    root, elastic = folders
    text = root / "calib.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    out = run_json(capsys, ["export", str(elastic), "--bits", "3", "--out", str(root / "w3"),
                            "--rounding", "gptq", "--calib-text", str(text), "--samples", "4",
                            "--seq-len", "24", "--json"])
    assert out["rounding"] == "gptq" and out["rounding_seconds"] > 0
    meta = json.loads((root / "w3" / "quept-packed.json").read_text())
    assert meta["source"]["rounding"] == "gptq"
    info = run_json(capsys, ["info", str(root / "w3"), "--json"])
    assert info["source"]["rounding"] == "gptq"
    plain = run_json(capsys, ["export", str(elastic), "--bits", "3", "--out",
                              str(root / "w3n"), "--json"])
    assert plain["rounding"] == "nearest"
    assert "rounding" not in json.loads((root / "w3n" / "quept-packed.json").read_text())[
        "source"]
    from quept.cli import main

    assert main(["export", str(elastic), "--bits", "3", "--out", str(root / "x"),
                 "--samples", "4"]) != 0
    assert "apply to --rounding gptq" in capsys.readouterr().err
    assert main(["export", str(elastic), "--bits", "3", "--out", str(root / "x"),
                 "--rounding", "gptq", "--samples", "0"]) != 0
    assert "--samples must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rounding_on_a_gpu_matches_the_cpu_and_leaves_the_model_usable_on_the_cpu():
    on_cpu, on_gpu = elastic_tiny(), elastic_tiny()
    quept.round_gptq(on_cpu, 3, IDS, progress=False)
    quept.round_gptq(on_gpu, 3, IDS, GPTQConfig(device="cuda"), progress=False)
    for (n, a), b in zip(elastic_layers(on_cpu).items(), elastic_layers(on_gpu).values()):
        same = (a.rounded[3][0] == b.rounded[3][0].cpu()).float().mean()
        assert same > 0.99, n  # float sums in another order may flip a rare tie
    torch.testing.assert_close(on_gpu(IDS[:2]).logits, on_cpu(IDS[:2]).logits, rtol=0.05,
                               atol=0.05)
