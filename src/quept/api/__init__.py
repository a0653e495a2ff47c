"""The public verbs, one module per stage; every name is importable from ``quept.api``.

- :mod:`~quept.api.models`: ``load_model`` and ``resolve_model_dir`` (the float models).
- :mod:`~quept.api.elastic`: ``prepare``, ``calibrate``, ``set_bits``, ``round_gptq``,
  ``round_learned`` (making and switching the elastic model).
- :mod:`~quept.api.store`: ``save``, ``load``, ``read_meta`` (the elastic folder).
- :mod:`~quept.api.mixed`: ``sensitivity``, ``check_budget``, ``plan`` (DESIGN 2.6).
- :mod:`~quept.api.deploy`: ``export``, ``load_packed``, ``save_compact``, ``load_compact``,
  ``load_switchable``.
- :mod:`~quept.api.evaluate`: ``evaluate``, ``evaluate_accuracy``, ``evaluate_embeddings``,
  ``evaluate_tasks``, ``stored_bits``.
- :mod:`~quept.api.folders`: what a folder holds, checked before it is read or written.
"""

from quept.api.deploy import (
    EXPORT_FORMATS,
    EXPORT_KINDS,
    export,
    load_compact,
    load_packed,
    load_switchable,
    save_compact,
)
from quept.api.elastic import (
    calibrate,
    prepare,
    round_gptq,
    round_learned,
    samples_from_text,
    set_bits,
)
from quept.api.evaluate import (
    AccuracyRow,
    EmbeddingRow,
    EvalRow,
    TaskRow,
    evaluate,
    evaluate_accuracy,
    evaluate_embeddings,
    evaluate_tasks,
    stored_bits,
    windows_from_text,
)
from quept.api.folders import (
    ELASTIC_JSON,
    ELASTIC_WEIGHTS,
    FORMAT,
    KIND_NAMES,
    SWEEPS_JSON,
    ArtifactError,
    check_out_folder,
    folder_kind,
    model_kind,
    readable_kind,
)
from quept.api.mixed import (
    SENSITIVITY_CACHES,
    SENSITIVITY_EXACT_JSON,
    SENSITIVITY_JSON,
    cached_sensitivity,
    check_budget,
    plan,
    plan_candidates,
    plan_preview,
    plan_record,
    sensitivity,
    sweep_cache,
)
from quept.api.models import DEFAULT_MODEL, load_model, resolve_model_dir
from quept.api.store import load, read_meta, record_evaluation, save
from quept.export.compact_fit import CompactConfig
from quept.models import Family, UnsupportedModelError
from quept.nn import elastic_layers
from quept.search import Plan, SensitivityConfig

__all__ = [
    "AccuracyRow", "ArtifactError", "CompactConfig", "EmbeddingRow", "EvalRow", "Family", "Plan",
    "SensitivityConfig", "TaskRow", "UnsupportedModelError", "calibrate", "check_budget",
    "evaluate", "evaluate_accuracy", "evaluate_embeddings", "evaluate_tasks", "export", "load",
    "load_compact", "load_model", "load_packed", "load_switchable", "plan", "plan_candidates",
    "plan_record", "prepare", "read_meta", "resolve_model_dir", "round_gptq", "round_learned",
    "samples_from_text", "save", "save_compact", "sensitivity", "set_bits", "stored_bits",
    "sweep_cache", "windows_from_text",
    # folder names and kinds, for the CLI and quept info
    "DEFAULT_MODEL", "ELASTIC_JSON", "ELASTIC_WEIGHTS", "EXPORT_FORMATS", "EXPORT_KINDS", "FORMAT",
    "KIND_NAMES", "SENSITIVITY_CACHES", "SENSITIVITY_EXACT_JSON", "SENSITIVITY_JSON",
    "SWEEPS_JSON", "cached_sensitivity", "check_out_folder", "elastic_layers", "folder_kind",
    "model_kind", "plan_preview", "readable_kind", "record_evaluation",
]
