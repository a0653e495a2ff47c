"""Loading user-supplied text for calibration or evaluation."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from quept.data.hub import DATASETS, hub_text, is_hub_text

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
TEXT_JOIN = "\n\n"
BOM = "\ufeff"  # the byte-order mark some editors put first in a UTF-8 file
_ACCEPTED = (
    "plain text files (.txt or any other suffix but .json, read whole) and JSON-lines "
    'files (.jsonl/.ndjson, one object per line with a string field "text"), or the hub texts '
    f"{', '.join(DATASETS)} and hf:REPO[:CONFIG][@SPLIT] (the datasets package and the "
    "Hugging Face hub or its cache)"
)


def _is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    return bool(suffixes) and (
        suffixes[-1] in JSONL_SUFFIXES or suffixes[-2:] == [".json", ".lines"]
    )


def _jsonl_texts(path: Path, content: str) -> list[str]:
    """The ``"text"`` field of every non-blank line of a JSON-lines file's ``content``."""
    texts: list[str] = []
    for lineno, line in enumerate(io.StringIO(content, newline=None), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'{path}, line {lineno}: expected an object with a "text" field')
        value = record["text"]
        if not isinstance(value, str):
            raise ValueError(
                f'{path}, line {lineno}: "text" must be a string, got {type(value).__name__}'
            )
        texts.append(value)
    return texts


def _check_text_path(path: Path) -> None:
    """``path`` names something a text can be read from: it exists and is no folder (a pipe
    such as ``<(cat eval.txt)`` or a device file is taken), and it is not a ``.json`` file,
    which would be read whole, brackets and all."""
    if not path.exists():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist; accepted are "
                                f"{_ACCEPTED}")
    if path.is_dir():
        raise FileNotFoundError(f"text file {str(path)!r} is a directory, not a file; accepted "
                                f"are {_ACCEPTED}")
    if path.suffix.lower() == ".json":
        raise ValueError(
            f"text file {str(path)!r} is a .json file, which would be read as plain text, "
            'brackets and all: text files are .txt (plain text) or .jsonl (one {"text": ...} '
            "object per line); a JSON array of strings converts with "
            f"jq -c '.[] | {{text: .}}' {path.name} > {path.stem}.jsonl")


def _read_text_file(path: Path) -> str:
    """The whole of ``path`` as UTF-8 text, read once (a pipe gives its bytes only once),
    without a leading byte-order mark (which some editors write, and which is no text)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"text file {str(path)!r} exists but cannot be read ({e.strerror or e}); "
                      "give a readable text file") from None
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8(path, e)) from None


def names_hub_text(item: str | Path) -> bool:
    """Whether a text argument names a hub text rather than a file: a file of that name wins."""
    return not Path(item).expanduser().exists() and is_hub_text(str(item))


def load_texts(paths: Sequence[str | Path], role: str = "calib") -> str:
    """Read and concatenate (with ``"\\n\\n"``) the texts in ``paths``.

    ``.jsonl``/``.ndjson``/``.json.lines`` files contribute the ``"text"`` field of every
    non-blank line; every other file (a pipe such as ``<(cat a.txt)`` too, read once) is read
    whole as UTF-8 text, a leading byte-order mark dropped; a ``.json`` file is refused, as it
    would be read brackets and all. A name that is no file but a hub text (``wikitext2``,
    ``c4``, ``hf:REPO[:CONFIG][@SPLIT]``, :mod:`quept.data.hub`) is read from its split for
    ``role`` ("calib" or "eval").
    Raises ``FileNotFoundError`` for a missing file, ``OSError`` for one that cannot be read
    and ``ValueError`` for a ``.json`` file, a malformed JSON-lines record (naming the file
    and line) or a file with no text (empty, or only whitespace), which would calibrate or
    evaluate on nothing.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError(f"no text files given; accepted are {_ACCEPTED}")
    pieces: list[str] = []
    for item in paths:
        if names_hub_text(item):
            pieces.append(hub_text(str(item), role))
            continue
        path = Path(item).expanduser()
        _check_text_path(path)
        content = _read_text_file(path)
        if _is_jsonl(path):
            texts = _jsonl_texts(path, content)
            logger.info("read %d records from %s", len(texts), path)
        else:
            texts = [content]
            logger.info("read %s", path)
        if not any(t.strip() for t in texts):
            what = "empty" if not any(texts) else "only whitespace"
            records = ' (no record with a non-blank "text")' if _is_jsonl(path) else ""
            raise ValueError(f"text file {str(path)!r} holds no text: it is {what}{records}; "
                             f"give a file with the text to "
                             f"{_USE.get(role, 'calibrate or evaluate')} on")
        pieces.extend(texts)
    return TEXT_JOIN.join(pieces)


_USE = {"calib": "calibrate", "eval": "evaluate"}


def _not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    """Why ``path`` cannot be read as text: ``e``, its first byte that is not UTF-8, and
    where."""
    return (f"text file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
            f"offset {e.start}); a text in another encoding can be converted first, e.g. with "
            "iconv -t UTF-8")


SAMPLE_EVERY = 8
"""About one paragraph in this many is kept in a text's :func:`paragraph_sample`."""
_MIN_PARAGRAPH = 40  # characters; shorter paragraphs (headings, "Yes.") recur in any text


def paragraph_hashes(text: str) -> set[str]:
    """A short hash of every paragraph of ``text`` (blank-line separated, its whitespace
    collapsed) of at least 40 characters."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return {hashlib.sha256(p.encode()).hexdigest()[:12] for p in paragraphs
            if len(p) >= _MIN_PARAGRAPH}


def _sampled(h: str, every: int) -> bool:
    return int(h, 16) % every == 0


def paragraph_sample(hashes: Iterable[str]) -> list[str]:
    """About one in :data:`SAMPLE_EVERY` of a text's :func:`paragraph_hashes`, chosen by the
    hash itself, so that two texts sample exactly the paragraphs they share: kept with a
    model, the sample of its calibration text later tells how much of an evaluation text the
    calibration saw (:func:`shared_fraction`), in a few kilobytes."""
    return sorted(h for h in hashes if _sampled(h, SAMPLE_EVERY))


def shared_fraction(text: str, hashes: Iterable[str], every: int = 1) -> float | None:
    """The share of ``text``'s paragraphs that are also in another text, given that text's
    :func:`paragraph_hashes` (``every=1``) or its :func:`paragraph_sample`
    (``every=SAMPLE_EVERY``; then estimated on ``text``'s sampled paragraphs). None when
    ``text`` has no paragraph to compare (none long enough, or none in the sample's range)."""
    mine = [h for h in paragraph_hashes(text) if _sampled(h, every)]
    if not mine:
        return None
    other = set(hashes)
    return sum(h in other for h in mine) / len(mine)
