"""C++ kernels of :mod:`quept.ops`, compiled on first use.

The sources live in ``quept/ops/csrc`` (shipped with the package). A :class:`CppKernel` builds
one of them once per process through ``torch.utils.cpp_extension.load_inline`` (cached in the
torch extensions folder per machine, CPU capability and torch installation); where there is no
working compiler, or ``QUEPT_NO_KERNEL=1`` is set, it logs why and its callers use PyTorch
operations instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)


class CppKernel:
    """The C++ source ``source`` (a file of ``csrc``) exposing ``functions``, built as extension
    ``prefix`` the first time :meth:`load` is called; ``fallback`` (with one ``%s`` for the
    reason) is logged when it cannot be built."""

    def __init__(self, prefix: str, source: str, functions: list[str], fallback: str) -> None:
        self.prefix, self.source, self.functions, self.fallback = prefix, source, functions, fallback
        self.module: ModuleType | None = None
        self._tried = False
        self._lock = threading.Lock()

    def load(self) -> ModuleType | None:
        """The compiled module, built once (half a minute to a minute); None when it cannot be."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    text = read_source(self.source)
                except OSError as e:  # an install without the csrc folder
                    log.warning(self.fallback, e)
                else:
                    self.module = build(self.prefix, text, self.functions, self.fallback)
            return self.module


def read_source(name: str) -> str:
    """The text of the C++ source ``name`` in the package's ``csrc`` folder."""
    return (files("quept.ops") / "csrc" / name).read_text(encoding="utf-8")


def build(prefix: str, source: str, functions: list[str], fallback: str) -> ModuleType | None:
    """Compile C++ ``source`` exposing ``functions`` (``torch.utils.cpp_extension.load_inline``,
    cached in the torch extensions folder per machine, CPU capability and torch installation);
    None, after logging ``fallback % reason``, when ``QUEPT_NO_KERNEL=1`` is set or there is no
    working compiler.

    Concurrent builds wait for each other on an OS lock that dies with its holder, so a build
    killed half-way (Ctrl-C, a timeout) cannot leave torch's own lock file behind to make every
    later run wait forever: a lock file found while holding the OS lock is stale and removed."""
    if os.environ.get("QUEPT_NO_KERNEL") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # the torch installation is part of the name: two virtualenvs would otherwise rebuild
        # each other's copy (the compile line holds torch's include paths)
        where = hashlib.sha256(f"{torch.__version__}:{Path(torch.__file__).parent}".encode())
        name = (f"{prefix}_{platform.machine()}_{torch.backends.cpu.get_cpu_capability()}_"
                f"{where.hexdigest()[:8]}").lower()
        log.info("loading the %s CPU kernel (compiled once on first use)", prefix)
        with _build_lock(name) as folder:
            return load_inline(
                name=name, cpp_sources=[source], functions=functions,
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=None if folder is None else str(folder), verbose=False,
            )
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, no ninja, build error
        log.warning(fallback, e)
        return None


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[Path | None]:
    """Hold an exclusive ``fcntl`` lock on the build folder of extension ``name`` and yield the
    folder, after removing a ``lock`` file a killed build left there; yields None (torch's own
    locking alone) where the folder or ``fcntl`` is unavailable."""
    try:
        import fcntl

        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(_get_build_directory(name, verbose=False))
    except (ImportError, AttributeError, TypeError):
        yield None
        return
    with open(folder / "quept.flock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process compiling the %s kernel", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():  # every quept build takes the OS lock first: no live owner
                log.warning("removing %s, left by a kernel build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield folder
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
