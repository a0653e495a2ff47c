"""Which linears write a decoder's KV cache, the head size that groups their outputs, and
installing the attention that quantizes the cache (:mod:`quept.nn.kv`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from quept.config import ConfigError
from quept.models.families import Family, family_for
from quept.nn.kv import install_attention

# Linears (inside one block) whose outputs a family's KV cache holds: keys, then values.
KV_LINEARS: dict[str, tuple[str, ...]] = {
    "llama-decoder": ("self_attn.k_proj", "self_attn.v_proj"),
    "llava-ov-language": ("self_attn.k_proj", "self_attn.v_proj"),
}


def kv_linears(family: Family) -> tuple[str, ...]:
    """The family's key and value projections; a clear error for families without a KV cache."""
    if family.name not in KV_LINEARS:
        raise ConfigError(
            f"kv_bits quantizes a decoder's KV cache, but {family.name} models have none "
            f"(families with one: {sorted(KV_LINEARS)}); leave kv_bits unset")
    return KV_LINEARS[family.name]


def head_dim(model: nn.Module) -> int:
    """Features per attention head of a decoder (``config.head_dim`` or hidden / heads)."""
    return config_head_dim(model.config)


def config_head_dim(config: Any) -> int:
    """:func:`head_dim` from a model config (a VLM's: its language model's)."""
    cfg = getattr(config, "text_config", None) or config
    dim = getattr(cfg, "head_dim", None)
    return int(dim) if dim else cfg.hidden_size // cfg.num_attention_heads


def install_kv_attention(model: nn.Module) -> int:
    """Point every attention whose key projection carries a KV quantizer (``kv_quant``) at
    :func:`quept.nn.kv.kv_attention`; returns how many. Models without a KV cache are left
    as they are."""
    fam = family_for(model)
    if fam.name not in KV_LINEARS:
        return 0
    k, v = KV_LINEARS[fam.name]
    parent = k.rpartition(".")[0]
    n = 0
    for block in _patchable_blocks(model, fam):
        attention = block.get_submodule(parent)
        if getattr(block.get_submodule(k), "kv_quant", None) is not None:
            install_attention(attention, (k.rpartition(".")[2], v.rpartition(".")[2]))
            n += 1
    return n


def _patchable_blocks(model: nn.Module, fam: Family) -> nn.ModuleList:
    """The family's blocks of ``model``, whose attention modules a quantized KV cache patches;
    a model without them (an ONNX Runtime model runs its graph in the runtime) is refused."""
    try:
        return fam.get_blocks(model)
    except AttributeError:
        raise ConfigError(
            "the quantized KV cache runs on elastic and packed models, whose attention in "
            f"{fam.blocks} it patches; this {type(model).__name__} holds no {fam.blocks}: an "
            "ONNX export's KV cache is ONNX Runtime's own (run it with the float cache: "
            "kv_cache='float', --kv-cache float)") from None
