"""Per-block calibration checkpoints, so a killed run resumes at the next block.

Layout of the folder:
    progress.json              {"next_block", "n_streams", "n_groups", "fingerprint", "reports"}
                               (written last, atomically)
    block_007.safetensors      elastic state (adapters, clips) of block 7
    streams_008.safetensors    the activation streams and the RNG state entering block 8
                               (only the latest is kept, unless keep_streams)

Every safetensors file records in its metadata (``RUN_KEY``) a digest of the run's fingerprint,
so a file copied in from another run is refused; files without it (older quept) are accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quept.checks import ConfigError, check_json_fields, is_json_kind, read_json_object
from quept.config import CalibConfig, ElasticSpec

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ".calib-checkpoint"  # inside the output folder of `quept quantize`
PROGRESS_JSON = "progress.json"
RUN_KEY = "quept_calib_run"  # safetensors metadata: run_digest of the fingerprint

# The fingerprint's fields (quept.api.elastic builds it) and their JSON kinds: a field missing or
# of another kind is damage; fields of the right kinds holding other values are a mismatch.
_FINGERPRINT_KINDS: dict[str, Any] = {
    "spec": dict, "calib": dict, "model": str, "base": (str, type(None)),
    "prepare_seed": (int, type(None)), "data": str,
}
# A block report as progress.json keeps it (quept.calib.loop.BlockReport, as a dict): the
# scalar fields, and the list fields with the kind of their elements (one per bit group).
_REPORT_SCALARS: dict[str, type] = {"block": int, "seconds": float}
_REPORT_LISTS: dict[str, type] = {"bits": int, "loss_before": float, "loss_after": float}


def run_digest(fingerprint: dict[str, Any]) -> str:
    """A short hash of a calibration run's fingerprint (canonical JSON), stored in each of its
    checkpoint files."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _brief(value: Any) -> str:
    """``value`` in a message: its type, and its text when that is short."""
    text = repr(value)
    return f"a {type(value).__name__} {text}" if len(text) <= 60 else f"a {type(value).__name__}"


def _report_problem(r: Any, block: int, n_groups: int) -> str | None:
    """What is wrong with the saved report of ``block`` (None when nothing is)."""
    if not isinstance(r, dict):
        return f"it is a {type(r).__name__}, not an object"
    want = set(_REPORT_SCALARS) | set(_REPORT_LISTS)
    if set(r) != want:
        return f"its fields are {sorted(r)}, not {sorted(want)}"
    for key, kind in _REPORT_SCALARS.items():
        if not is_json_kind(r[key], kind):
            return f"its {key!r} is {r[key]!r}, not a {kind.__name__}"
    if r["block"] != block:
        return f"it is numbered {r['block']}"
    for key, kind in _REPORT_LISTS.items():
        v = r[key]
        if not (isinstance(v, list) and len(v) == n_groups
                and all(is_json_kind(x, kind) for x in v)):
            return f"its {key!r} is {v!r}, not a list of {n_groups} {kind.__name__}s"
    return None


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


_FINGERPRINT_WORDS = {"spec": "quantization settings (spec)", "calib": "calib settings",
                      "model": "model", "base": "base model", "prepare_seed": "prepare seed",
                      "data": "calibration data"}


def _other(keys: list[str]) -> str:
    """The fingerprint sections ``keys`` in words: "other calib settings", "another model and
    other calibration data"."""
    words = [("another " if k in ("model", "base") else "other ")
             + _FINGERPRINT_WORDS.get(k, k) for k in keys]
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 2 else words)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint exists but was made for another model, data or configuration."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint exists but one of its files cannot be used (damaged, truncated, missing,
    or written by another calibration run)."""


# How to discard a checkpoint, the remedy every message about a damaged one names.
CHECKPOINT_DISCARD = ("rerun `quept quantize` with --restart, or delete the folder (from "
                      "Python: CalibCheckpoint.clear()), to discard it")


@dataclass
class Resumed:
    next_block: int
    block_states: dict[int, dict[str, torch.Tensor]]
    x_fp: torch.Tensor
    x_q: list[torch.Tensor]
    rng_state: torch.Tensor
    reports: list[dict[str, Any]]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, digest: str) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={RUN_KEY: digest})
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
        inner = self.folder / CHECKPOINT_DIR
        if inner.is_dir() and not (self.folder / PROGRESS_JSON).exists():
            raise ConfigError(f"{self.folder} is the output folder of `quept quantize`, not its "
                              f"calibration checkpoint: give {inner}, which holds it")
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.digest = run_digest(self.fingerprint)
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
        _atomic_save(tensors, self.folder / "streams_000.safetensors", self.digest)

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
        return CheckpointCorruptError(f"the calibration checkpoint in {self.folder} is damaged: "
                                      f"{name} {why}; {CHECKPOINT_DISCARD}")

    def progress(self) -> dict[str, Any]:
        """progress.json, checked (see :meth:`load`); CheckpointCorruptError names what is
        damaged and how to discard it."""
        return self._progress()

    def _progress(self) -> dict[str, Any]:
        """progress.json, checked for what resuming and ``quept info`` read from it: its
        counts, its fingerprint's fields and kinds, one report per finished block, and the
        header of the streams file resuming starts from (its streams, sample count and run)."""
        prog = read_json_object(self.folder / PROGRESS_JSON, lambda why: CheckpointCorruptError(
            f"the calibration checkpoint in {self.folder} is damaged: {why}; "
            f"{CHECKPOINT_DISCARD}"))
        counts = [prog.get(k) for k in ("next_block", "n_streams", "n_groups")]
        if not (isinstance(prog.get("fingerprint"), dict)
                and all(is_json_kind(c, int) for c in counts)
                and counts[0] >= 0 and counts[1] >= 1 and counts[2] >= 1):
            raise self._corrupt(PROGRESS_JSON, "lacks its fingerprint, next_block, n_streams "
                                "or n_groups, or holds a value of the wrong kind")
        nxt, n_streams, n_groups = counts
        spec = self._check_fingerprint(prog["fingerprint"])
        if n_groups != len(spec.bit_groups) or n_streams not in (1, n_groups):
            raise self._corrupt(PROGRESS_JSON, f"records {n_groups} bit group(s) and {n_streams} "
                                f"stream(s), but its spec has {len(spec.bit_groups)} bit groups "
                                "(and one stream shared by all, or one per group)")
        reports = prog.get("reports")
        if not isinstance(reports, list) or len(reports) != nxt:
            raise self._corrupt(PROGRESS_JSON, f"holds {_brief(reports)} as its reports, which "
                                f"should be a list of {nxt} (one per finished block)")
        for i, r in enumerate(reports):
            problem = _report_problem(r, i, n_groups)
            if problem:
                raise self._corrupt(PROGRESS_JSON, f"holds a damaged report of block {i}: "
                                    f"{problem}")
        self._check_streams_header(prog)
        return prog

    def _check_fingerprint(self, fp: dict[str, Any]) -> ElasticSpec:
        """The saved fingerprint's fields are there and of their kinds, its spec and calib
        readable; returns the spec. A reader without a fingerprint (``quept info``) needs every
        field quept's runs record; a run with one of its own, spec, calib and its fields."""
        need = ({"spec", "calib"} | (set(self.fingerprint) & set(_FINGERPRINT_KINDS))
                if self.fingerprint else set(_FINGERPRINT_KINDS))
        check_json_fields(
            fp, {k: _FINGERPRINT_KINDS[k] for k in need},
            f"{self.folder / PROGRESS_JSON}'s fingerprint",
            lambda why: CheckpointCorruptError(f"{why}; {CHECKPOINT_DISCARD}"),
            optional={k: v for k, v in _FINGERPRINT_KINDS.items() if k not in need})
        try:
            spec = ElasticSpec.from_dict(fp["spec"])
            CalibConfig.from_dict(fp["calib"])
        except (ConfigError, TypeError, ValueError) as e:
            raise self._corrupt(PROGRESS_JSON, f"holds settings that cannot be read in its "
                                f"fingerprint ({e})") from None
        return spec

    def _check_run(self, name: str, metadata: dict[str, str] | None,
                   prog: dict[str, Any]) -> None:
        """A file written by another run (another fingerprint) is refused; one without the
        digest (written by an older quept) is taken."""
        digest = (metadata or {}).get(RUN_KEY)
        if digest is not None and digest != run_digest(prog["fingerprint"]):
            raise self._corrupt(name, f"belongs to another calibration run than the one "
                                f"{PROGRESS_JSON} records (run digest {digest}, not "
                                f"{run_digest(prog['fingerprint'])})")

    def _check_stream_shapes(self, name: str, shapes: dict[str, list[int]],
                             prog: dict[str, Any]) -> None:
        """Every stream of a streams file holds the run's samples, all of one shape."""
        n = prog["fingerprint"]["calib"].get("n_samples")
        x_fp = shapes["x_fp"]
        if is_json_kind(n, int) and (not x_fp or x_fp[0] != n):
            raise self._corrupt(name, f"holds streams of {x_fp[0] if x_fp else 0} samples, but "
                                f"the run calibrates on {n}")
        other = {k: s for k, s in shapes.items() if k.startswith("x_q_") and s != x_fp}
        if other:
            raise self._corrupt(name, f"holds streams of other shapes ({other}) than x_fp "
                                f"{x_fp}")

    def _check_streams_header(self, prog: dict[str, Any]) -> None:
        """The streams file resuming starts from, by its header alone: there, of this run,
        with the streams progress.json records and the run's sample count."""
        nxt = prog["next_block"]
        path = self.folder / f"streams_{nxt:03d}.safetensors"
        try:
            with safe_open(str(path), "pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
                metadata = f.metadata()
        except FileNotFoundError:
            raise self._corrupt(path.name, f"is missing ({PROGRESS_JSON} records {nxt} "
                                f"finished block(s), and resuming starts from the streams "
                                f"entering block {nxt}, which that file holds)") from None
        except Exception as e:  # safetensors raises several types for a damaged file
            raise self._corrupt(path.name, f"cannot be read ({e})") from None
        self._check_run(path.name, metadata, prog)
        missing = [k for k in ("x_fp", "rng_state") if k not in shapes]
        if missing:
            raise self._corrupt(path.name, f"lacks {missing}")
        held = sorted(k for k in shapes if k.startswith("x_q_"))
        want = sorted(f"x_q_{g}" for g in range(prog["n_streams"]))
        if held != want:
            raise self._corrupt(path.name, f"holds the streams {held}, but {PROGRESS_JSON} "
                                f"records {prog['n_streams']} ({want})")
        self._check_stream_shapes(path.name, shapes, prog)

    def _tensors(self, path: Path, keys: list[str],
                 prog: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of one checkpoint file of this run, which must hold ``keys``."""
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
                t = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise self._corrupt(path.name, "is missing") from None
        except Exception as e:  # safetensors raises several types for a damaged file
            raise self._corrupt(path.name, f"cannot be read ({e})") from None
        self._check_run(path.name, metadata, prog)
        missing = [k for k in keys if k not in t]
        if missing:
            raise self._corrupt(path.name, f"lacks {missing}")
        return t

    def _read_streams(
        self, block: int, prog: dict[str, Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        path = self.folder / f"streams_{block:03d}.safetensors"
        if not path.exists():  # not the next block's, which progress() found
            have = sorted(int(p.stem.split("_")[1])
                          for p in self.folder.glob("streams_*.safetensors"))
            raise FileNotFoundError(
                f"{self.folder} holds no streams entering block {block} (it has {have or 'none'}); "
                "calibrate with keep_streams=True (quept quantize --keep-streams) to keep them all"
            )
        t = self._tensors(path, ["x_fp", "rng_state"], prog)
        self._check_stream_shapes(path.name, {k: list(v.shape) for k, v in t.items()}, prog)
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
        """The saved state, or None when there is none. Raises CheckpointMismatchError on a
        checkpoint of other settings, CheckpointCorruptError on a damaged one: progress.json
        unreadable, missing while block files remain (other than those of this run's first
        save, which a run stopped while saving block 0 leaves: they are discarded), or lacking
        a field or holding one of the wrong kind; a file that is missing, unreadable or from
        another run."""
        if not (self.folder / PROGRESS_JSON).exists():
            orphans = sorted(p.name for p in self.folder.glob("block_*.safetensors"))
            if orphans and not self._discard_first_save(orphans):
                raise self._corrupt(PROGRESS_JSON, f"is missing, but {len(orphans)} block "
                                    f"file(s) remain ({', '.join(orphans[:3])}"
                                    f"{', ...' if len(orphans) > 3 else ''}), which cannot be "
                                    "resumed without it")
            return None
        prog = self._progress()
        saved = prog["fingerprint"]
        if saved != self.fingerprint:
            diff = sorted(k for k in set(saved) | set(self.fingerprint)
                          if saved.get(k) != self.fingerprint.get(k))
            detail = "; ".join(_differences(saved, self.fingerprint, diff))
            raise CheckpointMismatchError(
                f"the calibration checkpoint in {self.folder} was made with {_other(diff)} "
                f"({detail}); rerun with the same settings to resume, or {CHECKPOINT_DISCARD}"
            )
        nxt = int(prog["next_block"])
        x_fp, x_q, rng_state = self._read_streams(nxt, prog)
        states = {i: self._tensors(self.folder / f"block_{i:03d}.safetensors", [], prog)
                  for i in range(nxt)}
        log.info("resuming calibration at block %d from %s", nxt, self.folder)
        return Resumed(nxt, states, x_fp, x_q, rng_state, prog["reports"])

    def _discard_first_save(self, orphans: list[str]) -> bool:
        """Without progress.json, the files of this very run's first save (block 0's state and
        the streams entering block 1, which are written before progress.json) are what a run
        killed while saving block 0 leaves: they are deleted and calibration starts again.
        Anything else (other blocks, files of another run or without a run digest) is kept,
        and False returned."""
        first = [self.folder / "block_000.safetensors", self.folder / "streams_001.safetensors"]
        if orphans != [first[0].name]:
            return False
        for path in first:
            if not path.exists():
                continue
            try:
                with safe_open(str(path), "pt") as f:
                    digest = (f.metadata() or {}).get(RUN_KEY)
            except Exception:  # a damaged file: not known to be this run's
                return False
            if digest != self.digest:
                return False
        for path in first:
            path.unlink(missing_ok=True)
        log.warning("%s holds block 0's files of this run but no %s (the run was stopped while "
                    "saving block 0): discarded them, calibrating from block 0", self.folder,
                    PROGRESS_JSON)
        return True

    def save(
        self, block: int, state: dict[str, torch.Tensor], x_fp: torch.Tensor,
        x_q: list[torch.Tensor], rng_state: torch.Tensor, reports: list[dict[str, Any]],
    ) -> None:
        """Record that ``block`` is done: its state, the streams entering the next block, RNG.
        ``x_q`` holds one stream per bit group (the same tensor repeated when shared)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, self.folder / f"block_{block:03d}.safetensors", self.digest)
        nxt = block + 1
        tensors = self._stream_tensors(x_fp, x_q, rng_state)
        _atomic_save(tensors, self.folder / f"streams_{nxt:03d}.safetensors", self.digest)
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
