"""Pure tensor functions: fake quantization, low-rank deltas, token merging, losses."""

from quept.ops.merge import multibit_merge
from quept.ops.quant import (
    GroupSizeError,
    dequantize,
    dequantize_kv,
    fake_quant,
    fake_quant_act,
    fake_quant_kv,
    fake_quant_static,
    n_groups,
    quantize,
    quantize_kv,
    round_ste,
    rtn,
    search_act_range,
    search_clip,
    stored_bits_per_weight,
)

__all__ = [
    "GroupSizeError",
    "dequantize",
    "dequantize_kv",
    "fake_quant",
    "fake_quant_act",
    "fake_quant_kv",
    "fake_quant_static",
    "multibit_merge",
    "n_groups",
    "quantize",
    "quantize_kv",
    "round_ste",
    "rtn",
    "search_act_range",
    "search_clip",
    "stored_bits_per_weight",
]
