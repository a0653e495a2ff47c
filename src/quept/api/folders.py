"""What a folder holds (the kinds of quept artifacts), checked before one is read or written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quept.calib import CHECKPOINT_DIR
from quept.calib.checkpoint import PROGRESS_JSON
from quept.config import ConfigError
from quept.export import compact as _compact
from quept.export.ct_format import is_compressed_tensors
from quept.export.onnx_format import ONNX_FILE
from quept.export.onnx_runtime import EXPORT_SUMMARY, is_onnx_folder
from quept.export.packed import PACKED_JSON, PACKED_WEIGHTS
from quept.outputs import UNFINISHED, busy, unfinished
from quept.search.plan import PLAN_FORMAT
from quept.search.sensitivity import CACHE_NAMES

ELASTIC_JSON = "quept.json"


ELASTIC_WEIGHTS = "elastic.safetensors"


FORMAT = "quept-elastic"


SWEEPS_JSON = "sweeps.json"
"""The in-context sweeps `quept plan` caches in an elastic folder."""


GGUF_MAGIC = b"GGUF"
"""The first bytes of every GGUF file."""


class ArtifactError(ValueError):
    """A folder is not a valid quept artifact, or does not match the model."""


def folder_kind(folder: str | os.PathLike) -> str:
    """"packed", "compact", "elastic", "compressed-tensors", "onnx" or "hf" (a plain Hugging
    Face model folder, or a folder holding none of these); "unfinished" for a folder whose
    writing was stopped before it ended (:func:`quept.outputs.marked`). "elastic" goes by the
    file name alone: reading checks that quept wrote it (:func:`quept.api.read_meta`), and
    a write refuses a folder whose quept.json it did not (:func:`holds_elastic_model`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise (NotADirectoryError if folder.exists() else FileNotFoundError)(
            not_a_folder(folder))
    if unfinished(folder) is not None:
        return "unfinished"
    for name, kind in ((PACKED_JSON, "packed"), (_compact.COMPACT_JSON, "compact"),
                       (ELASTIC_JSON, "elastic")):
        if (folder / name).is_file():
            return kind
    if is_onnx_folder(folder):
        return "onnx"
    return "compressed-tensors" if is_compressed_tensors(folder) else "hf"


def is_gguf(path: str | os.PathLike) -> bool:
    """``path`` is a file that starts as a GGUF file does."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def not_a_folder(path: str | os.PathLike) -> str:
    """Why ``path``, given where a model folder is read, is not one: it does not exist, it is
    a GGUF file (which llama.cpp runs), or it is another file."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder"
    if not path.exists():
        return f"{path} does not exist"
    if is_gguf(path) or path.suffix == ".gguf":
        return (f"{path} is a GGUF file, not a model folder: GGUF files run in llama.cpp (e.g. "
                f"llama-cli -m {path}), and `quept info {path}` reads what it holds")
    return (f"{path} is a file, not a folder: give a model folder (elastic, compact, packed, "
            "compressed-tensors, ONNX or Hugging Face)")


def holds_elastic_model(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a quept.json that quept wrote: a JSON object whose "format"
    is :data:`FORMAT` (a file of that name in another format is some other tool's)."""
    return _json_format(Path(folder) / ELASTIC_JSON) == FORMAT


def _json_format(path: Path) -> Any:
    """The "format" of the JSON object in the file ``path``; None for a missing, unreadable,
    oversized (:data:`_JSON_FILE_LIMIT`) or non-object file."""
    return (_json_object(path) or {}).get("format")


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in the file ``path``; None for a missing, unreadable, oversized
    (:data:`_JSON_FILE_LIMIT`) or non-object file."""
    try:
        if path.stat().st_size > _JSON_FILE_LIMIT:
            return None
        d = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def checkpoint_around(path: str | os.PathLike) -> Path | None:
    """The calibration checkpoint folder that ``path`` is or lies inside (where a link leads
    too): one named :data:`quept.calib.CHECKPOINT_DIR`, which `quept quantize` keeps in its
    --out folder, or one holding a checkpoint's progress.json (``next_block`` and
    ``fingerprint``; a checkpoint_dir of ``quept.calibrate``'s own naming); None for none."""
    path = Path(path)
    for p in dict.fromkeys((path, path.resolve())):
        for q in (p, *p.parents):
            if q.name == CHECKPOINT_DIR or {"next_block", "fingerprint"} <= set(
                    _json_object(q / PROGRESS_JSON) or {}):
                return q
    return None


def check_not_in_checkpoint(out: str | os.PathLike, what: str, flag: str = "") -> None:
    """Refuse to write ``what`` ("an elastic model written") at ``out`` where it is, or lies
    inside, a calibration checkpoint folder (:func:`checkpoint_around`): the calibration
    deletes that folder with every file in it when it ends, so what is written there would be
    lost."""
    ckpt = checkpoint_around(out)
    if ckpt is None:
        return
    where = "is" if Path(out).resolve() == ckpt.resolve() else f"lies inside {ckpt},"
    whose = (f"the calibration checkpoint folder of `quept quantize --out {ckpt.parent}`, "
             "which deletes it" if ckpt.name == CHECKPOINT_DIR else
             f"a calibration checkpoint folder (it holds {PROGRESS_JSON}), which "
             "CalibCheckpoint.clear() deletes")
    raise ConfigError(f"{flag}{out} {where} {whose}, with every file in it, when the "
                      f"calibration ends; {what} there would be lost with it: give a folder "
                      f"outside {ckpt}")


KIND_NAMES = {"elastic": "an elastic model", "compact": "a compact checkpoint",
              "packed": "a packed model", "compressed-tensors": "a compressed-tensors export",
              "onnx": "an ONNX export", "hf": "a Hugging Face model",
              "unfinished": "an unfinished write"}
"""Each :func:`folder_kind` in words, as messages name what a folder holds."""


QUEPT_FILES = {"elastic": (ELASTIC_JSON, ELASTIC_WEIGHTS, "lora_u", "quept quantize"),
               "compact": (_compact.COMPACT_JSON, _compact.COMPACT_WEIGHTS, "master",
                           "quept compact"),
               "packed": (PACKED_JSON, PACKED_WEIGHTS, "qweight", "quept export")}
"""Per :func:`folder_kind` of the folders quept writes with quantized (or elastic) layers: its
JSON, its weights file, the tensor that file holds of every layer the JSON lists, and the
command that writes such a folder."""


HELD_NAMES = {**KIND_NAMES, "foreign": f"a {ELASTIC_JSON} that quept did not write"}
"""Each :func:`holds_model` in words."""


def readable_kind(folder: str | os.PathLike) -> str:
    """The :func:`folder_kind` of a folder about to be read; one whose writing was stopped, and
    an export that lacks one of its files (:func:`check_export_files`), are refused by name."""
    kind = folder_kind(folder)
    if kind == "unfinished":
        check_finished(folder)
    check_export_files(Path(folder), kind)
    return kind


EXPORT_KINDS = ("packed", "compressed-tensors", "onnx")
"""The :func:`folder_kind` of the exports, which quept writes with the model's tokenizer."""


TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt")
"""The files one of which a tokenizer beside its tokenizer_config.json is read from (the
fast tokenizer's tokenizer.json, which quept's exports hold, or a slow one's vocabulary)."""


def check_export_files(folder: Path, kind: str) -> None:
    """Refuse an export of ``kind`` that lacks a file it was written with, by the file: an
    ONNX export without its graph or its summary (which :func:`folder_kind` takes for a
    Hugging Face folder), an export whose tokenizer has its config but not its vocabulary
    (which transformers would fail on with advice to install other packages)."""
    if kind == "hf":
        missing = _onnx_file_missing(folder)
        if missing is not None:
            raise ArtifactError(f"{folder} is a damaged ONNX export: {missing} is missing "
                                f"({_ONNX_FILES[missing.name]}); export it again with `quept "
                                "export --format onnx`")
    if (kind in EXPORT_KINDS and (folder / "tokenizer_config.json").is_file()
            and not any((folder / f).is_file() for f in TOKENIZER_VOCABS)):
        raise ArtifactError(f"{folder / 'tokenizer.json'} is missing (the folder is damaged; "
                            "export it again)")


_ONNX_FILES = {ONNX_FILE: "the graph ONNX Runtime runs",
               EXPORT_SUMMARY: "the summary that says how quept runs the graph"}


def _onnx_file_missing(folder: Path) -> Path | None:
    """The file an ONNX export in ``folder`` lacks: its summary beside a graph (in a folder
    holding no safetensors weights, which a Hugging Face folder with an ONNX copy does), or
    its graph beside a summary that names the ONNX format; None for neither."""
    if (folder / ONNX_FILE).is_file() and not any(folder.glob("*.safetensors")):
        return folder / EXPORT_SUMMARY
    if _json_format(folder / EXPORT_SUMMARY) == "onnx":
        return folder / ONNX_FILE
    return None


def check_finished(folder: str | os.PathLike, advice: str = "") -> None:
    """Refuse a folder whose writing was stopped before it ended (:func:`quept.outputs.marked`)
    by what it was being written with, ``advice`` ending the message."""
    what = unfinished(folder)
    if what is not None:
        raise ArtifactError(f"{folder} holds {what} whose writing was stopped before it ended; "
                            "run the command that wrote it again (same --out), or delete the "
                            "folder" + (f"; {advice}" if advice else ""))


BUSY = ("{folder} is being written by a running `quept quantize` right now: wait for it to end "
        "(`quept info {folder}` shows how far its calibration got)")
"""The refusal of a folder a running writer holds (:func:`quept.outputs.busy`)."""


def model_kind(folder: str | os.PathLike, advice: str = "") -> str:
    """The :func:`readable_kind` of a folder a model is read from; a folder that holds no
    model (an unfinished calibration, plans, or nothing quept or Hugging Face reads) is
    refused by what it does hold, ``advice`` ending the message of an empty one."""
    if Path(folder).is_dir() and busy(folder):
        raise ArtifactError(BUSY.format(folder=folder))
    kind = readable_kind(folder)
    folder = Path(folder)
    if kind != "hf" or (folder / "config.json").is_file():
        return kind
    if (folder / CHECKPOINT_DIR / PROGRESS_JSON).is_file():
        raise ArtifactError(
            f"{folder} holds an unfinished calibration (its {CHECKPOINT_DIR}), not a model yet: "
            "run the same `quept quantize` command again to resume it (`quept info "
            f"{folder}` shows how far it got)")
    if any(_is_plan_file(f) for f in folder.glob("*.json")):
        raise ArtifactError(f"{folder} holds plans from `quept plan`, not a model; give the "
                            "elastic folder they were made for, with --plan PLAN.json")
    raise ArtifactError(f"{folder} holds no model: none of {ELASTIC_JSON} (an elastic folder), "
                        f"{_compact.COMPACT_JSON} (a compact checkpoint), {PACKED_JSON} (a "
                        "packed model), an ONNX export or config.json (a Hugging Face model)"
                        + (f"; {advice}" if advice else ""))


def check_out_folder(out: str | os.PathLike, writes: str, flag: str = "", *,
                     source: str | os.PathLike | None = None) -> None:
    """Refuse to write ``writes`` (a :func:`folder_kind` name) into ``out`` when it holds a
    model of another kind, which writing there would spoil; a folder of the same kind is
    replaced, and a folder holding no model (only a calibration checkpoint, say) is used.
    ``writes`` "gguf" is a file instead: :func:`check_out_file`. Nothing is written inside
    the ``source`` folder being read (:func:`check_outside`)."""
    if writes == "gguf":
        check_out_file(out, flag, source=source)
        return
    out = Path(out)
    check_not_in_checkpoint(out, f"{KIND_NAMES[writes]} written", flag)
    check_outside(out, source, flag)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}{out} is a file; {KIND_NAMES[writes]} is written as a "
                          "folder: give a folder's path")
    held = holds_model(out)
    if held == "foreign":
        raise ConfigError(f"{flag}{out} holds a {ELASTIC_JSON} that quept did not write (not a "
                          f"JSON object with \"format\": \"{FORMAT}\"); writing "
                          f"{KIND_NAMES[writes]} there would overwrite or mix with it: give "
                          "another folder (or move that file away)")
    if held not in (None, writes, "unfinished"):
        raise ConfigError(f"{flag}{out} holds {KIND_NAMES[held]}; writing "
                          f"{KIND_NAMES[writes]} there would mix the two and spoil it; give "
                          "another folder")


def check_out_file(out: str | os.PathLike, flag: str = "", *,
                   source: str | os.PathLike | None = None) -> None:
    """Refuse to write a GGUF file at ``out`` where it would spoil something: a folder (or a
    path ending with a separator, which names one), a path inside the ``source`` folder being
    read, or an existing file that is not a GGUF file (an earlier GGUF export is replaced)."""
    if os.fspath(out).endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise ConfigError(f"{flag}{out} ends with a path separator, which names a folder; a "
                          "GGUF export is one file: give the path of the file to write, e.g. "
                          f"{Path(out) / 'model.gguf'}")
    out = Path(out)
    check_not_in_checkpoint(out, "a GGUF file written", flag)
    if out.is_dir():
        raise ConfigError(f"{flag}{out} is a folder; give the path of the file to write there, "
                          f"e.g. {out / 'model.gguf'}")
    check_outside(out, source, flag)
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{flag}{out} cannot be written: {above} is a file, not a folder")
    if out.exists() and not is_gguf(out):
        raise ConfigError(f"{flag}{out} is a file that is not a GGUF file; writing the GGUF "
                          "export there would replace it: give another path (or delete it "
                          "first)")


def check_outside(out: str | os.PathLike, source: str | os.PathLike | None,
                  flag: str = "") -> None:
    """Refuse an ``out`` that is, or lies inside, the ``source`` folder being read (where
    given), whose files a write there would mix with or replace."""
    if source is None or not Path(source).is_dir():
        return
    out_path, src = Path(out).resolve(), Path(source).resolve()
    if out_path == src:
        raise ConfigError(f"{flag}{out} is the folder being read; give another folder")
    if out_path.is_relative_to(src):
        raise ConfigError(f"{flag}{out} is inside {source}, the folder being read; give a path "
                          "outside it")


ARTIFACT_FILES = frozenset({
    ELASTIC_JSON, ELASTIC_WEIGHTS, PACKED_JSON, _compact.COMPACT_JSON, SWEEPS_JSON,
    *CACHE_NAMES.values(),
    UNFINISHED, "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "preprocessor_config.json", "quept-export.json", "genai_config.json",
    "quept_source.json", "progress.json", "model.onnx",
})
"""The names of the files quept artifact folders hold (or cache), which :func:`check_plan_out`
keeps a plan from taking there; with every name ending in one of :data:`ARTIFACT_SUFFIXES`."""


ARTIFACT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".onnx", ".onnx.data", ".data",
                     ".bin", ".gguf", ".pt", ".pth")


_JSON_FILE_LIMIT = 1 << 26
"""Bytes above which a file is taken for no plan, and a quept.json for none quept wrote,
without reading it (either, for a model with tens of thousands of linears, is a few MB)."""


def holds_model(folder: Path) -> str | None:
    """The :func:`folder_kind` of ``folder`` when it holds a quept artifact (an unfinished one
    too) or a Hugging Face model with its ``config.json``; "foreign" for a quept.json quept
    did not write (:func:`holds_elastic_model`); None for a missing or empty folder, or one
    holding no model (only a calibration checkpoint, say)."""
    if not folder.is_dir():
        return None
    held = folder_kind(folder)
    if held == "elastic" and not holds_elastic_model(folder):
        return "foreign"
    return held if held != "hf" or (folder / "config.json").is_file() else None


def _is_plan_file(path: Path) -> bool:
    """Whether the file ``path`` is a plan `quept plan` wrote: a JSON object whose "format" is
    :data:`quept.search.plan.PLAN_FORMAT`."""
    return _json_format(path) == PLAN_FORMAT


def check_plan_out(path: str | os.PathLike, flag: str = "") -> None:
    """Refuse to write a plan to the file ``path`` where it would spoil something: a name the
    artifact in its folder keeps for its own files (:data:`ARTIFACT_FILES`, the weights, the
    sensitivity and sweeps caches), there or not yet, or an existing file that is not a plan;
    an earlier plan file is replaced. ``flag`` ("--out ") starts the message."""
    path = Path(path)
    check_not_in_checkpoint(path, "a plan written", flag)
    for p in dict.fromkeys((path, path.resolve())):  # and where a link leads
        held = holds_model(p.parent)
        if held is not None and (p.name in ARTIFACT_FILES
                                 or p.name.endswith(ARTIFACT_SUFFIXES)):
            raise ConfigError(f"{flag}{path}: {p.parent} holds {HELD_NAMES[held]}, which keeps "
                              f"the name {p.name} for its own files; writing the plan there "
                              f"would spoil it; give the plan another name, e.g. "
                              f"{path.parent / 'plan.json'}")
    if path.is_dir():
        raise ConfigError(f"{flag}{path} is a folder; a plan is written as a file: give a "
                          "file's path (PLAN.json)")
    if path.exists() and not _is_plan_file(path):
        raise ConfigError(f"{flag}{path} is a file that is not a quept plan; writing the plan "
                          "there would overwrite it; give another file name (a plan file "
                          "`quept plan` wrote is replaced)")


def check_plans_folder(folder: str | os.PathLike, files: list[Path], flag: str = "") -> None:
    """Refuse to write the plans ``files`` into ``folder`` when it holds a model (they would
    mix with its files), or where :func:`check_plan_out` refuses one of them."""
    folder = Path(folder)
    held = holds_model(folder)
    if held is not None:
        raise ConfigError(f"{flag}{folder} holds {HELD_NAMES[held]}; writing {len(files)} "
                          f"plans there would mix them with its files; give another folder")
    for f in files:
        check_plan_out(f, flag)
