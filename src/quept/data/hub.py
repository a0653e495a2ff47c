"""Models and texts from the Hugging Face hub (or its local cache), for real-size work.

Text names accepted wherever quept takes text files (``--calib-text``, ``--eval-text``,
``--text``), each read through the ``datasets`` package (the ``hub`` extra):

- ``wikitext2``: Salesforce/wikitext, config wikitext-2-raw-v1; calibration draws from the train
  split (its first ~8M characters), evaluation reads the whole test split, its lines joined
  with blank lines (the protocol of GPTQ, OmniQuant and the QuEPT paper).
- ``c4``: allenai/c4, English; calibration draws from the first train shard (documents in a
  seeded order, about 8M characters), evaluation reads the first 1,100 documents of the first
  validation shard joined with spaces (GPTQ's C4 protocol).
- ``hf:REPO[:CONFIG][@SPLIT]``: any dataset with a string ``text`` column; calibration reads the
  train split (its first ~8M characters), evaluation the whole test split (else validation),
  unless ``@SPLIT`` names one.

A model given as ``OWNER/NAME`` that is not a local folder is fetched with
``huggingface_hub.snapshot_download``: its JSON files, tokenizer files and safetensors weights
only. A repository with pickled weights alone is refused: quept never unpickles.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quept.data.fetch import DataUnavailableError

logger = logging.getLogger(__name__)

ROLES = ("calib", "eval")
CALIB_CHARS = 8_000_000  # text kept for calibration from a large split (~2M tokens)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_PREFIX = "hf:"


@dataclass(frozen=True)
class HubText:
    """Where one named text lives on the hub and how its documents become one text."""

    repo: str
    config: str | None = None
    splits: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"calib": ("train",), "eval": ("test", "validation")})
    data_files: dict[str, str] = field(default_factory=dict)  # split -> file in the repo
    join: dict[str, str] = field(default_factory=lambda: {"calib": "\n\n", "eval": "\n\n"})
    max_docs: dict[str, int] = field(default_factory=dict)  # role -> first N documents
    shuffle_calib: bool = False  # documents in a seeded order before the character cap
    column: str = "text"


DATASETS: dict[str, HubText] = {
    "wikitext2": HubText(
        "Salesforce/wikitext", "wikitext-2-raw-v1",
        splits={"calib": ("train",), "eval": ("test",)},
        join={"calib": "\n\n", "eval": "\n\n"}),
    "c4": HubText(
        "allenai/c4", None,
        splits={"calib": ("train",), "eval": ("validation",)},
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"},
        join={"calib": "\n\n", "eval": " "}, max_docs={"eval": 1100}, shuffle_calib=True),
}


def is_hub_text(name: str) -> bool:
    """Whether ``name`` names a hub text (a :data:`DATASETS` key or ``hf:REPO...``)."""
    return name in DATASETS or name.startswith(_HF_PREFIX)


def parse_hub_text(name: str) -> tuple[HubText, str | None]:
    """(source, split given with ``@SPLIT`` or None) for a hub text name."""
    if name in DATASETS:
        return DATASETS[name], None
    if not name.startswith(_HF_PREFIX):
        raise ValueError(f"{name!r} is not a hub text: use {', '.join(DATASETS)} or "
                         "hf:REPO[:CONFIG][@SPLIT]")
    body, _, split = name[len(_HF_PREFIX):].partition("@")
    repo, _, config = body.partition(":")
    if not _REPO_ID.match(repo) or (split == "" and name.endswith("@")):
        raise ValueError(f"{name!r}: expected hf:OWNER/NAME[:CONFIG][@SPLIT], e.g. "
                         "hf:NeelNanda/pile-10k or hf:Salesforce/wikitext:wikitext-2-raw-v1@test")
    return HubText(repo, config or None), split or None


def hub_text(name: str, role: str, seed: int = 0) -> str:
    """The text ``name`` names, for ``role`` "calib" (training split, capped at about
    :data:`CALIB_CHARS` characters) or "eval" (the evaluation split, whole or its first
    documents), as one string."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    source, split = parse_hub_text(name)
    rows, split = _load_rows(name, source, (split,) if split else source.splits[role])
    if source.column not in rows.column_names:
        raise ValueError(f"{name} ({source.repo}, split {split}) has no {source.column!r} column; "
                         f"it has {', '.join(rows.column_names)}")
    order = list(range(len(rows)))
    if role == "calib" and source.shuffle_calib:
        random.Random(seed).shuffle(order)
    if role in source.max_docs:
        order = order[: source.max_docs[role]]
    docs, chars = [], 0
    for i in order:
        doc = rows[i][source.column]
        if not isinstance(doc, str):
            raise ValueError(f"{name} ({source.repo}, split {split}): row {i} of "
                             f"{source.column!r} is {type(doc).__name__}, not text")
        docs.append(doc)
        chars += len(doc)
        if role == "calib" and chars >= CALIB_CHARS:
            break
    text = source.join[role].join(docs)
    logger.info("read %d documents (%d characters) of %s, split %s", len(docs), len(text), name,
                split)
    return text


def _load_rows(name: str, source: HubText, splits: tuple[str, ...]) -> tuple[Any, str]:
    try:
        import datasets
    except ImportError as e:
        raise DataUnavailableError(f"the text {name!r} is read with the `datasets` package: "
                                   "pip install -e '.[hub]'") from e
    errors = []
    for split in splits:
        files = ({split: source.data_files[split]} if split in source.data_files else None)
        try:
            rows = datasets.load_dataset(source.repo, source.config, split=split,
                                         data_files=files)
        except ValueError as e:  # an unknown split: try the next one
            errors.append(f"split {split}: {e}")
            continue
        except Exception as e:  # the hub unreachable, the repo or config unknown, ...
            raise DataUnavailableError(
                f"could not read {name!r} ({source.repo}"
                + (f", config {source.config}" if source.config else "")
                + f", split {split}) from the Hugging Face hub or its cache: "
                f"{type(e).__name__}: {e}. Without the hub, pass text files instead") from e
        return rows, split
    raise DataUnavailableError(f"{name!r} ({source.repo}) has none of the splits "
                               f"{', '.join(splits)}: {'; '.join(errors)}")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id (OWNER/NAME)."""
    return bool(_REPO_ID.match(name))


def hub_model_dir(repo_id: str, revision: str | None = None) -> Path:
    """Local folder of hub model ``repo_id`` (fetched once into the hub's cache; with
    ``HF_HUB_OFFLINE=1`` only the cache is read): configs, tokenizer files and safetensors
    weights, never pickled ``.bin`` files."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DataUnavailableError(f"{repo_id} is not a local folder, and fetching it from the "
                                   "hub needs huggingface_hub: pip install -e '.[hf]'") from e
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    except Exception as e:  # offline, gated, unknown repo, ...
        raise DataUnavailableError(
            f"{repo_id} is not a local folder, and fetching it from the Hugging Face hub (or "
            f"its cache) failed: {type(e).__name__}: {e}. Pass a local folder saved with "
            "save_pretrained, or set HF_TOKEN for a gated model") from e
    if not (folder / "config.json").is_file():
        raise DataUnavailableError(f"{repo_id} on the hub has no config.json: not a "
                                   "transformers model")
    if not any(folder.glob("*.safetensors")):
        raise DataUnavailableError(
            f"{repo_id} on the hub has no safetensors weights (only pickled ones, which quept "
            "never loads); convert it with transformers' save_pretrained(safe_serialization="
            "True) and pass the folder")
    return folder
