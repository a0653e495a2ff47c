"""A calibration checkpoint that is damaged, or holds files of another run, is refused by name
with the remedy (--restart), by resuming and by `quept info` alike; never used silently."""

import json
from dataclasses import fields

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quept.calib import BlockReport, CalibCheckpoint, CheckpointCorruptError
from quept.calib import checkpoint as ckpt_module
from quept.calib.checkpoint import (
    CHECKPOINT_DIR,
    RUN_KEY,
    CheckpointMismatchError,
    run_digest,
)
from quept.checks import ConfigError
from quept.config import CalibConfig
from quept.info import InfoError, describe

from .test_calibrate import CFG, calibrated


def _killed(folder, monkeypatch, cfg=CFG, block=1, **kw):
    """``folder`` as a run killed when it starts training ``block`` leaves it."""
    from quept.calib import loop

    real = loop.BlockCalibrator._train

    def dies(self, i, *a, **k):
        if i == block:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(loop.BlockCalibrator, "_train", dies)
        with pytest.raises(KeyboardInterrupt):
            calibrated(cfg=cfg, checkpoint_dir=folder, **kw)
    return folder


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory):
    """One checkpoint of block 0 done (4 bit groups, one stream each), copied per test."""
    mp = pytest.MonkeyPatch()
    try:
        return _killed(tmp_path_factory.mktemp("once") / "ckpt", mp)
    finally:
        mp.undo()


@pytest.fixture
def folder(killed_once, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in killed_once.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit_progress(folder, edit):
    path = folder / "progress.json"
    prog = json.loads(path.read_text())
    edit(prog)
    path.write_text(json.dumps(prog))


def _report(prog, **changes):
    prog["reports"][0].update(changes)


def _refused_everywhere(folder, says):
    """Resuming and `quept info` both name the damage and the remedy."""
    with pytest.raises(CheckpointCorruptError, match=f"{says}.*--restart"):
        calibrated(checkpoint_dir=folder)
    with pytest.raises(InfoError, match=f"cannot be read as a calibration checkpoint.*{says}"
                                        ".*--restart"):
        describe(folder)
    assert CalibCheckpoint(folder, {}).finished_blocks() == 0


@pytest.mark.parametrize("edit, says", [
    # before: AttributeError in quept info, TypeError at BlockReport(**r) when resuming
    (lambda p: p.update(reports="oops"), r"holds a str 'oops' as its reports"),
    # before: TypeError, BlockReport missing arguments
    (lambda p: p.update(reports=[{}]), r"report of block 0: its fields are \[\]"),
    # before: TypeError in quept info; resuming copied "s" on into quept.json
    (lambda p: _report(p, seconds="s"), r"report of block 0: its 'seconds' is 's'"),
    (lambda p: _report(p, block=3), "report of block 0: it is numbered 3"),
    (lambda p: _report(p, bits=[7, 5]), r"report of block 0: its 'bits' is \[7, 5\]"),
    (lambda p: _report(p, loss_after=["x"] * 4), "report of block 0: its 'loss_after'"),
    (lambda p: _report(p, extra=1), "report of block 0: its fields are"),
    (lambda p: p.update(reports=[]), "should be a list of 1"),
    # before: IndexError while resuming (2 streams for 4 bit groups)
    (lambda p: p.update(n_streams=2), "records 4 bit group.*and 2 stream"),
    (lambda p: p.update(n_groups=3, n_streams=3), "its spec has 4 bit groups"),
    # a count the spec allows, but not what the streams file holds: before, resumed silently
    (lambda p: p.update(n_streams=1), r"streams_001.safetensors holds the streams \['x_q_0', "
                                      r"'x_q_1', 'x_q_2', 'x_q_3'\], but progress.json records 1"),
])
def test_damaged_progress_is_named_with_the_remedy(folder, edit, says):
    _edit_progress(folder, edit)
    _refused_everywhere(folder, says)
    CalibCheckpoint(folder, {}).clear()
    _, reports = calibrated(checkpoint_dir=folder)
    assert [r.block for r in reports] == [0, 1]


@pytest.mark.parametrize("edit, says", [
    (lambda p: p["fingerprint"].pop("spec"), "fingerprint is damaged: it holds no 'spec'"),
    (lambda p: p["fingerprint"].pop("data"), "fingerprint is damaged: it holds no 'data'"),
    (lambda p: p["fingerprint"].update(model=3), "holds a JSON integer as 'model'"),
    (lambda p: p["fingerprint"]["calib"].update(epochs="many"),
     "settings that cannot be read.*'epochs' must be int"),
    (lambda p: p["fingerprint"]["spec"].update(ranks="two"), "settings that cannot be read"),
])
def test_a_damaged_fingerprint_is_damage_not_other_settings(folder, edit, says):
    # before: "made with different ['spec'] (spec: None -> {...})", a CheckpointMismatchError
    _edit_progress(folder, edit)
    _refused_everywhere(folder, says)


def test_progress_that_is_not_json_names_the_remedy_in_quept_info(folder):
    # before: quept info said the file is not valid JSON, but not how to go on
    (folder / "progress.json").write_bytes(b'{"next_block": 1,')
    _refused_everywhere(folder, "progress.json is not valid JSON")


def test_the_report_fields_checked_are_those_of_block_report():
    want = {f.name for f in fields(BlockReport)}
    assert set(ckpt_module._REPORT_SCALARS) | set(ckpt_module._REPORT_LISTS) == want


def test_a_sound_checkpoint_is_described_and_resumed(folder):
    info = describe(folder)
    assert info["kind"] == "calibration checkpoint" and info["blocks_done"] == 1
    assert info["last_block"]["block"] == 0 and info["seconds"] > 0
    _, reports = calibrated(checkpoint_dir=folder)
    assert [r.block for r in reports] == [0, 1]


@pytest.mark.parametrize("name", ["streams_001.safetensors", "block_000.safetensors"])
def test_a_file_of_another_run_is_refused(folder, tmp_path, monkeypatch, name):
    # before: the other run's file was used silently
    other = _killed(tmp_path / "other", monkeypatch, cfg=CalibConfig(**{**CFG.to_dict(),
                                                                        "seed": 1}))
    (folder / name).write_bytes((other / name).read_bytes())
    with pytest.raises(CheckpointCorruptError,
                       match=f"{name} belongs to another calibration run.*--restart"):
        calibrated(checkpoint_dir=folder)
    prog = json.loads((folder / "progress.json").read_text())
    kept = ({"block_000.safetensors", "streams_001.safetensors"} - {name}).pop()
    with safe_open(str(folder / kept), "pt") as h:  # what tells the runs apart
        assert h.metadata() == {RUN_KEY: run_digest(prog["fingerprint"])}


def _strip_metadata(path):
    save_file(load_file(str(path)), str(path))  # as quept before the run digest wrote it


def test_files_without_a_run_digest_are_still_resumed(folder):
    # written by an older quept: accepted (this passed before the change too)
    for f in ("block_000.safetensors", "streams_001.safetensors"):
        _strip_metadata(folder / f)
    _, reports = calibrated(checkpoint_dir=folder)
    assert [r.block for r in reports] == [0, 1]


def test_streams_of_another_sample_count_are_refused(folder, tmp_path, monkeypatch):
    # before: block 1 trained on the other run's 4 samples while the run records 8
    fewer = CalibConfig(**{**CFG.to_dict(), "n_samples": 4})
    other = _killed(tmp_path / "other", monkeypatch, cfg=fewer)
    name = "streams_001.safetensors"
    (folder / name).write_bytes((other / name).read_bytes())
    _strip_metadata(folder / name)  # no digest to tell the runs apart
    says = f"{name} holds streams of 4 samples, but the run calibrates on {CFG.n_samples}"
    _refused_everywhere(folder, says)


def test_a_run_stopped_while_saving_block_0_starts_again(folder, caplog):
    # before: block 0's files of this run without progress.json (a run stopped between the two
    # writes) were refused, and only --restart went on
    (folder / "progress.json").unlink()
    with caplog.at_level("WARNING", logger="quept.calib.checkpoint"):
        _, reports = calibrated(checkpoint_dir=folder)
    assert [r.block for r in reports] == [0, 1]
    assert "stopped while saving block 0): discarded them" in caplog.text


@pytest.mark.parametrize("damage", ["block 1 too", "no run digest", "another run"])
def test_block_files_without_progress_are_refused_and_restart_discards_them(
        folder, damage, tmp_path, monkeypatch):
    # before: a rerun started over silently and wrote over the block files
    (folder / "progress.json").unlink()
    names = ["block_000.safetensors"]
    if damage == "block 1 too":
        names.append("block_001.safetensors")
        (folder / names[1]).write_bytes((folder / names[0]).read_bytes())
    elif damage == "no run digest":
        _strip_metadata(folder / names[0])
    else:
        other = CalibConfig(**{**CFG.to_dict(), "seed": CFG.seed + 1})
        other_folder = _killed(tmp_path / "other", monkeypatch, cfg=other)
        (folder / names[0]).write_bytes((other_folder / names[0]).read_bytes())
    kept = {n: (folder / n).read_bytes() for n in names}
    listed = ", ".join(names)
    with pytest.raises(CheckpointCorruptError, match=rf"progress.json is missing, but "
                       rf"{len(names)} block file\(s\) remain \({listed}\).*--restart"):
        calibrated(checkpoint_dir=folder)
    assert {n: (folder / n).read_bytes() for n in names} == kept
    CalibCheckpoint(folder, {}).clear()  # what `quept quantize --restart` does
    _, reports = calibrated(checkpoint_dir=folder)
    assert [r.block for r in reports] == [0, 1]


def test_a_run_killed_in_its_first_block_with_kept_streams_starts_again(tmp_path, monkeypatch):
    # only the kept input of block 0 (streams_000) and no progress.json: nothing to resume
    folder = _killed(tmp_path / "ckpt", monkeypatch, block=0, keep_streams=True)
    assert sorted(p.name for p in folder.iterdir()) == ["streams_000.safetensors"]
    _, reports = calibrated(checkpoint_dir=folder)
    assert [r.block for r in reports] == [0, 1]


def test_an_output_folder_is_refused_with_its_checkpoint_named(folder, tmp_path):
    # before: CheckpointCorruptError "progress.json is missing" for the folder `--out` named,
    # which holds the checkpoint of `quept quantize --keep-streams` in .calib-checkpoint
    out = tmp_path / "out"
    out.mkdir()
    folder.rename(out / CHECKPOINT_DIR)
    with pytest.raises(ConfigError, match=f"{out} is the output folder of `quept quantize`.*"
                                          f"give {out / CHECKPOINT_DIR}"):
        CalibCheckpoint(out, {}).streams(1)
    x_fp, x_q = CalibCheckpoint(out / CHECKPOINT_DIR, {}).streams(1)
    assert x_fp.shape[0] == CFG.n_samples and len(x_q) == 4


def test_a_checkpoint_of_other_settings_names_them_in_words(folder):
    # before: "made with different ['calib'] (calib.epochs 6 -> 7)", a Python list
    with pytest.raises(CheckpointMismatchError) as e:
        calibrated(cfg=CalibConfig(**{**CFG.to_dict(), "epochs": CFG.epochs + 1}),
                   checkpoint_dir=folder)
    assert f"made with other calib settings (calib.epochs {CFG.epochs} -> {CFG.epochs + 1})" \
        in str(e.value) and "[" not in str(e.value)
