"""The sensitivity table: cost per (layer, width), its JSON cache and the fingerprint that keeps
a stale cache from being reused."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from quept.checks import read_json_object
from quept.data.fetch import atomic_write_text
from quept.nn import elastic_layers
from quept.nn.state import elastic_state_dict

TABLE_FORMAT = "quept-sensitivity"
TABLE_VERSION = 1


class SensitivityCacheError(ValueError):
    """A sensitivity JSON file cannot be read or does not describe this model."""


@dataclass(frozen=True)
class LayerShape:
    """A quantizable linear: (out_features, in_features); ``numel`` weights."""

    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass
class SensitivityTable:
    """``kl[layer][k]``: mean KL per token (nats) of the next-token distribution when only
    ``layer`` runs at ``bits[k]``, relative to the reference (see ``settings``); for an image
    classifier the KL of the class distribution per image, for an encoder one minus the
    embedding's cosine per sentence (``settings["objective"]``,
    :mod:`quept.search.objective`).

    group_size: quantization group size per width (0 = per channel), so a plan's stored bits can
    be counted from the table alone. settings: how the table was measured. fingerprint: hash of
    the elastic state, base weights, calibration tokens and settings.
    """

    bits: tuple[int, ...]
    group_size: dict[int, int]
    shapes: dict[str, LayerShape]
    kl: dict[str, tuple[float, ...]]
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def cost(self, name: str, bits: int) -> float:
        return self.kl[name][self.bits.index(bits)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT, "version": TABLE_VERSION, "fingerprint": self.fingerprint,
            "settings": self.settings, "seconds": self.seconds, "bits": list(self.bits),
            "group_size": {str(b): s for b, s in self.group_size.items()},
            "layers": {n: {"out": s.out_features, "in": s.in_features, "kl": list(self.kl[n])}
                       for n, s in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "sensitivity table") -> SensitivityTable:
        if d.get("format") != TABLE_FORMAT or d.get("version") != TABLE_VERSION:
            raise SensitivityCacheError(
                f"{where}: format {d.get('format')!r} v{d.get('version')}, expected "
                f"{TABLE_FORMAT!r} v{TABLE_VERSION}"
            )
        try:
            bits = tuple(int(b) for b in d["bits"])
            layers = d["layers"]
            table = cls(
                bits=bits, group_size={int(b): int(s) for b, s in d["group_size"].items()},
                shapes={n: LayerShape(int(v["out"]), int(v["in"])) for n, v in layers.items()},
                kl={n: tuple(float(x) for x in v["kl"]) for n, v in layers.items()},
                fingerprint=str(d["fingerprint"]), settings=dict(d.get("settings", {})),
                seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SensitivityCacheError(f"{where}: malformed entry ({e!r})") from None
        bad = [n for n, row in table.kl.items() if len(row) != len(bits)]
        if bad or set(table.group_size) != set(bits):
            raise SensitivityCacheError(f"{where}: rows or group sizes do not match widths {bits}")
        bad = [n for n, row in table.kl.items() if not all(math.isfinite(v) for v in row)]
        if bad:
            raise SensitivityCacheError(f"{where}: the costs of {bad[0]} are not all finite "
                                        f"({list(table.kl[bad[0]])})")
        return table

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityTable:
        return cls.from_dict(read_json_object(path, SensitivityCacheError), str(path))


def fingerprint(model: nn.Module, input_ids: Any, settings: Mapping[str, Any]) -> str:
    """sha256 (16 hex) of the elastic state (adapters, clips), a strided sample of every base
    weight, the spec, the calibration inputs (tokens; pixels or sentences for the other tasks)
    and the measurement settings."""
    from quept.search.objective import objective_for

    h = hashlib.sha256()
    for name, t in sorted(elastic_state_dict(model).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for name, m in elastic_layers(model).items():
        w = m.weight.detach().float().reshape(-1)
        h.update(name.encode())
        h.update(w[:: max(1, w.numel() // 65536)].cpu().contiguous().numpy().tobytes())
    spec = getattr(model, "quept_spec", None)
    h.update(json.dumps(spec.to_dict() if spec else None, sort_keys=True).encode())
    h.update(objective_for(model).to_bytes(input_ids))
    h.update(json.dumps(dict(settings), sort_keys=True).encode())
    return h.hexdigest()[:16]
