"""Validation and JSON-reading helpers shared by the whole package: the one error a bad value
raises (:class:`ConfigError`), checks of counts, bit-widths and device names, and the reading of
JSON objects whose fields are checked by kind. No torch modules (the device check imports torch
only when called) and no config objects: :mod:`quept.config` builds on these.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MIN_BITS = 2
MAX_BITS = 8


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what would be valid."""


def read_json_object(path: str | os.PathLike, error: Callable[[str], Exception]
                     ) -> dict[str, Any]:
    """The JSON object in the file ``path``. Where the file is missing, is not JSON or holds
    something else than an object, ``error(message)`` is raised, the message naming the file."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


JsonKind = type | tuple[type, ...]
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


def _json_name(kind: JsonKind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)


def is_json_kind(value: Any, kind: JsonKind) -> bool:
    """Whether a value read from JSON is of ``kind`` (a type or a tuple of types): ``float``
    takes any number, ``int`` an integer, neither a boolean."""
    for k in kind if isinstance(kind, tuple) else (kind,):
        if k in (int, float) and isinstance(value, bool):
            continue
        if isinstance(value, (int, float) if k is float else k):
            return True
    return False


def check_json_fields(d: Mapping[str, Any], fields: Mapping[str, JsonKind],
                      where: str | os.PathLike, error: Callable[[str], Exception],
                      optional: Mapping[str, JsonKind] | None = None) -> None:
    """Each key of ``fields`` is in ``d`` (an object read from the JSON file ``where``) with a
    value of its kind (:func:`is_json_kind`); each key of ``optional`` may be missing, and
    where present is checked the same way.
    A key that is missing or holds another kind raises ``error(message)`` naming the file,
    the key, what it holds and what it should hold."""
    for key, kind in {**fields, **(optional or {})}.items():
        if key not in d:
            if key in fields:
                raise error(f"{where} is damaged: it holds no {key!r}, which should be a JSON "
                            f"{_json_name(kind)}")
        elif not is_json_kind(d[key], kind):
            raise error(f"{where} is damaged: it holds a JSON {_json_name(type(d[key]))} as "
                        f"{key!r}, which should be a JSON {_json_name(kind)}")


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""The devices quept computes on (:func:`check_device`)."""


def check_device(device: str, what: str = "device") -> str:
    """Validate a torch device name that work is about to run on: it parses, it is one of
    :data:`DEVICE_TYPES` (not meta, which holds no data), and an accelerator it names is
    present (``what`` names the option in the message)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{what} {device!r} is not a device name (cpu, cuda, cuda:1, mps, "
                          f"...): {e}") from None
    if dev.type not in DEVICE_TYPES:
        why = (" (a meta tensor holds no data: nothing can be computed there)"
               if dev.type == "meta" else "")
        raise ConfigError(f"{what} {device!r}: quept computes on cpu, cuda (cuda:N) or mps, "
                          f"not {dev.type}{why}; pass --device cpu")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise ConfigError(f"{what} {device!r}: {why}; pass --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{what} {device!r}: only {n} CUDA device(s) here "
                              f"(cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what} {device!r}: MPS is not available here; pass --device cpu")
    return device


def check_count(value: object, what: str, low: int = 1) -> int:
    """``value`` as a whole number of at least ``low`` (a bool is not one); else a ConfigError
    naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{what} must be {wanted}, got {value!r}")
    return value


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 window", "8 windows"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_bits(bits: int, allowed: tuple[int, ...] | None = None) -> int:
    """Validate one bit-width (an integer in 2..8, or in ``allowed`` when given) and return
    it as a Python int (a NumPy integer is taken)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ConfigError(f"bit-width must be an integer, got {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bit-width {bits} is outside {MIN_BITS}..{MAX_BITS}")
    if allowed is not None and bits not in allowed:
        raise ConfigError(
            f"bit-width {bits} is not in this elastic model's widths {sorted(allowed)}"
        )
    return bits


def check_config(value: Any, kind: type, what: str) -> Any:
    """``value`` when it is a ``kind`` (a config dataclass), else :class:`ConfigError` naming
    ``what`` takes it (a QuEPTConfig given for its part is pointed at ``.spec``/``.calib``)."""
    if isinstance(value, kind):
        return value
    part = {"ElasticSpec": ".spec", "CalibConfig": ".calib"}.get(kind.__name__)
    hint = (f" (pass its {part})" if part and type(value).__name__ == "QuEPTConfig" else "")
    article = "an" if kind.__name__[0] in "AEIOU" else "a"
    raise ConfigError(f"{what} takes {article} {kind.__name__}{hint}, got "
                      f"{type(value).__name__}")

