"""An elastic folder is never lost or loaded as another model: no output is written into a
calibration checkpoint folder (which the calibration deletes when it ends); a stop after the
model is saved says where it is; a weights file and a quept.json not written by the same save
are refused by name, as is a save that was stopped half way; and weights that do not fit the
quept.json, or are missing, are named with both files and the remedy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quept
from quept.api import ArtifactError, folder_kind
from quept.api.folders import check_out_file, check_out_folder, check_plan_out
from quept.api.store import SAVE_ID
from quept.calib import CHECKPOINT_DIR, CalibCheckpoint
from quept.cli import main
from quept.config import CalibConfig, ConfigError, QuEPTConfig
from quept.outputs import UNFINISHED
from tests.export.tiny import SPEC, TEXT, elastic_folder, hf_folder, randomize, run_json


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny HF model folder ("base"), a text, and an elastic folder of it ("el")."""
    root = tmp_path_factory.mktemp("folder-safety")
    elastic_folder(root / "el", hf_folder(root / "base"))
    (root / "text.txt").write_text(TEXT * 4)
    return root


def copy(root, name: str, to: str):
    shutil.rmtree(root / to, ignore_errors=True)
    return shutil.copytree(root / name, root / to)


def unfinished_calibration(out) -> None:
    """``out`` as an interrupted `quept quantize --out out` leaves it: one block in its
    calibration checkpoint folder."""
    CalibCheckpoint(out / CHECKPOINT_DIR, {"calib": {"seed": 0}}).save(
        0, {"lora_u": torch.zeros(2)}, torch.zeros(2, 4, 8), [torch.ones(2, 4, 8)],
        torch.Generator().get_state(), [])


def quick_quantize(root, out, *more: str) -> list[str]:
    return ["quantize", "--model", str(root / "base"), "--out", str(out), "--calib-text",
            str(root / "text.txt"), "--samples", "2", "--seq-len", "16", "--ranks", "2,2,2,2",
            "--group-size", "32", "--eval-windows", "0", "--json", *more]


# -- 1. no output inside a calibration checkpoint folder ---------------------------------------

def test_quantize_refuses_to_write_into_another_runs_checkpoint_folder(root, tmp_path, capsys,
                                                                       monkeypatch):
    def calibrate(*a, **k):
        raise AssertionError("the calibration started")

    monkeypatch.setattr(quept.api, "calibrate", calibrate)
    run = tmp_path / "run"
    unfinished_calibration(run)
    ckpt = run / CHECKPOINT_DIR
    before = sorted(p.name for p in ckpt.iterdir())
    for out, where in ((ckpt, "is"), (ckpt / "sub", f"lies inside {ckpt},")):
        assert main(quick_quantize(root, out)) == 2
        err = capsys.readouterr().err
        assert (f"quept: error: --out {out} {where} the calibration checkpoint folder of "
                f"`quept quantize --out {run}`, which deletes it, with every file in it, when "
                "the calibration ends; an elastic model written there would be lost with it: "
                f"give a folder outside {ckpt}") in err, err
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_every_output_check_refuses_a_checkpoint_folder_and_what_is_inside_it(root, tmp_path):
    run = tmp_path / "run"
    unfinished_calibration(run)
    ckpt = run / CHECKPOINT_DIR
    own = tmp_path / "own"  # a checkpoint_dir of quept.calibrate's, named by its caller
    unfinished_calibration(own)
    shutil.move(own / CHECKPOINT_DIR, own / "ck")
    fresh = tmp_path / "none-yet" / CHECKPOINT_DIR  # the name alone: a run would make it
    for out in (ckpt, ckpt / "sub", own / "ck", own / "ck" / "sub", fresh):
        with pytest.raises(ConfigError, match="calibration checkpoint folder"):
            check_out_folder(out, "packed")
        with pytest.raises(ConfigError, match="a GGUF file written there would be lost"):
            check_out_file(out / "model.gguf")
        with pytest.raises(ConfigError, match="a plan written there would be lost"):
            check_plan_out(out / "plan.json")
    with pytest.raises(ConfigError, match=f"{own / 'ck'} is a calibration checkpoint folder "
                                          r"\(it holds progress.json\)"):
        check_out_folder(own / "ck", "compact")
    model, _ = quept.load(root / "el")
    with pytest.raises(ConfigError, match="an elastic model written there would be lost"):
        quept.save(model, ckpt, QuEPTConfig(spec=SPEC))
    assert not (ckpt / "quept.json").exists()
    check_out_folder(run, "elastic")  # the run's own --out: where it resumes
    quept.save(model, tmp_path / "elsewhere", QuEPTConfig(spec=SPEC))


# -- 2. a stop after the save says where the model is; seconds over every run -----------------

def test_a_stop_during_the_evaluation_says_the_model_is_written(root, capsys, monkeypatch):
    out = root / "stopped-in-eval"
    argv = quick_quantize(root, out, "--eval-windows", "1", "--eval-seq-len", "16",
                          "--eval-text", str(root / "text.txt"))

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quept.api, "evaluate", stop)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert (f"quept: interrupted: the elastic model is written to {out} (what was stopped came "
            f"after it); `quept eval {out}` measures it") in err, err
    assert not (out / CHECKPOINT_DIR).exists()
    quept.load(out)


def test_a_stop_during_the_save_says_the_calibration_is_kept(root, capsys, monkeypatch):
    out = root / "stopped-in-save"
    argv = quick_quantize(root, out)

    def stop(*a, **k):
        raise KeyboardInterrupt("stopped by SIGTERM")

    with monkeypatch.context() as m:
        m.setattr(quept.api, "save", stop)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert (f"quept: interrupted: stopped by SIGTERM; the calibration is done and kept in "
            f"{out / CHECKPOINT_DIR}, but {out} was not written whole: the same command writes "
            "it without calibrating again") in err, err
    assert run_json(capsys, argv)["calibration_resumed_blocks"] == 2  # every block


def test_a_resumed_calibration_counts_the_seconds_of_the_blocks_done_before(root, capsys,
                                                                             monkeypatch):
    import time

    from quept.calib import loop

    out = root / "resumed"
    argv = quick_quantize(root, out)
    real = loop.BlockCalibrator._train

    def slow_first_block_then_stop(self, i, *args, **kw):
        if i == 1:
            raise KeyboardInterrupt
        time.sleep(1.5)  # block 0 takes 1.5 s more in the stopped run than in any other
        return real(self, i, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(loop.BlockCalibrator, "_train", slow_first_block_then_stop)
        assert main(argv) == 130
    capsys.readouterr()
    result = run_json(capsys, argv)
    meta = json.loads((out / "quept.json").read_text())
    first, second = (r["seconds"] for r in meta["reports"])
    assert first >= 1.5
    assert result["calibration_resumed_blocks"] == meta["calibration_resumed_blocks"] == 1
    assert result["calibration_seconds"] == meta["calibration_seconds"] >= first + second


# -- 3. a weights file and a quept.json of different saves -------------------------------------

def _save_id(folder) -> str | None:
    with safe_open(str(folder / "elastic.safetensors"), "pt") as f:
        return (f.metadata() or {}).get(SAVE_ID)


def _other_calibration(root, to: str, seed: int = 7):
    """An elastic folder of the same base model with other adapters (another calibration)."""
    model, _ = quept.load_model(root / "base")
    randomize(quept.prepare(model, SPEC), seed=seed)
    shutil.rmtree(root / to, ignore_errors=True)
    return quept.save(model, root / to, QuEPTConfig(spec=SPEC, calib=CalibConfig(seed=seed)))


def test_weights_of_another_save_are_refused_naming_both_files(root, capsys):
    folder = copy(root, "el", "mixed")
    other = _other_calibration(root, "other")
    meta = json.loads((folder / "quept.json").read_text())
    assert meta[SAVE_ID] == _save_id(folder) != _save_id(other)
    shutil.copy(other / "elastic.safetensors", folder / "elastic.safetensors")
    says = (f"{folder / 'elastic.safetensors'} and {folder / 'quept.json'} were written by "
            "different saves")
    with pytest.raises(ArtifactError, match="rerun the `quept quantize` command") as e:
        quept.load(folder)
    assert says in str(e.value)
    assert main(["eval", str(folder), "--bits", "4", "--text", str(root / "text.txt"),
                 "--windows", "1", "--seq-len", "16"]) == 2
    assert says in capsys.readouterr().err
    assert main(["info", str(folder)]) == 2  # info reads the headers, and says so too
    assert says in capsys.readouterr().err


def test_a_folder_of_an_older_version_without_save_ids_still_loads(root):
    folder = copy(root, "el", "older")
    meta = json.loads((folder / "quept.json").read_text())
    del meta[SAVE_ID]
    (folder / "quept.json").write_text(json.dumps(meta))
    save_file(load_file(str(folder / "elastic.safetensors")),
              str(folder / "elastic.safetensors"), metadata={"format": "quept-elastic"})
    quept.load(folder)
    other = copy(root, "el", "older-json")  # new weights under an old quept.json: mixed up
    (other / "quept.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"written by different saves \(save ids [0-9a-f]+ "
                                            "and none"):
        quept.load(other)


def test_a_save_stopped_between_its_two_files_is_refused_as_unfinished(root, monkeypatch):
    from quept.api import store

    folder = copy(root, "el", "stopped-save")
    model, _ = quept.load_model(root / "base")
    randomize(quept.prepare(model, SPEC), seed=5)

    def stop(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store, "_write_meta", stop)
        with pytest.raises(KeyboardInterrupt):
            quept.save(model, folder, QuEPTConfig(spec=SPEC, calib=CalibConfig(seed=5)))
    assert (folder / UNFINISHED).is_file() and folder_kind(folder) == "unfinished"
    with pytest.raises(ArtifactError, match=f"{folder} holds an elastic model whose writing was "
                                            "stopped before it ended; run the command that "
                                            "wrote it again"):
        quept.load(folder)
    quept.save(model, folder, QuEPTConfig(spec=SPEC, calib=CalibConfig(seed=5)))  # replaces it
    assert not (folder / UNFINISHED).exists()
    assert quept.load(folder)[0].quept_calibrated


# -- 4. weights that do not fit quept.json, missing or damaged: both files and a remedy --------

def _rewrite(folder, edit) -> None:
    """Change the tensors of ``folder``'s weights file, keeping its metadata (its save id)."""
    path = str(folder / "elastic.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def test_weights_that_do_not_fit_the_quept_json_name_both_files(root):
    name = "model.layers.0.self_attn.k_proj.lora_u"
    for to, edit, detail in (
        ("missing-keys", lambda t: t.pop(name), rf"1 missing \(e.g. \['{name}'\]\)"),
        ("wrong-shape", lambda t: t.update({name: torch.zeros(t[name].shape[0], 3)}),
         rf"{name}: saved shape \(\d+, 3\) but the model needs \(\d+, \d+\)"),
    ):
        folder = copy(root, "el", to)
        _rewrite(folder, edit)
        with pytest.raises(ArtifactError, match=detail) as e:
            quept.load(folder)
        assert str(e.value).startswith(f"{folder / 'elastic.safetensors'} does not match "
                                       f"{folder / 'quept.json'} (the model and spec it was "
                                       "saved with): "), e.value
        assert "rerun the `quept quantize` command that made it (same --out)" in str(e.value)


def test_missing_or_truncated_weights_are_named_with_a_remedy(root):
    folder = copy(root, "el", "no-weights")
    (folder / "elastic.safetensors").unlink()
    with pytest.raises(ArtifactError, match=f"{folder / 'elastic.safetensors'} is missing, "
                                            f"which {folder / 'quept.json'} describes; rerun "
                                            "the `quept quantize` command that made it"):
        quept.load(folder)
    folder = copy(root, "el", "cut-weights")
    data = (folder / "elastic.safetensors").read_bytes()
    (folder / "elastic.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=f"{folder / 'elastic.safetensors'} cannot be read: "
                                            ".*; rerun the `quept quantize` command that made "
                                            "it"):
        quept.load(folder)


# -- 5. a folder a running `quept quantize` is writing -------------------------------------------

def test_readers_name_a_folder_a_running_quantize_is_writing(root, capsys, monkeypatch):
    from quept.calib import loop
    from quept.outputs import busy, writing

    out = root / "running"

    def stop_in_block_1(self, i, *args, **kw):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, *args, **kw)

    real = loop.BlockCalibrator._train
    with monkeypatch.context() as m:
        m.setattr(loop.BlockCalibrator, "_train", stop_in_block_1)
        assert main(quick_quantize(root, out)) == 130
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "the same `quept quantize` command resumes at block 1" in capsys.readouterr().out
    replaced = copy(root, "el", "being-replaced")
    eval_argv = ["--bits", "4", "--text", str(root / "text.txt"), "--windows", "1",
                 "--seq-len", "16"]
    with writing(out, "quept quantize"), writing(replaced, "quept quantize"):  # as a run holds it
        assert busy(out) and busy(replaced)
        assert main(["info", str(out)]) == 0
        assert "a running `quept quantize` is calibrating block 1 now" in capsys.readouterr().out
        assert main(["info", str(replaced)]) == 2
        assert "has not finished its first block yet" in capsys.readouterr().err
        for folder in (out, replaced):
            assert main(["eval", str(folder), *eval_argv]) == 2
            assert (f"{folder} is being written by a running `quept quantize` right now"
                    in capsys.readouterr().err)
    assert not busy(out) and main(["eval", str(replaced), *eval_argv]) == 0  # released
