"""QuEPT: one elastic calibration (or an existing elastic folder), evaluated at every width.

Without ``job["elastic"]`` this runs what ``quept quantize`` runs (prepare, calibrate with the
cpu-demo preset and the method's options, e.g. more epochs, save) on the benchmark's calibration
windows, and writes the folder to ``<workdir>/<method>`` so a later run can pass it as
``--elastic``. A reused folder must have been calibrated with the settings the method names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quept
from peers.common import Quantized
from quept.config import PRESETS, CalibConfig, ElasticSpec, QuEPTConfig
from quept.export.gptq import clear_rounding
from quept.export.learned import LearnedRoundingConfig

log = logging.getLogger(__name__)


def quantize(model: nn.Module, tok: Any, ids: torch.Tensor, job: dict[str, Any]) -> Quantized:
    if job.get("elastic"):
        return _reuse(job, ids)
    cfg = QuEPTConfig(
        spec=_spec(job),
        calib=replace(_calib(job), n_samples=ids.shape[0], seq_len=ids.shape[1],
                      seed=job["seed"]),
    )
    quept.prepare(model, cfg.spec, seed=cfg.calib.seed)
    t0 = time.perf_counter()
    quept.calibrate(model, ids, cfg.calib, progress=False)
    secs = time.perf_counter() - t0
    folder = Path(job["workdir"]) / ("quept-elastic" if job["method"] == "quept" else job["method"])
    quept.save(model, folder, cfg, extra={"calibration_seconds": secs})
    log.info("elastic model written to %s", folder)
    rounding: dict[str, float] = {}
    return Quantized(_selector(model, ids, job, rounding),
                     {"calib_seconds": secs, "rounding_seconds": rounding, "settings": {"config": cfg.to_dict(),
                                                          "folder": folder.name}})


def _calib(job: dict[str, Any]) -> CalibConfig:
    """The cpu-demo preset with the method's options (epochs, learning rates) applied."""
    return replace(PRESETS["cpu-demo"], **_calib_options(job))


def _calib_options(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.get("options", {}).items() if k not in ("spec", "rounding")}


def _selector(model: nn.Module, ids: torch.Tensor, job: dict[str, Any],
              seconds: dict[str, float], calib: CalibConfig | None = None):
    """``select(bits)``: the elastic model at ``bits``; with the method's ``rounding`` "gptq"
    or "learned", its codes at ``bits`` first chosen that way on the calibration windows
    ``ids`` (learned rounding with the loss settings of ``calib``, the folder's calibration;
    the time each width's rounding took goes into ``seconds``)."""
    how = job.get("options", {}).get("rounding", "nearest")
    if how == "nearest":
        return lambda b: quept.set_bits(model, b)
    if how not in ("gptq", "learned"):
        raise ValueError(f"{job['method']}: rounding {how!r} is not nearest, gptq or learned")
    calib = calib or _calib(job)
    learned = LearnedRoundingConfig(loss=calib.loss, massive_ratio=calib.massive_ratio or None,
                                    massive_slack=calib.massive_slack)

    def select(b: int | None) -> nn.Module:
        clear_rounding(model)
        if b is None:
            return quept.set_bits(model, None)
        t0 = time.perf_counter()
        if how == "gptq":
            quept.round_gptq(model, b, ids, progress=False)
        else:
            quept.round_learned(model, b, ids, learned, progress=False)
        seconds[str(b)] = time.perf_counter() - t0
        log.info("W%d: %s rounding took %.1fs", b, how, seconds[str(b)])
        return model

    return select


def _spec_options(job: dict[str, Any]) -> dict[str, Any]:
    """The method's spec fields (e.g. bit groups and ranks), JSON lists turned into tuples."""
    return {k: _tuples(v) for k, v in job.get("options", {}).get("spec", {}).items()}


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _spec(job: dict[str, Any]) -> ElasticSpec:
    """The default spec at the benchmark's group size with the method's spec fields."""
    return replace(ElasticSpec(), default_group_size=job["group_size"], **_spec_options(job))


def _reuse(job: dict[str, Any], ids: torch.Tensor) -> Quantized:
    folder = job["elastic"]
    meta = quept.read_meta(folder)
    cfg = QuEPTConfig.from_dict(meta["config"])
    want = _calib(job)
    wrong = {k: (getattr(cfg.calib, k), getattr(want, k)) for k in _calib_options(job)
             if getattr(cfg.calib, k) != getattr(want, k)}
    wrong.update({k: (getattr(cfg.spec, k), v) for k, v in _spec_options(job).items()
                  if getattr(cfg.spec, k) != v})
    if wrong:
        raise ValueError(f"{folder} was not calibrated with the settings of {job['method']}: "
                         + ", ".join(f"{k} is {got}, not {exp}" for k, (got, exp) in wrong.items()))
    if any(cfg.spec.group_size_for(b) != job["group_size"] for b in job["bits"]):
        raise ValueError(f"{folder} was calibrated at group size {cfg.spec.default_group_size} "
                         f"(per width: {cfg.spec.group_size}), not {job['group_size']}")
    model, _ = quept.load(folder, model=job.get("model"))
    rounding: dict[str, float] = {}
    return Quantized(_selector(model, ids, job, rounding, cfg.calib), {"rounding_seconds": rounding,
        "calib_seconds": meta.get("calibration_seconds"), "calib_reused": True,
        "calib_peak_rss_gib": meta.get("calibration_peak_rss_gib"),  # None if not recorded
        "n_samples": cfg.calib.n_samples, "seq_len": cfg.calib.seq_len,
        "settings": {"config": cfg.to_dict(), "folder": Path(folder).name}})
