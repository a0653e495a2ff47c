"""The elastic folder: save, load, and its versioned JSON."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from quept import __version__
from quept.api.elastic import prepare, spec_of, weights_fingerprint
from quept.api.folders import ELASTIC_JSON, ELASTIC_WEIGHTS, FORMAT, ArtifactError, check_out_folder
from quept.api.models import DEFAULT_MODEL, load_model
from quept.checks import ConfigError, check_json_fields, read_json_object
from quept.config import QuEPTConfig
from quept.data.fetch import atomic_write_text
from quept.models import family_for, reparam
from quept.nn import elastic_layers
from quept.nn.state import load_elastic_state

log = logging.getLogger(__name__)

def save(model: nn.Module, folder: str | os.PathLike, config: QuEPTConfig,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write the elastic state (adapters + clip logits) and a versioned JSON to ``folder``."""
    from quept.nn.state import elastic_state_dict

    folder = Path(folder)
    if not elastic_layers(model):
        raise ConfigError("the model has no elastic layers to save; quept.prepare and "
                          "quept.calibrate it first")
    _check_config(model, config)
    if not hasattr(model, "quept_source"):
        log.warning("the model was not loaded by quept.load_model, so %s records the built-in "
                    "default as its base model; load it with quept.load(folder, model=...) "
                    "naming the model it was made from", folder)
    meta = {
        "format": FORMAT,
        "quept_version": __version__,
        "config": config.to_dict(),
        "base_model": getattr(model, "quept_source", DEFAULT_MODEL),
        "model_type": model.config.model_type,
        "base_fingerprint": weights_fingerprint(model),
        **({"base_rest_fingerprint": model.quept_rest_fingerprint}
           if getattr(model, "quept_rest_fingerprint", None) else {}),
        "layers": list(elastic_layers(model)),
    }
    meta.update(_checked_extra(extra, meta))
    check_out_folder(folder, "elastic")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ELASTIC_WEIGHTS + ".tmp")
    save_file(elastic_state_dict(model), str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, folder / ELASTIC_WEIGHTS)
    _write_meta(folder, meta)
    return folder


def _check_config(model: nn.Module, config: QuEPTConfig) -> None:
    """``config`` is a QuEPTConfig whose spec is the one ``model`` was prepared with (a folder
    recording another spec would load as another model)."""
    if not isinstance(config, QuEPTConfig):
        raise ConfigError(f"save takes the QuEPTConfig the model was prepared and calibrated "
                          f"with, got {type(config).__name__}; e.g. "
                          "quept.QuEPTConfig(spec=spec, calib=calib)")
    spec = spec_of(model)
    if config.spec != spec:
        differ = [f.name for f in fields(spec)
                  if getattr(spec, f.name) != getattr(config.spec, f.name)]
        raise ConfigError(f"the config's spec differs from the one the model was prepared with "
                          f"(in {', '.join(differ)}); save the model with "
                          "QuEPTConfig(spec=model.quept_spec, calib=...)")
    seed = getattr(model, "quept_seed", config.calib.seed)
    if spec.rotation != "none" and seed != config.calib.seed:
        raise ConfigError(f"the model was prepared (and rotated) with seed {seed}, but the "
                          f"config's calib.seed is {config.calib.seed}; loading rebuilds the "
                          "rotation from calib.seed, so it would load as another model: save "
                          "with the calib config the model was prepared and calibrated with")


def _checked_extra(extra: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` as saved: JSON values under keys ``save`` does not write itself."""
    extra = dict(extra or {})
    clash = sorted(k for k in extra if k in meta)
    if clash:
        raise ConfigError(f"extra may not set {clash}: save writes them itself")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"extra must hold JSON values (strings, numbers, lists, objects): "
                          f"{e}") from None
    return extra


def _write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    """The elastic folder's JSON, replaced whole or not at all."""
    atomic_write_text(folder / ELASTIC_JSON, json.dumps(meta, indent=1))


def record_evaluation(folder: str | os.PathLike, evaluation: Mapping[str, Any]) -> None:
    """Keep what was measured after calibration (metric, data, a row per width) in the elastic
    folder's JSON, where ``quept info`` shows it."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta["evaluation"] = dict(evaluation)
    _write_meta(folder, meta)


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON of the elastic folder ``folder``, checked: its format, and a config, base model,
    model type, base fingerprint and layers of the right kinds (else :class:`ArtifactError`
    naming the file and field)."""
    folder = Path(folder)
    path = folder / ELASTIC_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not a quept elastic folder (no {ELASTIC_JSON}); "
            "make one with `quept quantize --out FOLDER`"
        )
    meta = read_json_object(path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    check_json_fields(meta, _META_FIELDS, path, ArtifactError,
                      optional={"base_rest_fingerprint": str})
    if not all(isinstance(n, str) for n in meta["layers"]):
        raise ArtifactError(f"{path} is damaged: its 'layers' should all be layer names")
    return meta


_META_FIELDS = {"config": dict, "base_model": str, "model_type": str, "base_fingerprint": str,
                "layers": list}
"""What every elastic folder's JSON holds besides its format, and of which kind."""


def load(folder: str | os.PathLike, model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Rebuild an elastic model from ``folder``; ``model`` overrides the recorded base model."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"quept.load's model names the base model (a folder or a hub id, as "
                          f"quept.load_model takes), got {type(model).__name__}")
    meta = read_meta(folder)
    try:
        cfg = QuEPTConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise ArtifactError(f"{Path(folder) / ELASTIC_JSON}: its 'config' cannot be read: {e}"
                            ) from None
    if model is not None:
        net, tok = load_model(model)
    else:
        try:
            net, tok = load_model(meta["base_model"])
        except (FileNotFoundError, ArtifactError) as e:
            raise ArtifactError(
                f"{folder} was made from the base model {meta['base_model']!r} (its "
                f"{ELASTIC_JSON} says so), which cannot be loaded: {e}. If that model has moved, "
                "name it: quept.load(folder, model=PATH), or --model PATH on the command line"
            ) from None
    if net.config.model_type != meta["model_type"]:
        raise ArtifactError(
            f"{folder} was calibrated on a {meta['model_type']} model, not {net.config.model_type}"
        )
    prepare(net, cfg.spec, seed=cfg.calib.seed)  # records the fingerprints of the base
    rest = meta.get("base_rest_fingerprint")  # older folders: the linears' only
    if weights_fingerprint(net) != meta["base_fingerprint"] or (
            rest is not None and net.quept_rest_fingerprint != rest):
        raise ArtifactError(
            f"the base model weights differ from those {folder} was calibrated on "
            f"(recorded base model: {meta['base_model']!r}); pass the matching --model"
        )
    try:
        state = load_file(str(Path(folder) / ELASTIC_WEIGHTS))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ArtifactError(f"{Path(folder) / ELASTIC_WEIGHTS} cannot be read: {e}") from None
    bad = [k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ArtifactError(f"{Path(folder) / ELASTIC_WEIGHTS} is damaged: {len(bad)} tensor(s) "
                            f"hold non-finite values (e.g. {bad[0]})")
    load_elastic_state(net, state)
    net.quept_calibrated = True
    net.quept_calibration_text = meta.get("calibration_text")  # quept quantize's sample
    reparam.refold(net, family_for(net))
    return net, tok
