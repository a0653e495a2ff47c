"""The quantized KV cache at run time: what it holds, how fast it decodes, and that it decodes
what the model computes over transformers' float cache of the same quantized keys and values.

Run from the repository root under the shared lock (it times things):

    flock /tmp/quept-heavy.lock python benchmarks/kv_cache_runtime.py --elastic kv4-elastic

--elastic is an elastic or compact folder calibrated with ``--kv-bits``. It is exported packed
at --bits; then, for each prompt length in --contexts (tokens of Pride and Prejudice from its
start), --new-tokens are generated greedily, once untimed (a warm-up: first runs are far
slower) and then --repeats times each, taking turns, three ways:
"float", transformers' float cache with the KV quantizer off (the speed to beat: what the
model costs without a quantized cache); "simulated", transformers' float cache with the
quantizer on (the attention quantizes every cached key and value again on each step: the
values a quantized cache must reproduce); and "quantized", the cache of codes
(quept.export.kv_cache.QuantizedKVCache). Reported: the cache's bytes at the end, decode
tokens per second (medians) and whether the quantized cache generated the simulated one's
tokens. Then --nll-tokens of the text are fed one token at a time through the quantized and
the simulated cache, and the mean NLL is compared with one forward over the whole sequence.

Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import quept
from quept import api, data
from quept.cli.common import positive
from quept.export.kv_cache import QuantizedKVCache
from quept.export.runtime import generate


@contextlib.contextmanager
def kv_quantizer_off(model: torch.nn.Module) -> Iterator[None]:
    """The model with its key and value projections' KV quantizers removed (restored after)."""
    held = {m: m.kv_quant for m in model.modules() if getattr(m, "kv_quant", None) is not None}
    for m in held:
        m.kv_quant = None
    try:
        yield
    finally:
        for m, q in held.items():
            m.kv_quant = q


def float_cache_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes transformers' float32 cache holds for ``tokens`` tokens (keys and values)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * tokens * cfg.num_key_value_heads * head_dim * 4


@torch.inference_mode()
def teacher_forced(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Mean NLL of ``ids`` (1, T) fed one token at a time through the quantized cache and
    through transformers' float cache (the quantizer on: the same quantized values), and in one
    forward over the whole sequence; the largest logit difference between the two caches
    (float rounding: the attention over codes sums in another order) and against the
    whole-sequence forward."""
    full = model(ids, use_cache=False).logits[0, :-1].float()
    stepped = {}
    for kind in ("quantized", "float"):
        cache = QuantizedKVCache(model) if kind == "quantized" else None
        steps = []
        try:
            for t in range(ids.shape[1] - 1):
                out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
                steps.append(out.logits[0, -1].float())
                cache = out.cache
        finally:
            if kind == "quantized":
                cache.detach()
        stepped[kind] = torch.stack(steps)
    target = ids[0, 1:]
    return {"tokens": int(ids.shape[1]),
            "nll_full_forward": float(F.cross_entropy(full, target)),
            "nll_quantized_cache": float(F.cross_entropy(stepped["quantized"], target)),
            "nll_float_cache": float(F.cross_entropy(stepped["float"], target)),
            "max_abs_logit_diff_caches": float((stepped["quantized"] - stepped["float"]).abs()
                                               .max()),
            "max_abs_logit_diff_full": float((stepped["quantized"] - full).abs().max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", required=True, help="elastic/compact folder with kv_bits")
    p.add_argument("--bits", type=int, default=4, help="weight width of the packed export")
    p.add_argument("--contexts", default="256,1024,2048", help="prompt lengths (tokens)")
    p.add_argument("--new-tokens", type=positive, default=32)
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--nll-tokens", type=int, default=512, help="0 = skip the NLL check")
    p.add_argument("--out", default="results/kv_cache_runtime.json")
    a = p.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]

    model, tok = quept.load(a.elastic)
    spec = model.quept_spec
    if spec.kv_bits is None:
        raise SystemExit(f"{a.elastic} does not quantize its KV cache: calibrate with --kv-bits")
    work = Path(tempfile.mkdtemp(prefix="quept-kv-"))
    api.export(model, a.bits, work / "packed", tokenizer=tok)
    del model
    packed, tok = api.load_packed(work / "packed")
    ids = tok(data.evaluation_text()[:60000], return_tensors="pt").input_ids
    if ids.shape[1] < max(contexts):
        raise SystemExit(f"the text holds {ids.shape[1]} tokens, fewer than {max(contexts)}")
    res: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                 f"{torch.__version__}", "elastic": Path(a.elastic).name, "weight_bits": a.bits,
                 "kv_bits": spec.kv_bits, "new_tokens": a.new_tokens, "repeats": a.repeats,
                 "warmup_rounds": 1, "contexts": {}}
    for n in contexts:
        prompt = ids[:, :n]
        runs: dict[str, list] = {"float": [], "simulated": [], "quantized": []}
        for rnd in range(a.repeats + 1):  # round 0 warms up, untimed
            for kind in runs:
                off = kv_quantizer_off(packed) if kind == "float" else contextlib.nullcontext()
                with off:
                    gen = generate(packed, tok, prompt, a.new_tokens, stop_at_eos=False,
                                   kv_cache="quantized" if kind == "quantized" else "float")
                if rnd:
                    runs[kind].append(gen)
        q = runs["quantized"][0]
        tokens = n + a.new_tokens - 1
        row = {"cached_tokens": tokens, "quantized_bytes": q.kv_cache_bytes,
               "float32_bytes": float_cache_bytes(packed, tokens),
               "same_text": all(r.text == q.text for kind in ("simulated", "quantized")
                                for r in runs[kind]),
               "same_text_as_unquantized": q.text == runs["float"][0].text}
        assert row["float32_bytes"] == q.kv_cache_float32_bytes
        for kind, rs in runs.items():
            row[f"{kind}_decode_tok_s"] = statistics.median(r.decode_tokens_per_second for r in rs)
            row[f"{kind}_prefill_tok_s"] = statistics.median(
                r.prefill_tokens_per_second for r in rs)
        res["contexts"][n] = row
        print(f"context {n}: {row}", flush=True)
    if a.nll_tokens:
        res["teacher_forced"] = teacher_forced(packed, ids[:, :a.nll_tokens])
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def report(res: dict) -> None:
    print(f"\n{res['machine']}; packed W{res['weight_bits']}, KV cache {res['kv_bits']} bits; "
          f"{res['new_tokens']} new tokens, medians of {res['repeats']}"
          f"{' after an untimed warm-up' if res.get('warmup_rounds') else ''}\n")
    print("| prompt tokens | float32 cache MB | quantized cache MB | smaller | decode tok/s, "
          "float cache | decode tok/s, simulated | decode tok/s, quantized | quantized vs float "
          "| same text as simulated |\n|---|---|---|---|---|---|---|---|---|")
    for n, r in res["contexts"].items():
        print(f"| {n} | {r['float32_bytes'] / 1e6:.2f} | {r['quantized_bytes'] / 1e6:.2f} | "
              f"{r['float32_bytes'] / r['quantized_bytes']:.2f}x | "
              f"{r['float_decode_tok_s']:.1f} | {r['simulated_decode_tok_s']:.1f} | "
              f"{r['quantized_decode_tok_s']:.1f} | "
              f"{r['quantized_decode_tok_s'] / r['float_decode_tok_s']:.2f}x | "
              f"{'yes' if r['same_text'] else 'NO'} |")
    if "teacher_forced" in res:
        t = res["teacher_forced"]
        print(f"\n{t['tokens']} tokens one at a time: mean NLL {t['nll_quantized_cache']:.6f} "
              f"through the quantized cache, {t['nll_float_cache']:.6f} through the float cache "
              f"(largest logit difference {t['max_abs_logit_diff_caches']:.2e}); "
              f"{t['nll_full_forward']:.6f} in one forward over all of them (largest logit "
              f"difference {t['max_abs_logit_diff_full']:.2e})")


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
