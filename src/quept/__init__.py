"""quept: elastic-precision post-training quantization (QuEPT) for transformers.

Calibrate once, then run the same model at any weight width 2..8 or a per-layer mix::

    import quept
    model, tok = quept.load_model()              # built-in SmolLM2-135M-Instruct
    quept.prepare(model, quept.ElasticSpec())
    quept.calibrate(model, quept.samples_from_text(tok, text, cfg), cfg)
    quept.set_bits(model, 3)
"""

__version__ = "0.1.0"

from quept.api import (  # noqa: E402
    AccuracyRow,
    ArtifactError,
    EmbeddingRow,
    EvalRow,
    TaskRow,
    calibrate,
    check_budget,
    evaluate,
    evaluate_accuracy,
    evaluate_embeddings,
    evaluate_tasks,
    load,
    load_model,
    load_switchable,
    plan,
    plan_record,
    prepare,
    read_meta,
    round_gptq,
    round_learned,
    samples_from_text,
    save,
    sensitivity,
    set_bits,
    stored_bits,
    sweep_cache,
    windows_from_text,
)
from quept.config import (  # noqa: E402
    PRESET_SPECS,
    PRESETS,
    CalibConfig,
    ConfigError,
    ElasticSpec,
    QuEPTConfig,
    weight_act_spec,
)

__all__ = [
    "PRESETS",
    "PRESET_SPECS",
    "AccuracyRow",
    "ArtifactError",
    "CalibConfig",
    "ConfigError",
    "ElasticSpec",
    "EmbeddingRow",
    "EvalRow",
    "TaskRow",
    "QuEPTConfig",
    "calibrate",
    "check_budget",
    "evaluate",
    "evaluate_accuracy",
    "evaluate_embeddings",
    "evaluate_tasks",
    "load",
    "load_model",
    "load_switchable",
    "plan",
    "plan_record",
    "prepare",
    "read_meta",
    "round_gptq",
    "round_learned",
    "samples_from_text",
    "save",
    "sensitivity",
    "set_bits",
    "stored_bits",
    "sweep_cache",
    "weight_act_spec",
    "windows_from_text",
]
