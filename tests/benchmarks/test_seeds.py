"""benchmarks/seeds.py: one calibration per seed, the spread per width, resumable."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import seeds  # noqa: E402

from tests.export.tiny import TEXT, hf_folder  # noqa: E402


def test_spread_per_width():
    runs = [{"seed": 0, "rows": [{"bits": None, "ppl": 10.0}, {"bits": 2, "ppl": 40.0}]},
            {"seed": 1, "rows": [{"bits": None, "ppl": 10.0}, {"bits": 2, "ppl": 60.0}]}]
    rows = seeds.spread(runs)
    assert [r["bits"] for r in rows] == [None, 2]
    assert rows[0]["spread"] == 0 and rows[0]["std"] == 0
    assert rows[1]["ppl"] == {0: 40.0, 1: 60.0}
    assert rows[1]["mean"] == 50.0 and rows[1]["std"] == 10.0 and rows[1]["spread"] == 0.4


def test_seeds_calibrate_apart_with_the_same_data_and_resume(tmp_path, capsys):
    base = hf_folder(tmp_path / "hf")
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 8)
    out = tmp_path / "s.json"
    argv = ["--model", str(base), "--calib-text", str(text), "--eval-text", str(text),
            "--samples", "4", "--calib-seq-len", "32", "--windows", "2", "--seq-len", "32",
            "--bits", "2,8", "--threads", "1", "--data-seed", "0", "--out", str(out)]
    res = seeds.main([*argv, "--seeds", "0,1"])
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    assert {r["data_seed"] for r in res["runs"]} == {0}
    w2 = next(r for r in res["spread"] if r["bits"] == 2)
    assert w2["ppl"][0] != w2["ppl"][1]  # other adapter inits and draws: another model
    flt = next(r for r in res["spread"] if r["bits"] is None)
    assert flt["spread"] == 0  # the float model is the same in every run
    assert "| W2 |" in capsys.readouterr().out
    kept = json.loads(out.read_text())["runs"][0]
    again = seeds.main([*argv, "--seeds", "0,1,2", "--resume"])
    assert [r["seed"] for r in again["runs"]] == [0, 1, 2]
    assert again["runs"][0] == kept  # seed 0 kept, not calibrated again
    with pytest.raises(SystemExit, match="other settings"):
        seeds.main([*argv, "--seeds", "0", "--resume", "--windows", "1"])


def test_seeds_overrides_reach_the_recorded_config(tmp_path):
    base = hf_folder(tmp_path / "hf")
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 8)
    out = tmp_path / "s.json"
    res = seeds.main(["--model", str(base), "--calib-text", str(text), "--eval-text", str(text),
                      "--samples", "2", "--calib-seq-len", "32", "--windows", "1",
                      "--seq-len", "32", "--bits", "2", "--threads", "1", "--seeds", "0",
                      "--protect-outliers", "100", "--massive-ratio", "1000", "--out", str(out)])
    config = json.loads(out.read_text())["settings"]["config"]
    assert config["spec"]["protect_outliers"] == 100.0
    assert config["calib"]["massive_ratio"] == 1000.0
    assert res["settings"] == json.loads(out.read_text())["settings"]
