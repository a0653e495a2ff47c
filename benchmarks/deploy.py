"""Deployment figures: packed sizes, the compact checkpoint, materialise time, CPU speed, and
the compact checkpoint's perplexity against the elastic folder at every width.

Run from the repository root under the shared lock (it times things):

    flock /tmp/quept-heavy.lock python benchmarks/deploy.py --elastic quept-elastic

Writes results/deploy.json and prints markdown tables. Speed: batch 1, a --prompt-tokens prompt
of Pride and Prejudice (64 tokens by default), --new-tokens new tokens (64; greedy, KV cache),
median of --repeats runs in this one process for every row (the folder's own base model in
float32, every packed width, and W4 with PyTorch's int4 and plain dequant backends); prefill and
decode timed separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from model_label import model_name

import quept
from quept import api, data
from quept.cli.common import at_least, positive
from quept.export.packed import pack_model
from quept.export.runtime import generate
from quept.nn import PackedLinear
from quept.ops import kernels

WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def resident_mb(model: torch.nn.Module) -> dict[str, float]:
    """MB of parameters and buffers: packed linears, their float32 compute copies, the rest."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    stored = sum(m.stored_bytes() for m in packed)
    compute = sum(t.numel() * t.element_size() for m in packed for t in (m._compute or ())[1:3]
                  if isinstance(t, torch.Tensor))
    seen, other = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    return {"packed_mb": stored / 1e6, "scales_fp32_mb": compute / 1e6,
            "other_mb": (other - stored) / 1e6}


def speed(model: torch.nn.Module, tok: object, prompt: torch.Tensor, new: int, repeats: int
          ) -> dict[str, float]:
    runs = [generate(model, tok, prompt, new, stop_at_eos=False) for _ in range(repeats)]
    return {"prefill_tok_s": statistics.median(r.prefill_tokens_per_second for r in runs),
            "decode_tok_s": statistics.median(r.decode_tokens_per_second for r in runs),
            "text": runs[0].text}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", required=True, help="calibrated elastic folder")
    p.add_argument("--work", default=None, help="folder for the packed/compact outputs")
    p.add_argument("--windows", type=at_least(0, "a whole number (0 = skip)"), default=32,
                   help="perplexity windows (0 = skip)")
    p.add_argument("--repeats", type=positive, default=3, help="generation runs per model")
    p.add_argument("--prompt-tokens", type=positive, default=64)
    p.add_argument("--new-tokens", type=positive, default=64)
    p.add_argument("--out", default="results/deploy.json")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="quept-deploy-"))
    res: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                 f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}",
                 "kernel": kernels.load() is not None}

    model, tok = quept.load(a.elastic)
    # Packed sizes (on disk and per quantized weight) at every width.
    res["packed"] = {}
    for b in WIDTHS:
        meta = api.export(model, b, work / f"w{b}", tokenizer=tok)
        res["packed"][b] = {**meta["sizes"],
                            "file_mb": (work / f"w{b}" / "packed.safetensors").stat().st_size / 1e6}
    # Compact checkpoint: size, load, materialise.
    meta = api.save_compact(model, work / "compact", quept.QuEPTConfig.from_dict(
        quept.read_meta(a.elastic)["config"]), tok)
    t0 = time.perf_counter()
    compact, _ = api.load_compact(work / "compact")
    load_s = time.perf_counter() - t0
    mat = {}
    for b in WIDTHS:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            pack_model(compact, b)
            times.append(time.perf_counter() - t0)
        mat[b] = statistics.median(times)
    res["compact"] = {**meta["sizes"], "load_seconds": load_s, "materialise_seconds": mat,
                      "file_mb": (work / "compact" / "compact.safetensors").stat().st_size / 1e6}

    # Speed: float32 vs packed at every width (kernel), plus PyTorch's int4 and plain dequant.
    text = data.evaluation_text()
    prompt = tok(text[:2000], return_tensors="pt").input_ids[:, : a.prompt_tokens]
    res.update(base_model=quept.read_meta(a.elastic)["base_model"], repeats=a.repeats,
               prompt_tokens=prompt.shape[1], new_tokens=a.new_tokens)
    flt, _ = quept.load_model(res["base_model"])
    res["speed"] = {"float32": speed(flt, tok, prompt, a.new_tokens, a.repeats)}
    del flt
    for b in WIDTHS:
        pm, _ = api.load_packed(work / f"w{b}")
        res["speed"][f"W{b}"] = {**speed(pm, tok, prompt, a.new_tokens, a.repeats),
                                 **resident_mb(pm)}
    for backend in ("aten-int4", "dequant"):
        pm, _ = api.load_packed(work / "w4", backend=backend)
        res["speed"][f"W4 {backend}"] = speed(pm, tok, prompt, a.new_tokens, a.repeats)
    base = res["speed"]["float32"]["decode_tok_s"]
    for v in res["speed"].values():
        v["decode_vs_float32"] = v["decode_tok_s"] / base

    # Perplexity: compact checkpoint vs the elastic folder at every width.
    if a.windows:
        windows = api.windows_from_text(tok, text, 512, a.windows)
        el = {r.bits: r.ppl for r in api.evaluate(model, windows, list(WIDTHS), progress=False)}
        co = {r.bits: r.ppl for r in api.evaluate(compact, windows, list(WIDTHS), progress=False)}
        res["perplexity"] = {"windows": a.windows, "elastic": el, "compact": co,
                             "change_pct": {b: 100 * (co[b] / el[b] - 1) for b in WIDTHS}}
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def report(res: dict) -> None:
    print(f"\n{res['machine']}; fused kernel: {res['kernel']}")
    if "repeats" in res:
        print(f"float32: {model_name(res['base_model'])}; every row: {res['prompt_tokens']}-token "
              f"prompt, {res['new_tokens']} new tokens, median of {res['repeats']} runs")
    print()
    print("| config | bits/weight | quantized MB | file MB | prefill tok/s | decode tok/s | "
          "decode vs fp32 |\n|---|---|---|---|---|---|---|")
    for k, v in res["speed"].items():
        b = k[1:2] if k.startswith("W") else None
        pk = res["packed"].get(int(b)) if b else None
        size = (f"{pk['bits_per_weight']:.3f} | {pk['quantized_bytes'] / 1e6:.1f} | "
                f"{pk['file_mb']:.1f}") if pk and " " not in k else "32 | | " if not b else " | | "
        print(f"| {k} | {size} | {v['prefill_tok_s']:.1f} | {v['decode_tok_s']:.1f} | "
              f"{v['decode_vs_float32']:.2f}x |")
    c = res["compact"]
    print(f"\ncompact: {c['bits_per_weight']:.3f} bits per weight "
          f"({', '.join(f'{k} {v:.3f}' for k, v in c['parts_bits_per_weight'].items())}), "
          f"file {c['file_mb']:.1f} MB, load {c['load_seconds']:.2f}s, materialise "
          + ", ".join(f"W{b} {s:.2f}s" for b, s in c["materialise_seconds"].items()))
    if "perplexity" in res:
        pp = res["perplexity"]
        print(f"\nperplexity ({pp['windows']} x 512 tokens) | "
              + " | ".join(f"W{b}" for b in WIDTHS))
        print("|---" * (len(WIDTHS) + 1) + "|")
        for name in ("elastic", "compact"):
            print(f"| {name} | " + " | ".join(f"{pp[name][b]:.2f}" for b in WIDTHS) + " |")
        print("| change % | " + " | ".join(f"{pp['change_pct'][b]:+.2f}" for b in WIDTHS) + " |")


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
