"""Export one configuration of an elastic LLaMA model to GGUF, the file format of llama.cpp.

Our codes are asymmetric groups along the input, ``w = (q - z) * s`` (default group of 64);
GGUF stores blocks of 32 along the input, so one group is ``group_size / 32`` blocks sharing
``s`` and ``z``. Width -> GGUF block type ("exact": equal to our dequantized weight up to the
fp16 rounding of the block scale ``d`` and offset ``m``):

- 2, 3, 4 bits -> Q4_1, exact: ``d = s``, ``m = -z*s``, the code in a nibble (5.0 bits/weight).
- 5 bits -> Q5_1, exact, as Q4_1 with a fifth bit (6.0 bits/weight).
- 6, 7 bits -> Q8_0, exact: ``d = s``, int8 ``q - z`` (``|q - z| <= 127``) (8.5 bits/weight).
- 8 bits -> Q8_0: exact in every block whose ``q - z`` fits int8; the other blocks are
  requantized (absmax, as llama.cpp does) from our dequantized weight, an error of at most half
  a Q8_0 step (the count per tensor is logged at debug level).
- None (float layer of a plan) -> the float weight as ``float_type`` (F16 by default).

The K-quants (Q2_K, Q3_K, Q6_K) give every 16 weights an integer multiple of one fp16 scale per
256, so our float scale and zero per group cannot be stored in them: using them would mean
re-quantizing and discarding the calibration, so 2, 3, 6 and 7 bits trade file size for
exactness. llama.cpp quantizes activations to 8 bits (Q8_1/Q8_0) inside these matmuls, so its
logits differ slightly from ours even though the weights are the same.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quept.checks import check_bits
from quept.data.smollm import _BLOCK_NAMES, _GLOBAL_NAMES, permute_rope
from quept.nn import elastic_layers
from quept.nn.switch import plan_widths

log = logging.getLogger(__name__)

BLOCK = 32  # weights per GGUF block along the input (Q4_1, Q5_1, Q8_0)
TYPE_FOR_BITS = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1", 6: "Q8_0", 7: "Q8_0", 8: "Q8_0"}
SUPPORTED_MODEL_TYPES = ("llama",)
# Why a supported family still has no GGUF export (added to the refusal).
REFUSED_WHY = {
    "llava_onevision": "it is the {text} language model inside a vision-language model; "
    "llama.cpp runs that from a {text} text GGUF plus a separate mmproj file (vision tower and "
    "projector), neither of which this writer of whole text models produces; export the packed "
    "quept format instead",
}
HF_TO_GGUF = {
    **{hf: gg for gg, hf in _GLOBAL_NAMES.items()},
    **{f"model.layers.{{}}.{hf}": f"blk.{{}}.{gg}" for gg, hf in _BLOCK_NAMES.items()},
}


class GGUFExportError(ValueError):
    """The model, a width or the tokenizer cannot be written as a llama.cpp GGUF file."""


# --------------------------------------------------------------------------- block packing
def pack_blocks(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> tuple[np.ndarray, str]:
    """Our codes (out, in) with scale/zero (out, G) -> GGUF blocks, uint8 (out, bytes per row),
    and the GGUF type name; ``group_size`` 0 = one group per row."""
    out, inn = codes.shape
    gs = inn if group_size == 0 else group_size
    if inn % BLOCK or gs % BLOCK:
        raise GGUFExportError(
            f"{bits}-bit layer with {inn} inputs and group size {gs}: GGUF needs both to be "
            f"multiples of its block of {BLOCK}"
        )
    nb, rep = inn // BLOCK, gs // BLOCK
    q = codes.to(torch.int16).reshape(out, nb, BLOCK).numpy()
    s = scale.float().repeat_interleave(rep, dim=1).reshape(out, nb, 1).numpy()
    z = zero.float().round().repeat_interleave(rep, dim=1).reshape(out, nb, 1).numpy()
    qtype = TYPE_FOR_BITS[check_bits(bits)]
    d = s.astype(np.float16).view(np.uint8)
    if qtype == "Q8_0":
        blocks = np.concatenate([d, (q - z).clip(-128, 127).astype(np.int8).view(np.uint8)], -1)
        fits = ((q - z >= -128) & (q - z <= 127)).all(-1)
        if not fits.all():
            import gguf

            values = ((q - z) * s)[~fits].astype(np.float32).reshape(1, -1)  # one long row: fast
            requant = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            blocks[~fits] = requant.reshape(-1, blocks.shape[-1])
            log.debug("%d-bit: %d of %d blocks requantized", bits, (~fits).sum(), fits.size)
        return blocks.reshape(out, -1), qtype
    m = (-z * s).astype(np.float16).view(np.uint8)
    q = q.astype(np.uint8)
    nibbles = (q[..., : BLOCK // 2] & 15) | ((q[..., BLOCK // 2 :] & 15) << 4)
    parts = [d, m, nibbles]
    if qtype == "Q5_1":
        parts.insert(2, np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
    return np.concatenate(parts, -1).reshape(out, -1), qtype


# --------------------------------------------------------------------------- tensors
def _gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        key = ".".join(["model", "layers", "{}", *parts[3:]])
        if key in HF_TO_GGUF:
            return HF_TO_GGUF[key].format(parts[2])
    elif hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    raise GGUFExportError(f"tensor {hf_name!r} has no llama.cpp counterpart; cannot export it")


_FLOAT_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


def _float_tensor(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().numpy().astype(dtype))


def _tensors(
    model: nn.Module, plan: Mapping[str, int | None], float_dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, data, GGUF type) for every weight; q/k rows in llama.cpp's RoPE order."""
    cfg = model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    layers = elastic_layers(model)
    for name, p in model.named_parameters():
        parts = name.split(".")
        inside_elastic = any(".".join(parts[:k]) in layers for k in range(1, len(parts)))
        if inside_elastic or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        dtype = np.float32 if p.dim() == 1 else float_dtype
        yield _gguf_name(name), _float_tensor(p, dtype), _FLOAT_NAMES[np.dtype(dtype)]
    for name, layer in layers.items():
        if layer.bias is not None:
            raise GGUFExportError(f"{name} has a bias; llama.cpp's llama graph has none")
        bits = plan[name]
        if bits is None:
            data, qtype = _float_tensor(layer.weight, float_dtype), _FLOAT_NAMES[float_dtype]
        else:
            codes, scale, zero = layer.quantized_codes(bits)
            data, qtype = pack_blocks(codes, scale, zero, bits, layer.spec.group_size_for(bits))
        n_heads = heads.get(name.rpartition(".")[2])
        if n_heads is not None:
            data = permute_rope(data, n_heads)
        yield _gguf_name(name + ".weight"), np.ascontiguousarray(data), qtype


# --------------------------------------------------------------------------- model and plan
def _check_architecture(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    spec = getattr(model, "quept_spec", None)
    if spec is not None and spec.activations != "none":
        raise GGUFExportError(
            "GGUF export is weight-only: this elastic model was calibrated with "
            f"{spec.activations} activation quantization, which llama.cpp does not apply (its "
            "kernels quantize activations their own way); export the packed quept format, "
            "which keeps the activation quantizers")
    if spec is not None and spec.kv_bits is not None:
        raise GGUFExportError(
            f"GGUF export cannot carry this model's {spec.kv_bits}-bit KV cache: quept quantizes "
            "keys and values per token and head (in a Hadamard-rotated basis), and llama.cpp "
            "quantizes its "
            "cache its own way (--cache-type-k/-v), which calibration did not see; export the "
            "packed quept format, which keeps the KV quantizers")
    if spec is not None and spec.rotation != "none":
        raise GGUFExportError(
            "GGUF export cannot carry this model's Hadamard rotation: its down_proj layers "
            "rotate their input online, which llama.cpp's LLaMA graph does not do; export the "
            "packed quept format instead")
    if model_type not in SUPPORTED_MODEL_TYPES:
        text = getattr(getattr(cfg, "text_config", None), "model_type", "text")
        why = f": {REFUSED_WHY[model_type].format(text=text)}" if model_type in REFUSED_WHY else ""
        raise GGUFExportError(
            f"GGUF export supports model types {list(SUPPORTED_MODEL_TYPES)}, not {model_type!r}"
            + why
        )
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    problems = [
        f"{key}={getattr(cfg, key, None)!r}"
        for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
        if getattr(cfg, key, ok) != ok
    ]
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope['rope_type']!r}")
    if problems:
        raise GGUFExportError(f"cannot export this llama variant to GGUF: {', '.join(problems)}")


def _resolve_plan(model: nn.Module, bits: int | Mapping[str, int | None]) -> dict[str, int | None]:
    layers = elastic_layers(model)
    if not layers:
        raise GGUFExportError("the model has no elastic layers; load it with quept.api.load")
    plan = plan_widths(layers, bits, GGUFExportError)
    for name, b in plan.items():
        if b is not None:
            check_bits(b, layers[name].spec.bits)
    return plan


def _check_tensors(model: nn.Module, plan: Mapping[str, int | None]) -> None:
    """What :func:`_tensors` refuses, found from names and shapes alone (no codes computed):
    a weight llama.cpp has no name for, a bias, a layer whose inputs or group size do not fit
    GGUF's blocks."""
    layers = elastic_layers(model)
    tied = model.config.tie_word_embeddings
    for name, _ in model.named_parameters():
        parts = name.split(".")
        inside_elastic = any(".".join(parts[:k]) in layers for k in range(1, len(parts)))
        if not inside_elastic and not (name == "lm_head.weight" and tied):
            _gguf_name(name)
    for name, layer in layers.items():
        _gguf_name(name + ".weight")
        if layer.bias is not None:
            raise GGUFExportError(f"{name} has a bias; llama.cpp's llama graph has none")
        bits = plan[name]
        if bits is not None:
            inn = layer.in_features
            gs = layer.spec.group_size_for(bits) or inn
            if inn % BLOCK or gs % BLOCK:
                raise GGUFExportError(
                    f"{bits}-bit layer {name} with {inn} inputs and group size {gs}: GGUF needs "
                    f"both to be multiples of its block of {BLOCK}")


FLOAT_DTYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}
"""``float_type`` -> the dtype of the matrices stored as floats."""


def _check_model(model: nn.Module, bits: int | Mapping[str, int | None],
                 float_type: str) -> dict[str, int | None]:
    if float_type not in FLOAT_DTYPES:
        raise GGUFExportError(f"float_type must be one of {list(FLOAT_DTYPES)}, got {float_type!r}")
    _check_architecture(model)
    return _resolve_plan(model, bits)


def check_gguf(model: nn.Module, tokenizer: Any, bits: int | Mapping[str, int | None], *,
               float_type: str = "f16", pre_tokenizer: str | None = None
               ) -> dict[str, int | None]:
    """Everything :func:`write_gguf` checks that needs no codes (the architecture, the widths,
    every tensor's name and shape, the tokenizer), so that a model that cannot be exported is
    refused before the codes are rounded (GPTQ, learned rounding); returns the layer widths."""
    plan = _check_model(model, bits, float_type)
    _check_tensors(model, plan)
    _tokenizer_fields(tokenizer, model.config.vocab_size, pre_tokenizer)
    return plan


def _add_hparams(writer: Any, cfg: Any, name: str) -> None:
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    writer.add_name(name)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or n_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# --------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(pre: Mapping[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer of a ``tokenizer.json``."""
    steps = list(pre.get("pretokenizers", [pre])) if pre else []
    kinds = [s.get("type") for s in steps]
    digits = kinds[:1] == ["Digits"] and steps[0].get("individual_digits")
    if kinds[-1:] == ["ByteLevel"] and steps[-1].get("use_regex", True):
        if len(kinds) == 1:
            return "gpt-2"
        if len(kinds) == 2 and digits:
            return "smollm"
    raise GGUFExportError(
        f"no llama.cpp pre-tokenizer is known for {kinds}; pass pre_tokenizer=NAME "
        "(a name from llama.cpp's llama-vocab.cpp)"
    )


def _tokenizer_fields(tokenizer: Any, n_vocab: int, pre: str | None) -> dict[str, Any]:
    """What :func:`_add_tokenizer` writes of a gpt2-style BPE tokenizer, checked: tokens,
    types, merges, pre-tokenizer, special ids and whether BOS/EOS are added."""
    from gguf import TokenType

    if tokenizer is None:
        raise GGUFExportError("GGUF export needs the model's tokenizer, whose vocabulary and "
                              "merges the file carries: pass tokenizer=... (quept.load returns "
                              "it with the model)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    bpe = data.get("model", {})
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise GGUFExportError("only byte-level BPE (gpt2-style) fast tokenizers can be exported")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [TokenType.UNUSED] * n_vocab
    entries = [(i, t, TokenType.NORMAL) for t, i in bpe["vocab"].items()]
    entries += [
        (a["id"], a["content"], TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
        for a in data.get("added_tokens", [])
    ]
    for i, text, kind in entries:
        if i >= n_vocab:
            raise GGUFExportError(f"token {text!r} has id {i}, beyond the model's {n_vocab}")
        tokens[i], types[i] = text, kind
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
              for m in bpe.get("merges", [])]
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            special[kind] = int(tid)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    template = getattr(tokenizer, "chat_template", None)
    return {"pre": pre or _pre_tokenizer_name(data.get("pre_tokenizer")), "tokens": tokens,
            "types": types, "merges": merges, "special": special,
            "add_bos": with_special[:1] != plain[:1], "add_eos": with_special[-1:] != plain[-1:],
            "chat_template": template if isinstance(template, str) else None}


def _add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, pre: str | None) -> None:
    """gpt2-style BPE vocabulary: tokens, types, merges, special ids, chat template."""
    t = _tokenizer_fields(tokenizer, n_vocab, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(t["pre"])
    writer.add_token_list(t["tokens"])
    writer.add_token_types(t["types"])
    writer.add_token_merges(t["merges"])
    writer.add_add_space_prefix(False)
    for kind, tid in t["special"].items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(t["add_bos"])
    writer.add_add_eos_token(t["add_eos"])
    if t["chat_template"] is not None:
        writer.add_chat_template(t["chat_template"])


# --------------------------------------------------------------------------- the verb
def write_gguf(
    model: nn.Module, tokenizer: Any, path: str | os.PathLike, bits: int | Mapping[str, int | None],
    *, float_type: str = "f16", pre_tokenizer: str | None = None, name: str | None = None,
) -> Path:
    """Write ``model`` (a loaded elastic LLaMA) at ``bits`` (int or {layer name: bits | None})
    as a GGUF file llama.cpp runs. Non-quantized matrices (embeddings, untied output head, float
    layers of a plan) are stored as ``float_type`` ("f16" or "f32"), norms as F32."""
    plan = _check_model(model, bits, float_type)
    _check_tensors(model, plan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".partial")  # renamed to ``path`` once whole
    try:
        counts = _write_file(part, model, tokenizer, plan, FLOAT_DTYPES[float_type], name,
                             pre_tokenizer)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)
    log.info("wrote %s (%.1f MB): %s", path, path.stat().st_size / 1e6, dict(counts))
    return path


def _write_file(path: Path, model: nn.Module, tokenizer: Any, plan: Mapping[str, int | None],
                float_dtype: Any, name: str | None, pre_tokenizer: str | None
                ) -> Counter[str]:
    """Write the GGUF file ``path``; the tensor types written, counted."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    source = Path(str(getattr(cfg, "name_or_path", "") or "model")).name
    _add_hparams(writer, cfg, name or f"{source} (quept)")
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, pre_tokenizer)
    counts: Counter[str] = Counter()
    for tname, data, qtype in _tensors(model, plan, float_dtype):
        raw = gguf.GGMLQuantizationType[qtype] if data.dtype == np.uint8 else None
        writer.add_tensor(tname, data, raw_dtype=raw)
        counts[qtype] += 1
    file_types = {"Q4_1": "MOSTLY_Q4_1", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0"}
    common = next((t for t, _ in counts.most_common() if t in file_types), None)
    writer.add_file_type(gguf.LlamaFileType[file_types.get(common, "MOSTLY_F16")])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


# --------------------------------------------------------------------------- reading
FLOAT_TYPES = ("F32", "F16", "BF16")
"""GGUF tensor types that store floats, not codes."""


def widths_stored_as(qtype: str) -> list[int]:
    """The widths quept writes as the GGUF tensor type ``qtype`` (Q4_1: [2, 3, 4]); [] for a
    float type or a type quept does not write. The type alone does not tell which of them a
    tensor holds: a 2-bit code takes a whole nibble of a Q4_1 block, as a 4-bit one does."""
    return [b for b, t in TYPE_FOR_BITS.items() if t == qtype]


def linear_sizes(tensors: Iterable[Any]) -> dict[str, Any]:
    """The linears of a llama GGUF file (its 2-D ``blk.*`` tensors) from the tensor records of
    a ``gguf.GGUFReader`` (``name``, ``shape``, ``tensor_type``, ``n_elements``, ``n_bytes``).
    ``linear_types``: per tensor type, the count, the widths quept writes as that type,
    weights, bytes and stored bits per weight (bytes x 8 / weights: block scales and offsets
    included); then the same totals over the quantized linears (those of a type that is not a
    float), ``bits_per_weight`` None when there are none."""
    by_type: dict[str, dict[str, Any]] = {}
    for t in tensors:
        if not (t.name.startswith("blk.") and len(t.shape) == 2):
            continue
        row = by_type.setdefault(t.tensor_type.name, {"layers": 0, "weights": 0, "bytes": 0})
        row["layers"] += 1
        row["weights"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
    for qtype, row in by_type.items():
        row["widths"] = widths_stored_as(qtype)
        row["bits_per_weight"] = row["bytes"] * 8 / row["weights"]
    quantized = [row for qtype, row in by_type.items() if qtype not in FLOAT_TYPES]
    weights = sum(row["weights"] for row in quantized)
    stored = sum(row["bytes"] for row in quantized)
    return {"linear_types": dict(sorted(by_type.items())),
            "quantized_linears": sum(row["layers"] for row in quantized),
            "float_linears": sum(row["layers"] for qtype, row in by_type.items()
                                 if qtype in FLOAT_TYPES),
            "quantized_weights": weights, "quantized_bytes": stored,
            "bits_per_weight": stored * 8 / weights if weights else None}


def read_sizes(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`linear_sizes` of the GGUF file ``path``, with its size (``file_bytes``): what an
    export's summary says of the file it wrote."""
    import gguf

    return {**linear_sizes(gguf.GGUFReader(str(path)).tensors),
            "file_bytes": Path(path).stat().st_size}
