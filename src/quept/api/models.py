"""The float models quept works on (built-in names, folders, hub ids) and their tokenizers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quept.api.folders import (
    KIND_NAMES,
    QUEPT_FILES,
    ArtifactError,
    check_finished,
    folder_kind,
    model_kind,
    not_a_folder,
)
from quept.checks import read_json_object
from quept.data.hub import hub_model_dir, is_repo_id
from quept.export.ct_format import is_compressed_tensors, load_compressed_tensors
from quept.export.onnx_runtime import is_onnx_folder
from quept.models import family_for_type

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """``None``/"default" -> the built-in SmolLM2-135M-Instruct (fetched once); "minilm" -> the
    built-in all-MiniLM-L6-v2 encoder (fetched once); "vit" -> the built-in Fashion-MNIST ViT
    (trained once); else a folder, or a hub model id (OWNER/NAME, fetched once into the
    Hugging Face cache: configs, tokenizer and safetensors weights only)."""
    if str(model) in (DEFAULT_MODEL, "minilm", "vit") and Path(str(model)).is_dir():
        log.warning("%r names the built-in model; the local folder of that name is not read "
                    "(pass ./%s to read it)", str(model), model)
    if model is None or str(model) == DEFAULT_MODEL:
        from quept.data import default_model_dir

        return default_model_dir()
    if str(model) == "minilm":
        from quept.data import encoder_model_dir

        return encoder_model_dir()
    if str(model) == "vit":
        from quept.data import vit_model_dir

        return vit_model_dir()
    path = Path(model)
    if not path.exists() and is_repo_id(str(model)):
        return hub_model_dir(str(model))
    choices = ("pass a Hugging Face model folder (saved with save_pretrained) or a hub model "
               "id (OWNER/NAME), omit --model for the built-in default, or pass 'minilm' for "
               "the built-in encoder or 'vit' for the built-in image classifier")
    if not path.is_dir():
        raise FileNotFoundError(f"{not_a_folder(path)}; {choices}")
    check_finished(path, f"as a float model to read, {choices}")
    held = folder_kind(path)
    lost = next((k for k, files in QUEPT_FILES.items() if (path / files[1]).is_file()), None)
    if held == "hf" and lost is not None and not any(path.glob(HF_WEIGHTS)):
        # a quept folder whose JSON was deleted, not the Hugging Face folder it would pass for
        kind, (json_name, _, _, made_by) = lost, QUEPT_FILES[lost]
        raise ArtifactError(f"{path} is a damaged quept folder, not a Hugging Face model "
                            f"folder: it holds the weights of {KIND_NAMES[kind]} but no "
                            f"{json_name} (write it again with `{made_by}`); as a model to "
                            f"read, {choices}")
    kind = model_kind(path, choices)  # a folder holding no model is named by what it holds
    if kind in QUEPT_FILES:
        raise ArtifactError(f"{path} holds {KIND_NAMES[kind]} written by quept, not a float "
                            f"model; {choices}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds {KIND_NAMES[kind]}, not a Hugging Face model "
                                f"folder (no config.json); {choices}")
    return path


HF_WEIGHTS = "model*.safetensors"
"""The weights files of a Hugging Face model folder (model.safetensors, or its shards
model-00001-of-00002.safetensors ...), which quept reads."""


def load_model(model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Load a supported model (float32, eval mode) and its tokenizer from a local folder: a causal
    LM, the bare encoder of a BERT-style model, a ViT image classifier (tokenizer None), or a
    LLaVA-OneVision vision-language model (whole model; only its language model is quantized).
    A compressed-tensors folder (``quept export --format compressed-tensors``) is dequantized;
    an ONNX export (``--format onnx``) runs in ONNX Runtime (decoders with their KV cache)."""
    path = resolve_model_dir(model)
    config = read_json_object(path / "config.json", ArtifactError)
    from transformers import AutoConfig

    fam = family_for_type(config.get("model_type"))  # fail before reading weights
    tok = _tokenizer(path) if fam.is_text else None
    if is_onnx_folder(path):
        from quept.export.onnx_runtime import OrtModel

        net = OrtModel(path)
    elif is_compressed_tensors(path):
        net = load_compressed_tensors(path, fam.model_class())
    else:
        from safetensors import SafetensorError

        quantized = config.get("quantization_config")
        if quantized is not None:
            method = quantized.get("quant_method") if isinstance(quantized, dict) else None
            raise ArtifactError(f"{path} holds a model quantized by {method!r}, which quept does "
                                "not read; quept calibrates float models: pass the float "
                                "model's folder")
        cfg = AutoConfig.from_pretrained(path)
        try:
            net, loading = fam.model_class().from_pretrained(
                path, config=cfg, dtype=torch.float32, use_safetensors=True,
                output_loading_info=True)
        except SafetensorError as e:
            raise ArtifactError(f"the weights in {path} cannot be read: {e}") from None
        # a BERT checkpoint trained without the pooler lacks it; quept's embeddings pool the
        # last hidden states, so that is the one part allowed to be missing
        missing = sorted(k for k in loading["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise ArtifactError(f"{path}: {len(missing)} weights of the model its config.json "
                                f"describes are not in its safetensors files (e.g. "
                                f"{missing[:3]}); the folder is incomplete or mixed up")
    net.eval()
    net.requires_grad_(False)
    # a folder is recorded by its absolute path, so what is saved from it loads from anywhere
    given_folder = model is not None and Path(model).resolve() == path.resolve()
    net.quept_source = (str(path.resolve()) if given_folder
                        else DEFAULT_MODEL if model is None else str(model))
    return net, tok


def folder_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer saved in ``folder``, or None when it holds none (e.g. a test model)."""
    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return _tokenizer(folder)


def _tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer of a model folder; a damaged one is refused with the folder named."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers and tokenizers raise many types for a damaged file
        raise ArtifactError(f"the tokenizer in {folder} cannot be loaded ({type(e).__name__}: "
                            f"{e}); its tokenizer files are damaged or of another kind") from None
