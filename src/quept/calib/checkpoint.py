"""Per-block calibration checkpoints, so a killed run resumes at the next block.

Layout of the folder:
    progress.json              {"next_block", "fingerprint", "reports"} (written last, atomically)
    block_007.safetensors      elastic state (adapters, clips) of block 7
    streams_008.safetensors    the activation streams and the RNG state entering block 8
                               (only the latest is kept, unless keep_streams)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quept.checks import ConfigError, read_json_object

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ".calib-checkpoint"  # inside the output folder of `quept quantize`
PROGRESS_JSON = "progress.json"


def _differences(saved: dict[str, Any], now: dict[str, Any], keys: list[str]) -> list[str]:
    """What differs between two fingerprints under ``keys``, field by field within a section
    (``calib.epochs 60 -> 61``); hashes are named by their section alone."""
    out = []
    for key in keys:
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{f} {a.get(f, 'unset')!r} -> {b.get(f, 'unset')!r}"
                    for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        else:
            out.append(f"{key}: " + ("another model's weights" if key in ("model", "base")
                                     else "other data" if key == "data" else f"{a!r} -> {b!r}"))
    return out


class CheckpointMismatchError(RuntimeError):
    """A checkpoint exists but was made for another model, data or configuration."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint exists but one of its files cannot be read (damaged, truncated, missing)."""


_DISCARD = ("rerun `quept quantize` with --restart, or delete the folder (from Python: "
            "CalibCheckpoint.clear()), to discard it")


@dataclass
class Resumed:
    next_block: int
    block_states: dict[int, dict[str, torch.Tensor]]
    x_fp: torch.Tensor
    x_q: list[torch.Tensor]
    rng_state: torch.Tensor
    reports: list[dict[str, Any]]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class CalibCheckpoint:
    """Reads and writes the checkpoint folder of one calibration run."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any],
                 keep_streams: bool = False) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"the calibration checkpoint folder {self.folder} is a file; name "
                              "a folder (it is made if missing)")
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.keep_streams = keep_streams

    def streams(self, block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The float stream and the quantized stream of every bit group that entered ``block``
        (with keep_streams every block's are kept, block 0's too; otherwise only the next
        block's exist)."""
        x_fp, x_q, _ = self._read_streams(block, self._progress())
        return x_fp, x_q

    def save_inputs(self, x_fp: torch.Tensor, x_q: list[torch.Tensor],
                    rng_state: torch.Tensor) -> None:
        """With keep_streams, keep what enters block 0 (``streams(0)``); nothing otherwise.
        Resuming never reads it."""
        if not self.keep_streams:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = self._stream_tensors(x_fp, x_q, rng_state)
        if all(x is x_fp for x in x_q):  # every stream is the float one: stored once
            tensors = {k: v for k, v in tensors.items() if not k.startswith("x_q_")}
        _atomic_save(tensors, self.folder / "streams_000.safetensors")

    @staticmethod
    def _stream_tensors(x_fp: torch.Tensor, x_q: list[torch.Tensor],
                        rng_state: torch.Tensor) -> dict[str, torch.Tensor]:
        """One streams file's tensors: a bit group's stream once when all groups share it."""
        unique = x_q[:1] if all(x is x_q[0] for x in x_q) else x_q
        return {"x_fp": x_fp, "rng_state": rng_state,
                **{f"x_q_{g}": x for g, x in enumerate(unique)}}

    def finished_blocks(self) -> int:
        """How many blocks the checkpoint holds as finished (0 when there is none, or when its
        progress file cannot be read)."""
        if not (self.folder / PROGRESS_JSON).is_file():
            return 0
        try:
            return int(self._progress()["next_block"])
        except CheckpointCorruptError:
            return 0

    def _corrupt(self, name: str, why: object) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"the calibration checkpoint in {self.folder} is damaged: {name} {why}; {_DISCARD}")

    def _progress(self) -> dict[str, Any]:
        """progress.json, checked for what resuming reads from it."""
        prog = read_json_object(self.folder / PROGRESS_JSON, lambda why: CheckpointCorruptError(
            f"the calibration checkpoint in {self.folder} is damaged: {why}; {_DISCARD}"))
        ok = isinstance(prog.get("fingerprint"), dict)
        try:
            ok = ok and (int(prog["next_block"]) >= 0 and int(prog["n_streams"]) >= 1
                         and int(prog["n_groups"]) >= 1)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise self._corrupt(PROGRESS_JSON, "lacks its fingerprint, next_block, n_streams "
                                "or n_groups, or holds a value of the wrong kind")
        return prog

    def _tensors(self, path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of one checkpoint file, which must hold ``keys``."""
        try:
            t = load_file(str(path))
        except FileNotFoundError:
            raise self._corrupt(path.name, "is missing") from None
        except Exception as e:  # safetensors raises several types for a damaged file
            raise self._corrupt(path.name, f"cannot be read ({e})") from None
        missing = [k for k in keys if k not in t]
        if missing:
            raise self._corrupt(path.name, f"lacks {missing}")
        return t

    def _read_streams(
        self, block: int, prog: dict[str, Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        path = self.folder / f"streams_{block:03d}.safetensors"
        if not path.exists() and block == int(prog["next_block"]):  # always kept: resumed from
            raise self._corrupt(path.name, f"is missing ({PROGRESS_JSON} records {block} "
                                f"finished block(s), and resuming starts from the streams "
                                f"entering block {block}, which that file holds)")
        if not path.exists():
            have = sorted(int(p.stem.split("_")[1])
                          for p in self.folder.glob("streams_*.safetensors"))
            raise FileNotFoundError(
                f"{self.folder} holds no streams entering block {block} (it has {have or 'none'}); "
                "calibrate with keep_streams=True (quept quantize --keep-streams) to keep them all"
            )
        t = self._tensors(path, ["x_fp", "rng_state"])
        n_streams = int(prog["n_streams"])
        if block != int(prog["next_block"]):  # a kept file: as many streams as it was saved with
            n_streams = sum(k.startswith("x_q_") for k in t)
            if n_streams == 0:  # block 0's input: the quantized streams are the float one
                return t["x_fp"], [t["x_fp"]] * int(prog["n_groups"]), t["rng_state"]
        streams = [f"x_q_{g}" for g in range(n_streams)]
        missing = [k for k in streams if k not in t]
        if missing:
            raise self._corrupt(path.name, f"lacks {missing}")
        x_q = [t[k] for k in streams]
        x_q = x_q * int(prog["n_groups"]) if len(x_q) == 1 else x_q
        return t["x_fp"], x_q, t["rng_state"]

    def load(self) -> Resumed | None:
        """The saved state, or None when there is none. Raises on a mismatched checkpoint."""
        if not (self.folder / PROGRESS_JSON).exists():
            return None
        prog = self._progress()
        saved = prog["fingerprint"]
        if saved != self.fingerprint:
            diff = sorted(k for k in set(saved) | set(self.fingerprint)
                          if saved.get(k) != self.fingerprint.get(k))
            detail = "; ".join(_differences(saved, self.fingerprint, diff))
            raise CheckpointMismatchError(
                f"the calibration checkpoint in {self.folder} was made with different {diff} "
                f"({detail}); rerun with the same settings to resume, or {_DISCARD}"
            )
        nxt = int(prog["next_block"])
        x_fp, x_q, rng_state = self._read_streams(nxt, prog)
        states = {i: self._tensors(self.folder / f"block_{i:03d}.safetensors", [])
                  for i in range(nxt)}
        log.info("resuming calibration at block %d from %s", nxt, self.folder)
        return Resumed(nxt, states, x_fp, x_q, rng_state, prog.get("reports", []))

    def save(
        self, block: int, state: dict[str, torch.Tensor], x_fp: torch.Tensor,
        x_q: list[torch.Tensor], rng_state: torch.Tensor, reports: list[dict[str, Any]],
    ) -> None:
        """Record that ``block`` is done: its state, the streams entering the next block, RNG.
        ``x_q`` holds one stream per bit group (the same tensor repeated when shared)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, self.folder / f"block_{block:03d}.safetensors")
        nxt = block + 1
        tensors = self._stream_tensors(x_fp, x_q, rng_state)
        _atomic_save(tensors, self.folder / f"streams_{nxt:03d}.safetensors")
        n_streams = sum(k.startswith("x_q_") for k in tensors)
        _atomic_json({"next_block": nxt, "n_streams": n_streams, "n_groups": len(x_q),
                      "fingerprint": self.fingerprint, "reports": reports},
                     self.folder / PROGRESS_JSON)
        old = self.folder / f"streams_{block:03d}.safetensors"
        if old.exists() and not self.keep_streams:
            old.unlink()

    def clear(self) -> None:
        """Delete the checkpoint folder (after the final artifact is safely written)."""
        if self.folder.exists():
            for p in self.folder.iterdir():
                p.unlink()
            self.folder.rmdir()
