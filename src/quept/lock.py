"""One writer per output folder: a second long run into a folder another run is writing (the
same `quept quantize` started twice, say) is refused at once instead of resuming the same
checkpoint and writing over the first run's blocks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    except ImportError:  # not POSIX
        fcntl = None
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusyError(
                    f"{folder} is being written by another {command} (a second run into it "
                    "would write over the first one's blocks); wait for it to end, or give "
                    "another --out") from None
        yield folder
    finally:
        os.close(fd)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
