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


def test_teacher_forced_finds_both_caches_alike():
    model = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=3))
    quept.set_bits(model, 3)
    ids = torch.randint(2, 90, (1, 16), generator=torch.Generator().manual_seed(1))
    res = kv_cache_runtime.teacher_forced(model, ids)
    assert res["tokens"] == 16 and 0 <= res["max_abs_logit_diff_caches"] < 1e-4
    assert abs(res["nll_quantized_cache"] - res["nll_float_cache"]) < 1e-5
    assert abs(res["nll_full_forward"] - res["nll_float_cache"]) < 0.05
    assert all(getattr(m, "quept_kv_cache", None) is None for m in model.modules())


def test_the_quantizer_can_be_switched_off_for_the_speed_baseline():
    model = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=2))
    quept.set_bits(model, 4)
    ids = torch.randint(2, 90, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        on = model(ids).logits
        with kv_cache_runtime.kv_quantizer_off(model):
            off = model(ids).logits
        assert torch.equal(model(ids).logits, on)  # restored
    assert (on - off).abs().max() > 1e-3


def test_memory_benchmark_measures_each_cache_kind_in_its_process(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import kv_cache_memory

    from tests.export.tiny import char_tokenizer

    model = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, kv_bits=4))
    quept.api.export(model, 4, tmp_path / "w4", tokenizer=char_tokenizer())
    runs = {k: kv_cache_memory.child(str(tmp_path / "w4"), k, 24, 4, chunk=8)
            for k in kv_cache_memory.KINDS}
    assert all(r["peak_rss_mib"] > 0 for r in runs.values())
    assert 0 < runs["quantized"]["cache_bytes"] < runs["float"]["cache_bytes"] / 2
    assert "cache_bytes" not in runs["load"]
