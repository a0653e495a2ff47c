"""A write stopped half way (Ctrl-C, a crash, a full disk) leaves nothing that passes for a
model: an export or compact folder is marked until its last file is written, so readers refuse
it by name and the next write of it replaces it; a GGUF file appears only whole."""

from __future__ import annotations

import pytest

import quept
from quept.cli import main
from quept.outputs import UNFINISHED

from .tiny import TEXT, elastic_folder, hf_folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("unfinished")
    elastic_folder(root / "elastic", hf_folder(root / "base"))
    (root / "t.txt").write_text(TEXT * 4)
    return root


class Stopped(Exception):
    pass


def _stop(*args, **kwargs):
    raise Stopped("the disk is full")


@pytest.mark.parametrize("command, writer", [
    (["export", "--bits", "3"], "quept.export.packed.save_file"),
    (["compact"], "quept.export.compact.save_file"),
])
def test_a_stopped_write_is_refused_by_readers_and_replaced_by_the_next(
        root, capsys, monkeypatch, command, writer):
    out = root / f"{command[0]}-out"
    argv = [command[0], str(root / "elastic"), *command[1:], "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(writer, _stop)  # the weights file fails after config.json is written
        with pytest.raises(Stopped):
            main(argv)
    assert (out / UNFINISHED).is_file() and (out / "config.json").is_file()
    capsys.readouterr()
    for read in (["info", str(out)], ["eval", str(out), "--text", str(root / "t.txt"),
                                      "--windows", "1", "--seq-len", "16"]):
        assert main(read) == 2
        err = capsys.readouterr().err
        assert "whose writing was stopped before it ended; run the command that wrote it " \
               "again" in err, err
    with pytest.raises(quept.ArtifactError, match="whose writing was stopped"):
        quept.load_model(out)
    assert main(argv) == 0  # the same command replaces it
    assert not (out / UNFINISHED).exists()
    assert main(["info", str(out)]) == 0


def test_a_gguf_file_appears_only_whole(root, monkeypatch):
    pytest.importorskip("gguf")
    import gguf

    from quept.export import gguf as gguf_export

    model, _ = quept.load(root / "elastic")
    out = root / "model.gguf"
    seen = []

    def stop_after_the_header(writer):  # the header is on disk by now
        seen.extend(p.name for p in root.glob("model.gguf*"))
        raise Stopped("the disk is full")

    monkeypatch.setattr(gguf_export, "_add_tokenizer", lambda *args: None)
    monkeypatch.setattr(gguf.GGUFWriter, "write_kv_data_to_file", stop_after_the_header)
    with pytest.raises(Stopped):
        gguf_export.write_gguf(model, None, out, 3)
    assert seen == ["model.gguf.partial"]
    assert list(root.glob("model.gguf*")) == []


def test_a_write_refused_before_it_wrote_leaves_nothing(root):
    model, _ = quept.load(root / "elastic")
    out = root / "never"
    with pytest.raises(quept.ConfigError, match="bit-width 9 is outside"):
        quept.api.export(model, 9, out)
    assert not out.exists()
    kept = root / "kept"  # an earlier export, which a write that goes through replaces
    quept.api.export(model, 4, kept)
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with pytest.raises(quept.ConfigError, match="bit-width 9 is outside"):
        quept.api.export(model, 9, kept)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
