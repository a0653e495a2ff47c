"""The elastic folder: save, load, and its versioned JSON."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quept import __version__
from quept.api.elastic import prepare, spec_of, weights_fingerprint
from quept.api.folders import (
    ELASTIC_JSON,
    ELASTIC_WEIGHTS,
    FORMAT,
    KIND_NAMES,
    ArtifactError,
    check_finished,
    check_out_folder,
)
from quept.api.models import DEFAULT_MODEL, load_model
from quept.checks import ConfigError, check_json_fields, read_json_object
from quept.config import QuEPTConfig
from quept.data.fetch import atomic_write_text
from quept.models import family_for, reparam
from quept.nn import elastic_layers
from quept.nn.state import StateMismatchError, load_elastic_state
from quept.outputs import marked

log = logging.getLogger(__name__)

SAVE_ID = "save_id"
"""The key, in quept.json and in the metadata of elastic.safetensors, of the random id one
:func:`save` writes into both, so that a pair of files not written together (weights copied
from another calibration, or a save stopped between its two files) is refused, not loaded
as another model. Folders of older versions hold none in either file, and load as before."""
UNCALIBRATED = "calibrated"
"""The key of quept.json that a model saved without calibration records as false (a
calibrated model's quept.json has no such key)."""

_REWRITE = "rerun the `quept quantize` command that made it (same --out) to write it again"
"""What to do about an elastic folder whose files are missing, damaged or mixed up."""


def save(model: nn.Module, folder: str | os.PathLike, config: QuEPTConfig,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write the elastic state (adapters + clip logits) and a versioned JSON to ``folder``,
    both under one new save id (:data:`SAVE_ID`), and under the unfinished marker of
    :func:`quept.outputs.marked` until both are written."""
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
        SAVE_ID: uuid.uuid4().hex,
    }
    if not getattr(model, "quept_calibrated", False):
        log.warning("the model was prepared but never calibrated: %s holds its untrained "
                    "adapters and initial clips (recorded as \"calibrated\": false); run "
                    "quept.calibrate before saving", folder)
        meta[UNCALIBRATED] = False
    meta.update(_checked_extra(extra, meta))
    check_out_folder(folder, "elastic")
    with marked(folder, KIND_NAMES["elastic"]):
        tmp = folder / (ELASTIC_WEIGHTS + ".tmp")
        save_file(elastic_state_dict(model), str(tmp),
                  metadata={"format": FORMAT, SAVE_ID: meta[SAVE_ID]})
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
    naming the file and field). A folder whose writing was stopped is refused by name."""
    folder = Path(folder)
    path = folder / ELASTIC_JSON
    check_finished(folder)
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not a quept elastic folder (no {ELASTIC_JSON}); "
            "make one with `quept quantize --out FOLDER`"
        )
    meta = read_json_object(path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    check_json_fields(meta, _META_FIELDS, path, ArtifactError,
                      optional={"base_rest_fingerprint": str, SAVE_ID: str,
                                UNCALIBRATED: bool})
    if not all(isinstance(n, str) for n in meta["layers"]):
        raise ArtifactError(f"{path} is damaged: its 'layers' should all be layer names")
    return meta


def check_same_save(folder: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Refuse an elastic folder whose weights file is missing, has a header that cannot be
    read, or was written by another save than its JSON ``meta`` (:func:`read_meta`): their
    :data:`SAVE_ID` differ, or one file holds one and the other none. Reads the header
    only."""
    weights, path = Path(folder) / ELASTIC_WEIGHTS, Path(folder) / ELASTIC_JSON
    try:
        with safe_open(str(weights), "pt") as f:
            saved = (f.metadata() or {}).get(SAVE_ID)
    except FileNotFoundError:
        raise ArtifactError(f"{weights} is missing, which {path} describes; {_REWRITE}"
                            ) from None
    except Exception as e:  # safetensors raises several types for a damaged header
        raise ArtifactError(f"{weights} cannot be read: {e}; {_REWRITE}") from None
    if saved != meta.get(SAVE_ID):
        raise ArtifactError(
            f"{weights} and {path} were written by different saves (save ids {saved or 'none'} "
            f"and {meta.get(SAVE_ID) or 'none'}: the weights come from another calibration, or "
            f"a save was stopped between the two), so they do not belong together; "
            f"{_REWRITE}")


_META_FIELDS = {"config": dict, "base_model": str, "model_type": str, "base_fingerprint": str,
                "layers": list}
"""What every elastic folder's JSON holds besides its format, and of which kind."""


def load(folder: str | os.PathLike, model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Rebuild an elastic model from ``folder``; ``model`` overrides the recorded base model."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"quept.load's model names the base model (a folder or a hub id, as "
                          f"quept.load_model takes), got {type(model).__name__}")
    meta = read_meta(folder)
    check_same_save(folder, meta)  # before the base model is loaded: a header read
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
    weights = Path(folder) / ELASTIC_WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ArtifactError(f"{weights} cannot be read: {e}; {_REWRITE}") from None
    bad = [k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ArtifactError(f"{weights} is damaged: {len(bad)} tensor(s) "
                            f"hold non-finite values (e.g. {bad[0]})")
    try:
        load_elastic_state(net, state)
    except StateMismatchError as e:
        raise ArtifactError(
            f"{weights} does not match {Path(folder) / ELASTIC_JSON} (the model and spec it "
            f"was saved with): {e}; the folder's files are mixed up or damaged: {_REWRITE}"
        ) from None
    net.quept_calibrated = meta.get(UNCALIBRATED, True)
    net.quept_calibration_text = meta.get("calibration_text")  # quept quantize's sample
    reparam.refold(net, family_for(net))
    return net, tok
