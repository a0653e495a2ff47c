"""Default models, texts and images (fetched through pip/apt and cached), and user text loading."""

from quept.data.austen import austen_novels, calibration_text, evaluation_text
from quept.data.fashion_mnist import load_fashion_mnist
from quept.data.fetch import DataUnavailableError, resolve_cache_dir
from quept.data.minilm import ENCODER_NAME, encoder_model_dir
from quept.data.smollm import default_model_dir
from quept.data.text import load_texts
from quept.data.vit import VIT_NAME, pixel_values, vit_model_dir

__all__ = [
    "ENCODER_NAME",
    "VIT_NAME",
    "DataUnavailableError",
    "austen_novels",
    "calibration_text",
    "default_model_dir",
    "encoder_model_dir",
    "evaluation_text",
    "load_fashion_mnist",
    "load_texts",
    "pixel_values",
    "resolve_cache_dir",
    "vit_model_dir",
]
