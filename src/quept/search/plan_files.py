"""Plan files as the command line names them: a file ``quept plan`` wrote, a hand-written
``{layer or pattern: bits}``, an inline plan (``'*=3,model.layers.0.*=8'``), or a folder of
plans."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quept.checks import ConfigError, check_bits
from quept.search.plan import INLINE_EXAMPLE, PLAN_FORMAT, Plan, read_plan_json


def read_widths(path: str | os.PathLike) -> dict[str, int]:
    """``{layer name: bits}`` from a plan file: one ``quept plan`` wrote (checked as a
    :class:`Plan`), or a hand-written mapping, bare or under ``plan`` or ``bits``."""
    plan = read_plan(path)
    return dict(plan.widths) if isinstance(plan, Plan) else plan


def read_plan(path: str | os.PathLike) -> Plan | dict[str, int]:
    """A plan file as ``quept plan`` wrote it (a :class:`Plan`), or a hand-written
    ``{layer name or pattern: bits}`` (bare, or under ``plan`` or ``bits``) as that mapping,
    each width checked to be in 2..8; patterns (``"*": 3, "*.mlp.down_proj": 4``) apply in
    the file's order when the plan meets a model (:func:`quept.nn.switch.plan_widths`).
    A text with ``=`` that names no file (and does not end in .json) is read as an inline plan
    (:func:`inline_plan`)."""
    text = str(path)
    if "=" in text and not text.endswith(".json") and not Path(path).exists():
        return inline_plan(text)
    d = read_plan_json(path)
    if isinstance(d, dict) and d.get("format") == PLAN_FORMAT:
        return Plan.from_dict(d, str(path))
    d = unwrap_plan(d, str(path))
    expected = ("expected {layer name: bits} (bare, or under 'plan' or 'bits'), or a plan "
                "from `quept plan`")
    if not isinstance(d, dict) or not d:
        raise ConfigError(f"{path}: {expected}")
    for name, b in d.items():
        if not isinstance(b, int) or isinstance(b, bool):
            raise ConfigError(f"{path}: entry {name!r} is {json.dumps(b)}, not a whole "
                              f"number of bits; {expected}")
    for name, b in d.items():
        try:
            check_bits(b)
        except ConfigError as e:
            raise ConfigError(f"{path}: entry {name!r}: {e}") from None
    return d


def unwrap_plan(d: Any, where: str) -> Any:
    """A hand-written plan's ``{layer name or pattern: bits}``: ``d`` itself, or what it holds
    under ``plan`` or ``bits`` (a mapping there, where a width would be a number)."""
    nested = [k for k in ("plan", "bits") if isinstance(d, Mapping)
              and isinstance(d.get(k), Mapping)]
    if len(nested) == 2:
        raise ConfigError(f"{where}: holds both 'plan' and 'bits'; keep the widths under one")
    return d[nested[0]] if nested else d


def inline_plan(text: str) -> dict[str, int]:
    """A hand-written plan given on the command line: ``"*=3,model.layers.0.*=8"`` ->
    ``{"*": 3, "model.layers.0.*": 8}``, entries (names or patterns) in order, widths checked
    to be in 2..8."""
    out: dict[str, int] = {}
    for part in text.split(","):
        name, eq, bits = part.partition("=")
        name, bits = name.strip(), bits.strip()
        if not eq or not name or not bits.isdigit():
            raise ConfigError(f"cannot read an inline plan from {text!r} (at {part!r}); write "
                              f"PATTERN=BITS entries separated by commas, e.g. {INLINE_EXAMPLE},"
                              " or name a plan file")
        try:
            out[name] = check_bits(int(bits))
        except ConfigError as e:
            raise ConfigError(f"inline plan {text!r}: entry {name!r}: {e}") from None
    return out


def plan_files(values: list[str]) -> list[Path]:
    """The plan files that ``--plan`` values name: a file as given, or a folder's ``*.json``
    plans (as ``quept plan --avg-bits 2.5,3 --out DIR`` writes them), fewest stored bits per
    weight first."""
    out: list[Path] = []
    for value in values:
        path = Path(value)
        if not path.is_dir():
            out.append(path)
            continue
        found = sorted(path.glob("*.json"))
        if not found:
            raise ConfigError(f"--plan {path} is a folder without plan files (*.json); "
                              "`quept plan FOLDER --avg-bits 2.5,3 --out DIR` writes some")
        out += sorted(found, key=_plan_order)
    return out


def _plan_order(path: Path) -> tuple[float, str]:
    """Plans from `quept plan` by their stored bits per weight, then hand-written ones (whose
    size depends on the model) by name."""
    plan = read_plan(path)
    return (plan.bits_per_weight, "") if isinstance(plan, Plan) else (math.inf, path.name)
