"""Greedy generation with a KV cache, timing prefill and decode separately (batch 1)."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quept.calib.capture import context_length

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """The generated text and how long each phase took.

    prefill: one forward over the whole prompt (it also yields the first new token);
    decode: every later token, one forward each over the cached keys and values.
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_cache: str = "float"  # "float" (transformers' cache) or "quantized" (QuantizedKVCache)
    kv_cache_bytes: int | None = None  # what the quantized cache held at the end
    kv_cache_float32_bytes: int | None = None  # what a float32 cache of its tokens would

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float | None:
        """None when nothing was decoded (one new token comes from the prefill)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


def cache_keyword(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: transformers >= 5.x names it
    ``cache``, earlier releases (and quept's ONNX runner) ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


KV_CACHES = ("auto", "quantized", "float")


def kv_quantized(model: nn.Module) -> bool:
    """Whether some layer of ``model`` quantizes a KV cache (``kv_quant`` set)."""
    return any(getattr(m, "kv_quant", None) is not None for m in model.modules())


@torch.inference_mode()
def generate(
    model: nn.Module, tokenizer: Any, prompt: str | torch.Tensor, max_new_tokens: int, *,
    stop_at_eos: bool = True, warmup: bool = True, kv_cache: str = "auto",
    prefill_chunk: int | None = None,
) -> Generation:
    """Greedy continuation of ``prompt`` (text, or token ids (1, T)) by ``max_new_tokens``.

    ``warmup`` runs one untimed forward first, so one-off costs (kernel loading, unpacking
    scales) do not count as prefill. ``kv_cache``: "quantized" keeps the keys and values as
    packed codes (:class:`~quept.export.kv_cache.QuantizedKVCache`; the model must quantize its
    cache, ``kv_bits``), "float" uses transformers' cache of float keys and values (which the
    attention quantizes again on every step, if the model quantizes them: the same values,
    more slowly), "auto" the first where the model quantizes its cache. ``prefill_chunk``:
    feed the prompt that many tokens at a time (each chunk attends to the cache of the ones
    before it), which bounds the prefill's working memory by the chunk instead of the prompt;
    None feeds it in one forward.
    """
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (or None: the whole prompt at once), got "
                         f"{prefill_chunk}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if kv_cache == "auto":
        kv_cache = "quantized" if kv_quantized(model) else "float"
    if kv_cache == "quantized":
        from quept.export.kv_cache import QuantizedKVCache  # needs transformers
    ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else prompt
    if isinstance(prompt, str) and ids.shape[-1] == 0:
        raise ValueError(f"the prompt {prompt!r} gives no tokens with this tokenizer; give some "
                         "text to continue")
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"the prompt must be one non-empty sequence, got ids of shape {ids.shape}")
    context = context_length(model)
    # the last new token is returned, never fed: prompt + new - 1 positions are computed
    if context is not None and ids.shape[1] + max_new_tokens - 1 > context:
        log.warning("the prompt (%d tokens) and %d new tokens run past the model's context of "
                    "%d tokens (max_position_embeddings); what it generates past that is not "
                    "what it was trained for", ids.shape[1], max_new_tokens, context)
    ids = ids.to(next(model.parameters()).device)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    key = cache_keyword(model)
    if warmup:
        model(ids[:, :1], use_cache=False)
    cache = QuantizedKVCache(model) if kv_cache == "quantized" else None
    try:
        t0 = time.perf_counter()
        step, past = prefill_chunk or ids.shape[1], cache
        for start in range(0, ids.shape[1], step):
            out = model(ids[:, start:start + step], use_cache=True, logits_to_keep=1,
                        **{key: past})
            past = out[key]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        new = [token]
        while len(new) < max_new_tokens and (eos is None or int(token) != eos):
            out = model(token, use_cache=True, **{key: out[key]})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
        t2 = time.perf_counter()
    finally:
        if cache is not None:
            cache.detach()
    tokens = torch.cat(new, 1)[0]
    sizes = (cache.nbytes, cache.float_nbytes()) if cache is not None else (None, None)
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), ids.shape[1],
                      len(new), t1 - t0, t2 - t1, kv_cache, *sizes)
