"""ONNX export of an elastic folder, run by ONNX Runtime: perplexity, size and speed.

For every width (and a plan, with --plan) this exports the model with MatMulNBits layers
(`quept export --format onnx`) and measures, on Pride and Prejudice:

- perplexity of the elastic model at that width (PyTorch, fake quantization) and of the ONNX
  file in ONNX Runtime (CPU execution provider) over the same windows;
- the file size and the stored bits per quantized weight (MatMulNBits containers: 3 bits in 4,
  5-7 bits in 8; float32 scales);
- the time of one forward pass over one window (batch 1, --seq-len tokens), median of
  --repeats, for ONNX Runtime on the export and for PyTorch float32 on the base model, in this
  one process.

Run from the repository root under the shared lock (it times things):

    flock /tmp/quept-heavy.lock python benchmarks/onnx_export.py --elastic quept-elastic

Writes results/onnx_export.json and prints a markdown table.
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

import quept
from quept import api, data
from quept.eval import perplexity
from quept.export.onnx_format import OrtModel
from quept.search.plan import read_widths


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", required=True, help="calibrated elastic folder")
    p.add_argument("--bits", default="2,3,4,5,6,7,8", help="widths, comma-separated")
    p.add_argument("--plan", default=None, help="also export this plan (from `quept plan`)")
    p.add_argument("--windows", type=int, default=32, help="perplexity windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per model")
    p.add_argument("--work", default=None, help="folder for the exports (default: a temp dir)")
    p.add_argument("--out", default="results/onnx_export.json")
    a = p.parse_args()
    import onnxruntime

    work = Path(a.work or tempfile.mkdtemp(prefix="quept-onnx-"))
    model, tok = quept.load(a.elastic)
    windows = api.windows_from_text(tok, data.evaluation_text(), a.seq_len, a.windows)
    one = windows[:1]
    base, _ = quept.load_model(quept.read_meta(a.elastic)["base_model"])
    with torch.no_grad():
        float_s = median_seconds(lambda m=base: m(one, use_cache=False), a.repeats)
        float_ppl = perplexity(base, windows)
    del base
    configs: list[tuple[str, object]] = [(f"W{b}", int(b)) for b in a.bits.split(",")]
    if a.plan:
        configs.append((f"plan {Path(a.plan).name}", read_widths(a.plan)))
    rows = []
    for label, widths in configs:
        out = work / label.replace(" ", "_")
        t0 = time.perf_counter()
        summary = api.export(model, widths, out, "onnx", tokenizer=tok)
        row = {"config": label, "export_seconds": time.perf_counter() - t0,
               **{k: summary[k] for k in ("bits_per_weight", "quantized_bytes", "file_bytes",
                                          "widths", "containers")}}
        with torch.no_grad():
            api.set_bits(model, widths)
            row["elastic"] = perplexity(model, windows)
            ort_model = OrtModel(out)
            row["onnxruntime"] = perplexity(ort_model, windows)
            row["forward_seconds"] = median_seconds(lambda m=ort_model: m(one), a.repeats)
        row["speedup_vs_torch_float32"] = float_s / row["forward_seconds"]
        del ort_model
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"elastic": Path(a.elastic).name, "windows": a.windows, "seq_len": a.seq_len,
           "repeats": a.repeats,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                      f"{torch.__version__}, onnxruntime {onnxruntime.__version__}",
           "torch_float32": {"ppl": float_ppl, "forward_seconds": float_s}, "rows": rows}
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def report(res: dict) -> None:
    f = res["torch_float32"]
    print(f"\n{res['machine']}; perplexity over {res['windows']} x {res['seq_len']} tokens; "
          f"forward of 1 x {res['seq_len']} tokens, median of {res['repeats']}\n")
    print("| config | bits/weight | file MB | elastic (torch) | ONNX Runtime | forward ms | "
          "vs torch float32 |\n|---|---|---|---|---|---|---|")
    print(f"| float32 (torch) | 32 | | {f['ppl']:.3f} | | {1e3 * f['forward_seconds']:.0f} | "
          "1.00x |")
    for r in res["rows"]:
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
              f"{r['elastic']:.3f} | {r['onnxruntime']:.3f} | {1e3 * r['forward_seconds']:.0f} "
              f"| {r['speedup_vs_torch_float32']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
