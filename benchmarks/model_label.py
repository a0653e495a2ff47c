"""How benchmark tables, plots and JSON name a model and its group size."""

from __future__ import annotations

from pathlib import Path

from quept.api.models import DEFAULT_MODEL
from quept.config import ElasticSpec

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_FLOAT = "dequantized Q4_1"  # what the built-in model's float weights are


def is_default(base_model: str | None) -> bool:
    """Whether ``base_model`` (as ``quept.read_meta(folder)["base_model"]`` records it; None =
    ``quept.load_model()``) is the built-in model."""
    return base_model is None or base_model == DEFAULT_MODEL


def model_name(base_model: str | None) -> str:
    """The model's short name: the built-in model's name, a folder's last part (folders are
    recorded by absolute path), else the hub id or built-in name as given."""
    if is_default(base_model):
        return DEFAULT_NAME
    return Path(base_model).name if Path(base_model).is_absolute() else base_model


def model_label(base_model: str | None) -> str:
    """The name, with what "float" means for the built-in model."""
    name = model_name(base_model)
    return f"{name} (float = {DEFAULT_FLOAT})" if is_default(base_model) else name


def group_label(spec: ElasticSpec) -> str:
    """"group 64", "per-channel", or "group 64 (W2: 32)" where some widths differ."""
    def one(size: int) -> str:
        return "per-channel" if size == 0 else f"group {size}"

    base = spec.default_group_size
    other = {b: spec.group_size_for(b) for b in sorted(spec.bits)
             if spec.group_size_for(b) != base}
    if not other:
        return one(base)
    return f"{one(base)} ({', '.join(f'W{b}: {one(s)}' for b, s in other.items())})"
