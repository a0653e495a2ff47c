"""benchmarks/kv_cache_runtime.py: the float cache's size it compares against, and its
token-by-token check on a tiny KV-quantized model."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kv_cache_runtime  # noqa: E402

import quept  # noqa: E402
from quept.config import ElasticSpec  # noqa: E402
from quept.export.kv_cache import QuantizedKVCache  # noqa: E402
from tests.export.tiny import elastic_tiny  # noqa: E402


def test_float_cache_bytes_is_what_transformers_cache_holds():
    model = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=4))
    quept.set_bits(model, 4)
    ids = torch.randint(2, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).cache
        held = sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values))
        assert kv_cache_runtime.float_cache_bytes(model, 9) == held
        q = QuantizedKVCache(model)
        model(ids, use_cache=True, cache=q)
        q.detach()
    assert q.float_nbytes() == held


def test_teacher_forced_finds_both_caches_equal():
    model = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=3))
    quept.set_bits(model, 3)
    ids = torch.randint(2, 90, (1, 16), generator=torch.Generator().manual_seed(1))
    res = kv_cache_runtime.teacher_forced(model, ids)
    assert res["tokens"] == 16 and res["max_abs_logit_diff_caches"] == 0.0
    assert res["nll_quantized_cache"] == res["nll_float_cache"]
    assert abs(res["nll_full_forward"] - res["nll_float_cache"]) < 0.05
    assert all(m.kv_sink is None for m in model.modules() if hasattr(m, "kv_sink"))
