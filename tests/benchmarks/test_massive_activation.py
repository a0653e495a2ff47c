"""benchmarks/massive_activation.py on a tiny elastic folder: every block and width reported."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import massive_activation  # noqa: E402

from tests.export.tiny import elastic_folder, hf_folder  # noqa: E402


def test_follows_each_width_through_every_block(tmp_path, capsys):
    folder = elastic_folder(tmp_path / "elastic", hf_folder(tmp_path / "hf"))
    out = tmp_path / "ma.json"
    # A tiny random model has no massive activation: ratio 2 stands in to list some weights.
    assert massive_activation.main(["--elastic", str(folder), "--bits", "2,3", "--samples", "2",
                                    "--ratio", "2", "--threads", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    run = got["runs"][0]
    assert [b["block"] for b in run["blocks"]] == [1, 2]
    for row in run["blocks"]:
        assert row["float_token0_max"] > 0
        for b in ("2", "3"):
            assert row[b]["l1"] > 0 and row[b]["token0_max"] > 0
    # The 2-bit stream drifts further from the float one than the 3-bit stream.
    assert run["blocks"][-1]["2"]["l1"] > run["blocks"][-1]["3"]["l1"]
    assert run["super_weights"] and set(run["super_weights"][0]["quantized"]) == {"2", "3"}
    assert "super weights (ratio 2)" in capsys.readouterr().out
