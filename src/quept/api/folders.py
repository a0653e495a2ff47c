"""What a folder holds (the kinds of quept artifacts), checked before one is read or written."""

from __future__ import annotations

import os
from pathlib import Path

from quept.config import ConfigError
from quept.export import compact as _compact
from quept.export.ct_format import is_compressed_tensors
from quept.export.onnx_runtime import is_onnx_folder
from quept.export.packed import PACKED_JSON
from quept.outputs import unfinished

ELASTIC_JSON = "quept.json"


ELASTIC_WEIGHTS = "elastic.safetensors"


FORMAT = "quept-elastic"


class ArtifactError(ValueError):
    """A folder is not a valid quept artifact, or does not match the model."""


def folder_kind(folder: str | os.PathLike) -> str:
    """"packed", "compact", "elastic", "compressed-tensors", "onnx" or "hf" (a plain Hugging
    Face model folder, or a folder holding none of these); "unfinished" for a folder whose
    writing was stopped before it ended (:func:`quept.outputs.marked`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if unfinished(folder) is not None:
        return "unfinished"
    for name, kind in ((PACKED_JSON, "packed"), (_compact.COMPACT_JSON, "compact"),
                       (ELASTIC_JSON, "elastic")):
        if (folder / name).is_file():
            return kind
    if is_onnx_folder(folder):
        return "onnx"
    return "compressed-tensors" if is_compressed_tensors(folder) else "hf"


KIND_NAMES = {"elastic": "an elastic model", "compact": "a compact checkpoint",
              "packed": "a packed model", "compressed-tensors": "a compressed-tensors export",
              "onnx": "an ONNX export", "hf": "a Hugging Face model",
              "unfinished": "an unfinished write"}
"""Each :func:`folder_kind` in words, as messages name what a folder holds."""


def readable_kind(folder: str | os.PathLike) -> str:
    """The :func:`folder_kind` of a folder about to be read; one whose writing was stopped is
    refused by name."""
    kind = folder_kind(folder)
    if kind == "unfinished":
        raise ArtifactError(f"{folder} holds {unfinished(folder)} whose writing was stopped "
                            "before it ended; run the command that wrote it again (same "
                            "--out), or delete the folder")
    return kind


def check_out_folder(out: str | os.PathLike, writes: str, flag: str = "") -> None:
    """Refuse to write ``writes`` (a :func:`folder_kind` name) into ``out`` when it holds a
    model of another kind, which writing there would spoil; a folder of the same kind is
    replaced, and a folder holding no model (only a calibration checkpoint, say) is used."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}{out} is a file; {KIND_NAMES[writes]} is written as a "
                          "folder: give a folder's path")
    if not out.is_dir():
        return
    held = folder_kind(out)
    if held not in (writes, "unfinished") and (held != "hf" or (out / "config.json").is_file()):
        raise ConfigError(f"{flag}{out} holds {KIND_NAMES[held]}; writing "
                          f"{KIND_NAMES[writes]} there would mix the two and spoil it; give "
                          "another folder")
