"""Peak memory of a long-context generation: the quantized KV cache against the float one.

Run from the repository root (it measures a whole process, so run it alone):

    python benchmarks/kv_cache_memory.py --packed kv4-w4

--packed is a packed folder exported from a ``--kv-bits`` calibration (``quept export FOLDER
--bits 4 --out kv4-w4``). For each prompt length in --contexts (tokens of Pride and Prejudice
from its start), one fresh process per cache kind loads the folder, prefills the prompt and
generates --new-tokens greedily, and reports its peak resident memory (``ru_maxrss``) and the
cache's bytes at the end. The prompt goes in --prefill-chunk tokens at a time (0: in one
forward), so the prefill's working memory stays small beside the cache. "float" is transformers' cache with the KV quantizer switched off
(what the model costs without it); "quantized" the cache of codes. The load alone (the folder,
the tokenizer, one short forward) is measured the same way, so the table also shows what the
generation added on top of it.

Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

KINDS = ("load", "float", "quantized")


def child(packed: str, kind: str, context: int, new_tokens: int, chunk: int = 0) -> dict:
    """One measurement in this (fresh) process."""
    import contextlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kv_cache_runtime import float_cache_bytes, kv_quantizer_off

    from quept import api, data
    from quept.export.runtime import generate

    model, tok = api.load_packed(packed)
    ids = tok(data.evaluation_text()[:80000], return_tensors="pt").input_ids[:, :context]
    if ids.shape[1] < context:
        raise SystemExit(f"the text holds {ids.shape[1]} tokens, fewer than {context}")
    res: dict = {"kind": kind, "context": context}
    if kind == "load":
        with torch.inference_mode():
            model(ids[:, :8])
    else:
        off = kv_quantizer_off(model) if kind == "float" else contextlib.nullcontext()
        with off:
            gen = generate(model, tok, ids, new_tokens, stop_at_eos=False,
                           kv_cache="float" if kind == "float" else "quantized",
                           prefill_chunk=chunk or None)
        tokens = context + new_tokens - 1
        res.update(cache_bytes=gen.kv_cache_bytes if kind == "quantized"
                   else float_cache_bytes(model, tokens),
                   decode_tok_s=gen.decode_tokens_per_second, text=gen.text)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--packed", required=True, help="packed folder of a --kv-bits calibration")
    p.add_argument("--contexts", default="2048,7000", help="prompt lengths (tokens)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=256, help="0: the prompt in one forward")
    p.add_argument("--out", default="results/kv_cache_memory.json")
    p.add_argument("--child", nargs=2, metavar=("KIND", "CONTEXT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.packed, a.child[0], int(a.child[1]), a.new_tokens,
                               a.prefill_chunk)))
        return 0
    res: dict = {"machine": f"{platform.machine()}, torch {torch.__version__}",
                 "packed": Path(a.packed).name, "new_tokens": a.new_tokens,
                 "prefill_chunk": a.prefill_chunk, "runs": []}
    for context in (int(c) for c in a.contexts.split(",")):
        for kind in KINDS:
            out = subprocess.run(
                [sys.executable, __file__, "--packed", a.packed, "--new-tokens",
                 str(a.new_tokens), "--prefill-chunk", str(a.prefill_chunk), "--child", kind,
                 str(context)],
                capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"the {kind} run at {context} tokens failed:\n{out.stderr}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            res["runs"].append(run)
            print(f"{kind} at {context}: {run['peak_rss_mib']:.0f} MiB", flush=True)
    print("\n| prompt tokens | peak MiB, load only | peak MiB, float cache | peak MiB, quantized "
          "cache | cache MB float / quantized | decode tok/s float / quantized |\n"
          "|---|---|---|---|---|---|")
    for context in sorted({r["context"] for r in res["runs"]}):
        r = {x["kind"]: x for x in res["runs"] if x["context"] == context}
        print(f"| {context} | {r['load']['peak_rss_mib']:.0f} | {r['float']['peak_rss_mib']:.0f} "
              f"| {r['quantized']['peak_rss_mib']:.0f} | {r['float']['cache_bytes'] / 1e6:.1f} / "
              f"{r['quantized']['cache_bytes'] / 1e6:.1f} | {r['float']['decode_tok_s']:.1f} / "
              f"{r['quantized']['decode_tok_s']:.1f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
