"""benchmarks/replay_block.py rebuilds a block's calibration exactly from a saved folder."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import replay_block  # noqa: E402

import quept  # noqa: E402
from quept import data  # noqa: E402
from quept.config import CalibConfig, ElasticSpec, QuEPTConfig  # noqa: E402
from tests.export.tiny import hf_folder  # noqa: E402

SPEC = ElasticSpec(bit_groups=((7, 8), (5, 6), (4,), (2,)), ranks=(2, 2, 2, 2),
                   default_group_size=32)
CALIB = CalibConfig(n_samples=6, seq_len=16, batch_size=2, epochs=2, lr_adapter=1e-2,
                    lr_clip=0.1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    base = hf_folder(root / "hf")
    torch.set_num_threads(1)
    model, tok = quept.load_model(base)
    quept.prepare(model, SPEC, seed=CALIB.seed)
    ids = quept.samples_from_text(tok, data.calibration_text(), CALIB)
    reports = quept.calibrate(model, ids, CALIB, progress=False)
    quept.save(model, root / "elastic", QuEPTConfig(spec=SPEC, calib=CALIB))
    return root / "elastic", reports


def test_second_block_replays_to_the_logged_losses(calibrated, tmp_path):
    folder, reports = calibrated
    out = tmp_path / "r.json"
    assert replay_block.main(["--elastic", str(folder), "--block", "2", "--threads", "1",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["bits"] == reports[1].bits
    # The same inputs, init and draws: the same numbers as the calibration itself.
    assert r["loss_before"] == pytest.approx(reports[1].loss_before, rel=1e-5)
    assert r["loss_after"] == pytest.approx(reports[1].loss_after, rel=1e-5)
    assert r["loss_after"][-1] < r["loss_before"][-1]


def test_another_draw_order_trains_differently(calibrated, tmp_path):
    folder, reports = calibrated
    out = tmp_path / "r.json"
    replay_block.main(["--elastic", str(folder), "--block", "2", "--threads", "1",
                       "--draw-seed", "7", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["loss_before"] == pytest.approx(reports[1].loss_before, rel=1e-5)
    assert r["loss_after"] != pytest.approx(reports[1].loss_after, rel=1e-5)
    assert r["draw_seed"] == 7


def test_block_out_of_range(calibrated):
    with pytest.raises(SystemExit, match="--block must be 1..2"):
        replay_block.main(["--elastic", str(calibrated[0]), "--block", "3"])
