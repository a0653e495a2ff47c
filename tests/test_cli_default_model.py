"""End to end on the real built-in model (fetched and cached on first use) with a tiny budget."""

import json
import math

import pytest

from quept.cli import main

pytestmark = pytest.mark.slow


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_quantize_then_eval_smoke(tmp_path, capsys):
    out = tmp_path / "elastic"
    res = run_json(capsys, [
        "quantize", "--out", str(out), "--samples", "2", "--seq-len", "64", "--batch-size", "2",
        "--epochs", "1", "--eval-windows", "1", "--eval-bits", "2,4,8", "--json",
    ])
    ppl = {r["bits"]: r["ppl"] for r in res["rows"]}
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl[8] <= ppl[4] <= ppl[2]
    assert ppl[8] < 1.05 * ppl[None]  # 8 bits is close to the float model
    bpw = {r["bits"]: r["bits_per_weight"] for r in res["rows"]}
    assert bpw[4] == pytest.approx(4 + 20 / 64)
    assert not (out / ".calib-checkpoint").exists()
    meta = json.loads((out / "quept.json").read_text())
    # The model alone is over 0.5 GB of float32 weights; the peak is this process's, so >= that.
    assert 0.5 < meta["calibration_peak_rss_gib"] <= res["peak_rss_gib"]

    again = run_json(capsys, ["eval", str(out), "--bits", "2,8", "--windows", "1", "--json"])
    ppl2 = {r["bits"]: r["ppl"] for r in again["rows"]}
    assert ppl2[8] == pytest.approx(ppl[8], rel=1e-5)
    assert ppl2[2] == pytest.approx(ppl[2], rel=1e-5)


def test_keep_streams_keeps_the_checkpoint_with_every_block_input(tmp_path, capsys):
    from quept.calib import CalibCheckpoint

    out = tmp_path / "elastic"
    run_json(capsys, [
        "quantize", "--out", str(out), "--samples", "2", "--seq-len", "32", "--batch-size", "2",
        "--epochs", "1", "--eval-windows", "0", "--keep-streams", "--json",
    ])
    ckpt = CalibCheckpoint(out / ".calib-checkpoint", {})
    n_blocks = json.loads((ckpt.folder / "progress.json").read_text())["next_block"]
    x_fp, x_q = ckpt.streams(1)
    assert x_fp.shape[:2] == (2, 32) and len(x_q) == len(json.loads(
        (out / "quept.json").read_text())["config"]["spec"]["bit_groups"])
    assert (ckpt.folder / f"streams_{n_blocks:03d}.safetensors").exists()


def test_eval_of_a_plain_model_folder_reports_float(tmp_path, capsys):
    from quept.api import resolve_model_dir

    res = run_json(capsys, ["eval", str(resolve_model_dir(None)), "--windows", "1", "--json"])
    assert res["elastic"] is False and len(res["rows"]) == 1
    assert 5 < res["rows"][0]["ppl"] < 100


def test_clear_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no model" in (err := capsys.readouterr().err) and "save_pretrained" in err
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err
    assert main(["quantize", "--group-size", "100", "--samples", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "group size 100 does not divide in_features=576" in capsys.readouterr().err
    assert main(["quantize", "--bit-groups", "9,8/4", "--out", str(tmp_path / "o")]) == 2
    assert "outside 2..8" in capsys.readouterr().err
