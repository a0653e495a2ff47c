"""In-context sweeps kept on disk: the costs :func:`quept.search.exact.unit_swap_kl` measures
around a uniform width (one forward per block on the check sequences) are the slow part of an
automatic plan, and every budget between the same two widths reuses them. A
:class:`SweepCache` writes each sweep to a JSON file next to the elastic folder as soon as it
is measured, so a later ``quept plan`` of the same model, check text and settings takes seconds.

The file carries a fingerprint of what the sweeps depend on (elastic state, base weights, check
tokens); a file made for anything else is not reused, and one that cannot be read is measured
again and rewritten, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from quept.data.fetch import atomic_write_text

log = logging.getLogger(__name__)

SWEEPS_FORMAT = "quept-sweeps"
SWEEPS_VERSION = 1

Sweep = tuple[float, dict[str, float]]  # (KL of the uniform base model, {unit: KL change})


class SweepCache(MutableMapping[tuple[int, int], Sweep]):
    """``{(base, alt): (kl_base, {unit: delta})}`` backed by the JSON file ``path``.

    fingerprint: identifies the model and check tokens the sweeps were measured on (see
    :func:`quept.api.sweep_cache`); entries of a file with another fingerprint are ignored.
    check_shape: (N, T) of the check tokens, recorded for ``quept info``. ``recompute`` starts
    empty whatever the file holds. Every assignment rewrites the file atomically; ``measured``
    counts them, ``reused`` the entries read from the file that were looked up.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str,
                 check_shape: tuple[int, int] | None = None, *, recompute: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.check_shape = check_shape
        self.measured = 0
        self._from_file: set[tuple[int, int]] = set()
        self._used: set[tuple[int, int]] = set()
        self._sweeps: dict[tuple[int, int], Sweep] = {}
        if not recompute and self.path.is_file():
            self._read()

    @property
    def reused(self) -> int:
        return len(self._from_file & self._used)

    def _read(self) -> None:
        try:
            d = json.loads(self.path.read_text())
            if not isinstance(d, dict) or d.get("format") != SWEEPS_FORMAT:
                raise ValueError(f"not a {SWEEPS_FORMAT} file")
            if d.get("version") != SWEEPS_VERSION:
                raise ValueError(f"version {d.get('version')!r}, expected {SWEEPS_VERSION}")
            if d.get("fingerprint") != self.fingerprint:
                log.info("%s was measured on another model or check text; measuring again",
                         self.path)
                return
            sweeps = {}
            for s in d["sweeps"]:
                key = (int(s["base"]), int(s["alt"]))
                deltas = {str(u): float(v) for u, v in s["deltas"].items()}
                kl = float(s["kl_base"])
                if not all(math.isfinite(v) for v in (kl, *deltas.values())):
                    raise ValueError(f"non-finite KL in the W{key[0]} -> W{key[1]} sweep")
                sweeps[key] = (kl, deltas)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            log.warning("%s cannot be read as in-context sweeps (%s); measuring again",
                        self.path, e)
            return
        self._sweeps, self._from_file = sweeps, set(sweeps)
        log.info("reusing %d in-context sweep(s) from %s", len(sweeps), self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SWEEPS_FORMAT, "version": SWEEPS_VERSION, "fingerprint": self.fingerprint,
            "check_shape": None if self.check_shape is None else list(self.check_shape),
            "sweeps": [{"base": b, "alt": a, "kl_base": kl, "deltas": deltas}
                       for (b, a), (kl, deltas) in sorted(self._sweeps.items())],
        }

    def _write(self) -> None:
        try:
            atomic_write_text(self.path, json.dumps(self.to_dict(), indent=1))
        except OSError as e:  # a read-only folder: the plan is still made, just not kept
            log.warning("cannot keep the in-context sweeps in %s (%s)", self.path, e)

    def __getitem__(self, key: tuple[int, int]) -> Sweep:
        value = self._sweeps[key]
        self._used.add(key)
        return value

    def __setitem__(self, key: tuple[int, int], value: Sweep) -> None:
        kl, deltas = value
        self._sweeps[(int(key[0]), int(key[1]))] = (float(kl), {str(u): float(v)
                                                               for u, v in deltas.items()})
        self._from_file.discard(key)
        self.measured += 1
        self._write()

    def __delitem__(self, key: tuple[int, int]) -> None:
        del self._sweeps[key]
        self._from_file.discard(key)
        self._write()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._sweeps)

    def __len__(self) -> int:
        return len(self._sweeps)

    def __contains__(self, key: object) -> bool:
        return key in self._sweeps


def describe_sweeps(d: Mapping[str, Any]) -> dict[str, Any]:
    """What ``quept info`` shows of a sweeps file: its width pairs and check tokens."""
    sweeps = d.get("sweeps") or []
    shape = d.get("check_shape")
    if not (isinstance(shape, list) and len(shape) in (2, 4)
            and all(isinstance(n, int) for n in shape)):
        shape = None  # a damaged cache: its shape is not shown, and plan measures it again
    return {"sweeps": [f"W{s.get('base')} -> W{s.get('alt')}" for s in
                       (sweeps if isinstance(sweeps, list) else []) if isinstance(s, Mapping)],
            "check_shape": shape}
