"""benchmarks/switchable.py: the tables it prints."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from switchable import WIDTHS, report  # noqa: E402


def test_report_prints_every_way_and_width(capsys):
    speed = {"prefill_tok_s": 300.0, "decode_tok_s": 30.0, "text": "x"}
    ways = {mode: {"load_seconds": 1.5, "rss_mb": 400.0, "peak_rss_mb": 500.0,
                   "speed": {"W4": speed}} for mode in ("switchable", "packed")}
    sw = ways["switchable"]
    sw.update(
        switch_seconds={str(b): 0.5 + b / 100 for b in WIDTHS},
        packed_mb={str(b): 10.0 * b for b in WIDTHS}, exact={str(b): 0.0 for b in WIDTHS},
        speed={f"W{b}": speed for b in WIDTHS},
        toggle_kept={"keep_mb": 120, "kept_mb": 43.8, "reused": 210, "seconds": 0.0049},
        sizes={"source_bytes": 138.6e6, "source_bits_per_weight": 10.45},
        resident_mb_after_switching=375.0, switch_peak_over_resident_mb=233.0)
    report({"machine": "m", "settings": {}, "modes": ways,
            "packed_file_mb": {str(b): 100.0 + b for b in WIDTHS}})
    out = capsys.readouterr().out
    assert "| switchable | 1.5 | 400 | 500 | 300.0 | 30.0 |" in out
    assert "| packed | 1.5 | 400 | 500 | 300.0 | 30.0 |" in out
    assert "| W3 | 0.53 | 30.0 | 103.0 | 30.0 | 0 |" in out
    assert "median 4.9 ms a switch, 210 layers reused" in out
    assert "138.6 MB (10.45 bits per weight)" in out and "peak at most 233 MB" in out
