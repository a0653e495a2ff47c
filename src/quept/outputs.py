"""Output folders written safely. One writer per folder: a second long run into a folder
another run is writing (the same `quept quantize` started twice, say) is refused at once
instead of resuming the same checkpoint and writing over the first run's blocks
(:func:`writing`). And a write stopped half way (Ctrl-C, a crash, a full disk) is known as
such: the folder is written under a marker made before its first file and removed after its
last (:func:`marked`), which readers refuse by name (:func:`unfinished`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class FolderBusyError(RuntimeError):
    """Another process is writing the folder."""


@contextmanager
def writing(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this process while the block runs: an advisory
    lock on the folder itself, released when the block ends or the process dies. A folder
    another process holds raises :class:`FolderBusyError` naming ``command``. A folder this
    call created and the block left empty is removed again. Where the platform has no
    ``fcntl`` (Windows) the folder is not locked."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    fd = None if fcntl is None else os.open(folder, os.O_RDONLY)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusyError(
                    f"{folder} is being written by another {command} (a second run into it "
                    "would write over the first one's blocks); wait for it to end, or give "
                    "another --out") from None
            except OSError as e:  # a file system without locks (some network mounts)
                log.warning("%s cannot be locked (%s): a second run into it would not be "
                            "stopped", folder, e)
        yield folder
    finally:
        if fd is not None:
            os.close(fd)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

def busy(folder: str | os.PathLike) -> bool:
    """Whether another writer holds ``folder`` (:func:`writing`) right now, so that what it
    holds is still being written; False where the folder does not exist or cannot be locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock to ask
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return False
    finally:
        os.close(fd)


UNFINISHED = ".quept-unfinished"
"""The marker file of a folder being written (:func:`marked`); it holds what is written."""


def unfinished(folder: str | os.PathLike) -> str | None:
    """What ``folder`` was being written with when its writing stopped (its marker's words,
    "a packed model"), or None where it holds no marker."""
    marker = Path(folder) / UNFINISHED
    return (marker.read_text().strip() or "a model") if marker.is_file() else None


@contextmanager
def marked(out: str | os.PathLike, what: str) -> Iterator[Path]:
    """Write the folder ``out`` (created if missing) under the :data:`UNFINISHED` marker
    holding ``what`` ("a packed model"): made before the first file, removed after the last,
    so a write stopped half way leaves a folder readers refuse by name and the next write of
    it replaces, not one that passes for a Hugging Face model by the config.json it already
    holds. A write that stops before it changed any file (a bad argument the writer found)
    takes the marker away again, and the folder where it made it."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    marker = out / UNFINISHED

    def files() -> dict[str, tuple[int, int]]:
        return {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in out.iterdir()
                if f.name != UNFINISHED}

    before = files()
    marker.write_text(what)
    try:
        yield out
    except BaseException:
        if files() == before:
            marker.unlink()
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    marker.unlink()
