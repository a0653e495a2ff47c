"""benchmarks/calib_speed.py: the ways of computing the fake quantization calibrate alike."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import calib_speed  # noqa: E402

from quept.ops import fq_kernel  # noqa: E402
from tests.export.tiny import TEXT, hf_folder  # noqa: E402


def test_every_way_calibrates_to_the_same_losses(tmp_path, capsys):
    base = hf_folder(tmp_path / "hf")
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 8)
    ways = "composed,pytorch" + (",kernel,kernel-bf16" if fq_kernel.load() is not None else "")
    res = calib_speed.main(["--model", str(base), "--text", str(text), "--preset", "cpu-demo",
                            "--blocks", "1", "--epochs", "1", "--repeats", "1", "--threads",
                            "1", "--ways", ways, "--json", str(tmp_path / "r.json")])
    assert [r["way"] for r in res["rows"]] == ways.split(",")
    ref = res["rows"][0]["loss_after_last_run"][0]
    for row in res["rows"][1:]:
        # bfloat16 steps are other arithmetic: the same losses to a few percent, not to 1e-3
        rel = 5e-2 if row["way"] == "kernel-bf16" else 1e-3
        assert row["loss_after_last_run"][0] == pytest.approx(ref, rel=rel)
        assert row["median_block_seconds"] > 0
    out = capsys.readouterr().out
    assert "| composed |" in out and "1.00x" in out
    assert (tmp_path / "r.json").is_file()
    with pytest.raises(SystemExit, match="--ways"):
        calib_speed.main(["--ways", "fast"])
