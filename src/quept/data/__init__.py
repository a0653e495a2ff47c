"""Default model and texts (fetched through pip/apt and cached), and user text loading."""

from quept.data.austen import austen_novels, calibration_text, evaluation_text
from quept.data.fetch import DataUnavailableError, resolve_cache_dir
from quept.data.minilm import ENCODER_NAME, encoder_model_dir
from quept.data.smollm import default_model_dir
from quept.data.text import load_texts

__all__ = [
    "ENCODER_NAME",
    "DataUnavailableError",
    "austen_novels",
    "calibration_text",
    "default_model_dir",
    "encoder_model_dir",
    "evaluation_text",
    "load_texts",
    "resolve_cache_dir",
]
