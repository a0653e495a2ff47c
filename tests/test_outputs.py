"""One writer per output folder (quept.outputs): a second writer is refused while the first holds
the folder, and a folder made for a run that wrote nothing is not left behind."""

import sys

import pytest

from quept.outputs import FolderBusyError, writing

posix = pytest.mark.skipif(sys.platform == "win32", reason="the folder lock needs fcntl")


@posix
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "out"
    with writing(out, "quept quantize"):
        (out / "progress.json").write_text("{}")
        with pytest.raises(FolderBusyError, match="is being written by another quept quantize"):
            with writing(out, "quept quantize"):
                pass
    with writing(out, "quept quantize"):  # released when the first block ended
        pass
    assert (out / "progress.json").is_file()


def test_a_folder_the_run_made_and_left_empty_is_removed(tmp_path):
    made, kept = tmp_path / "made", tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError, match="model load failed"):
        with writing(made, "quept quantize"):
            assert made.is_dir()
            raise RuntimeError("model load failed")
    with writing(kept, "quept quantize"):
        pass
    assert not made.exists() and kept.is_dir()


@posix
def test_a_file_system_without_locks_is_written_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with writing(tmp_path / "out", "quept quantize") as out:
        (out / "block.safetensors").write_text("x")
    assert "cannot be locked" in caplog.text and (tmp_path / "out" / "block.safetensors").is_file()
