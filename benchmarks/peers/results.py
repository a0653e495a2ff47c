"""Bookkeeping of the peer benchmark: stored bits, merging runs into the JSON, verdicts.

The JSON document is ``{"version", "setup", "cells": {method: {width: cell}}, "notes"}`` where
width is ``"2"`` .. ``"8"`` or ``"float"``. A cell holds one measurement (perplexity, bits per
weight, the run's calibration time and peak memory, the width's evaluation time and, where the
method rounds each width with GPTQ or learned rounding, that rounding's time) or the exact error
of a failed run.
Re-running a method at a width replaces that cell only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peers.methods import FLOAT, METHODS

VERSION = 1
SCALE_BITS = 16  # every method here stores one fp16 scale per group
TIE = 0.01  # within 1% of perplexity counts as a tie
# The keys of ``setup`` that must agree for two runs to share one table.
SETUP_KEYS = ("model", "eval_text", "windows", "eval_seq_len", "group_size", "tasks",
              "task_limit")


class SetupMismatchError(ValueError):
    """A run was measured on another setup than the results file it would be merged into."""


def stored_bits_per_weight(bits: int, group_size: int, zero_bits: int | None = None) -> float:
    """Bits stored per weight: the b-bit code plus one fp16 scale and one zero-point per group.

    ``zero_bits`` None = the zero-point packed at b bits (GPTQ/AutoRound/compressed-tensors
    formats, QuEPT, RTN); HQQ keeps a floating-point zero (16). Codes count at b bits (ideal
    packing) for every method.
    """
    if group_size <= 0:
        raise ValueError(f"group size must be positive here, got {group_size}")
    return bits + (SCALE_BITS + (bits if zero_bits is None else zero_bits)) / group_size


def empty(setup: dict[str, Any]) -> dict[str, Any]:
    return {"version": VERSION, "setup": dict(setup), "cells": {}, "notes": {}}


def load(path: str | os.PathLike, setup: dict[str, Any]) -> dict[str, Any]:
    """The results document at ``path``, or an empty one for ``setup`` if there is none."""
    path = Path(path)
    if not path.is_file():
        return empty(setup)
    doc = json.loads(path.read_text())
    if doc.get("version") != VERSION:
        raise SetupMismatchError(f"{path} has version {doc.get('version')!r}, not {VERSION}")
    return doc


def merge(doc: dict[str, Any], setup: dict[str, Any], method: str,
          cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``doc`` with ``cells`` ({width: cell}) of ``method`` replaced, others kept."""
    old = {k: doc["setup"].get(k) for k in SETUP_KEYS}
    new = {k: setup.get(k) for k in SETUP_KEYS}
    if old != new:
        diff = {k: (old[k], new[k]) for k in SETUP_KEYS if old[k] != new[k]}
        raise SetupMismatchError(
            f"this run's setup differs from the results file's: {diff} (old, new); "
            "write to another --out or pass --fresh"
        )
    out = json.loads(json.dumps(doc))
    out["setup"].update(setup)
    out["cells"].setdefault(method, {}).update(json.loads(json.dumps(cells)))
    return out


def save(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``doc`` atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def widths_of(doc: dict[str, Any]) -> list[str]:
    """Every quantized width present in ``doc``, high to low."""
    ws = {w for cells in doc["cells"].values() for w in cells if w != FLOAT}
    return sorted(ws, key=int, reverse=True)


def ok_ppl(cell: dict[str, Any] | None) -> float | None:
    if cell is None or cell.get("status") != "ok":
        return None
    return cell.get("ppl")


def ours_methods(doc: dict[str, Any]) -> list[str]:
    """This project's rows in the table (every QuEPT setting), in the order they were added."""
    return [m for m in doc["cells"] if m in METHODS and METHODS[m].adapter == "elastic"]


def verdict(doc: dict[str, Any], ours: str = "quept") -> dict[str, dict[str, Any]]:
    """Per width: our perplexity, the best peer (lowest ok perplexity among the other projects'
    quantized methods that are results; other QuEPT settings are not peers) and whether ours is
    at or below it (a tie within 1% counts)."""
    out = {}
    mine_all = set(ours_methods(doc)) | {ours}
    for w in widths_of(doc):
        mine = ok_ppl(doc["cells"].get(ours, {}).get(w))
        peers = [(ok_ppl(cells.get(w)), m) for m, cells in doc["cells"].items()
                 if m not in mine_all and m != FLOAT and m in METHODS and METHODS[m].in_plot]
        peers = [(p, m) for p, m in peers if p is not None]
        if mine is None or not peers:
            continue
        best, who = min(peers)
        out[w] = {"ours": mine, "best_peer": who, "best_peer_ppl": best,
                  "wins": mine <= best * (1 + TIE), "ratio": mine / best}
    return out


def error_line(stderr: str, returncode: int) -> str:
    """The exact error of a failed run: the last exception line of its output, else its last
    line, else how it ended (a signal, e.g. the out-of-memory killer's SIGKILL)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.replace(".", "").replace("_", "").isalnum() and head.endswith(
                ("Error", "Exception", "Interrupt", "Exit")):
            return ln
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (SIGKILL: out of memory?)"
                                                    if returncode == -9 else "")
    return lines[-1] if lines else f"exit status {returncode} and no output"


def cells_from_run(method: str, widths: list[int | None], result: dict[str, Any] | None,
                   run: dict[str, Any], group_size: int) -> dict[str, dict[str, Any]]:
    """One cell per requested width from a worker's RESULT.json (None if it wrote none) and the
    parent's record ``run`` (run_id, wall_seconds, peak_rss_gib, error, measured_at)."""
    result = result or {}
    rounding = result.get("rounding_seconds") or {}  # {width: seconds}, QuEPT with rounding
    m = METHODS.get(method)
    common = {k: result.get(k) for k in ("calib_seconds", "calib_peak_rss_gib", "n_samples",
                                          "seq_len", "library", "settings", "versions")}
    common["calib_reused"] = bool(result.get("calib_reused"))
    # A reused folder reports the peak memory its calibration recorded (None if it recorded
    # none), never that of loading it.
    common.update({k: run.get(k) for k in ("run_id", "wall_seconds", "peak_rss_gib",
                                            "measured_at", "command", "loadavg_1m_at_end")})
    out = {}
    for b in widths:
        key = FLOAT if b is None else str(b)
        got = result.get("cells", {}).get(key)
        cell = dict(common)
        cell["bits_per_weight"] = 32.0 if b is None else stored_bits_per_weight(
            b, group_size, m.zero_bits if m else None)
        if got is not None:
            cell.update(status="ok", ppl=got["ppl"], levels_max=got.get("levels_max"),
                        eval_seconds=got.get("eval_seconds"), error=None)
            if "tasks" in got:
                cell.update(tasks=got["tasks"], task_seconds=got.get("task_seconds"))
        else:
            cell.update(status="error", ppl=None,
                        error=run.get("error") or "the run ended before this width")
        if key in rounding:
            cell["rounding_seconds"] = rounding[key]
        out[key] = cell
    return out
