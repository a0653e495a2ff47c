"""Default text: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``.

The package stores each novel as an R character vector (one element per line,
empty strings for blank lines) in the lazy-load database ``data/Rdata.rdx`` /
``data/Rdata.rdb``.  We read it in pure Python with the ``rdata`` package and
cache the novels as UTF-8 text files (lines joined with ``"\\n"``).

Calibration uses every novel except *Pride & Prejudice*; evaluation uses
*Pride & Prejudice*.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import shutil
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

from quept.data.fetch import (
    DataUnavailableError,
    atomic_dir,
    read_deb_folder,
    resolve_cache_dir,
)

logger = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DIRNAME = "austen"
_R_DATA_DIR = Path("usr/lib/R/site-library/janeaustenr/data")

# R object name -> title, in the package's (publication) order.
NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
EVALUATION_TITLE = "Pride & Prejudice"
CALIBRATION_TITLES: tuple[str, ...] = tuple(t for t in NOVELS.values() if t != EVALUATION_TITLE)

# How a novel's lines are joined into one text.  Checked against a reference
# perplexity measurement (see the project notes): a plain newline join.
LINE_JOIN = "\n"
# How novels are joined into the calibration text.
NOVEL_JOIN = "\n\n"

_HINT = (
    f"Install it with `apt-get install {DEB_PACKAGE}` (or put its .deb into "
    "<cache>/debs/), or pass your own text files (--text FILE)."
)


# --------------------------------------------------------------------------- R lazy-load format


def decode_lazyload_blob(blob: bytes) -> bytes:
    """Decompress one entry of an R lazy-load ``.rdb`` file.

    An entry is a 4-byte big-endian uncompressed length followed by a zlib
    stream; newer R versions may instead put a type byte after the length
    (``'Z'`` xz, ``'2'`` bzip2, ``'1'`` zlib, ``'0'`` stored).
    """
    if len(blob) < 5:
        raise ValueError(f"lazy-load entry too short ({len(blob)} bytes)")
    (size,) = struct.unpack(">I", blob[:4])
    kind, body = blob[4:5], blob[5:]
    if kind == b"Z":
        data = lzma.decompress(body)
    elif kind == b"2":
        data = bz2.decompress(body)
    elif kind == b"1":
        data = zlib.decompress(body)
    elif kind == b"0":
        data = bytes(body)
    else:
        data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise ValueError(f"lazy-load entry: expected {size} bytes, got {len(data)}")
    return data


def _parse_r(data: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(data, extension=".rds")
        return rdata.conversion.convert(parsed)


def read_lazyload_db(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``.rdx`` index + ``.rdb`` data)."""
    raw_index = rdx.read_bytes()
    if raw_index[:2] == b"\x1f\x8b":
        raw_index = gzip.decompress(raw_index)
    index = _parse_r(raw_index)
    variables = {str(k): v for k, v in index["variables"].items()}
    out: dict[str, Any] = {}
    with open(rdb, "rb") as fh:
        for name, (offset, length) in variables.items():
            fh.seek(int(offset))
            out[name] = _parse_r(decode_lazyload_blob(fh.read(int(length))))
    return out


def _lines(obj: Any) -> list[str]:
    return ["" if s is None else str(s) for s in obj]


# --------------------------------------------------------------------------- getting the package


def _read_novels_from_r(data_dir: Path) -> dict[str, list[str]]:
    objects = read_lazyload_db(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    missing = [n for n in NOVELS if n not in objects]
    if missing:
        raise DataUnavailableError(f"{data_dir} lacks the novels {missing}.\n{_HINT}")
    return {name: _lines(objects[name]) for name in NOVELS}


# --------------------------------------------------------------------------- public API


def _austen_dir(cache_dir: Path | None) -> Path:
    cache = resolve_cache_dir(cache_dir)
    final = cache / AUSTEN_DIRNAME
    if all((final / f"{name}.txt").is_file() for name in NOVELS):
        return final
    if final.exists():
        shutil.rmtree(final)
    lines = read_deb_folder(DEB_PACKAGE, _R_DATA_DIR, "Rdata.rdx", cache, _read_novels_from_r,
                            hint=_HINT)
    with atomic_dir(final) as tmp:
        for name, novel in lines.items():
            # Lines never contain newlines, so "\n" keeps them recoverable exactly.
            (tmp / f"{name}.txt").write_text("\n".join(novel), encoding="utf-8", newline="")
    logger.info("cached the Austen novels in %s", final)
    return final


def austen_lines(cache_dir: Path | None = None) -> dict[str, list[str]]:
    """Return ``{title: lines}`` for the six novels (blank lines are empty strings)."""
    folder = _austen_dir(cache_dir)
    return {
        title: (folder / f"{name}.txt").read_text(encoding="utf-8").split("\n")
        for name, title in NOVELS.items()
    }


def austen_novels(cache_dir: Path | None = None) -> dict[str, str]:
    """Return ``{title: full text}`` for the six novels, in publication order."""
    return {title: LINE_JOIN.join(lines) for title, lines in austen_lines(cache_dir).items()}


def calibration_text(cache_dir: Path | None = None) -> str:
    """All novels except *Pride & Prejudice*, concatenated in publication order."""
    novels = austen_novels(cache_dir)
    return NOVEL_JOIN.join(novels[title] for title in CALIBRATION_TITLES)


def evaluation_text(cache_dir: Path | None = None) -> str:
    """The full text of *Pride & Prejudice*."""
    return austen_novels(cache_dir)[EVALUATION_TITLE]
