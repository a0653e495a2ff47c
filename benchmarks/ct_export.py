"""compressed-tensors export of an elastic folder, read back by other people's code.

For every width (and a plan, with --plan) this writes the compressed-tensors folder (float16
scales by default) and measures perplexity on Pride and Prejudice three ways:

- elastic: the elastic model at that width (fake quantization, quept's own forward);
- transformers: ``AutoModelForCausalLM.from_pretrained(folder,
  quantization_config=CompressedTensorsConfig(dequantize=True))``, transformers' own loader
  with the compressed-tensors package (uniform widths only: that route applies one scheme to
  every layer);
- compressed-tensors: each layer matched to its config group and dequantized by the
  compressed-tensors package (``quept eval FOLDER``).

Run from the repository root under the shared lock:

    flock /tmp/quept-heavy.lock python benchmarks/ct_export.py --elastic quept-elastic

Writes results/ct_export.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import quept
from quept import api, data
from quept.cli.common import positive
from quept.eval import perplexity
from quept.export.ct_format import load_compressed_tensors
from quept.search.plan_files import read_widths

WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", required=True, help="calibrated elastic folder")
    p.add_argument("--bits", default=",".join(map(str, WIDTHS)), help="widths, comma-separated")
    p.add_argument("--plan", default=None, help="also export this plan (from `quept plan`)")
    p.add_argument("--scale-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--windows", type=positive, default=32, help="perplexity windows of 512 tokens")
    p.add_argument("--work", default=None, help="folder for the exports (default: a temp dir)")
    p.add_argument("--out", default="results/ct_export.json")
    a = p.parse_args()
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    work = Path(a.work or tempfile.mkdtemp(prefix="quept-ct-"))
    model, tok = quept.load(a.elastic)
    windows = api.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
    configs: list[tuple[str, object]] = [(f"W{b}", int(b)) for b in a.bits.split(",")]
    if a.plan:
        configs.append((f"plan {Path(a.plan).name}", read_widths(a.plan)))
    rows = []
    for label, widths in configs:
        out = work / label.replace(" ", "_")
        t0 = time.perf_counter()
        summary = api.export(model, widths, out, "compressed-tensors", tokenizer=tok,
                             scale_dtype=a.scale_dtype)
        row = {"config": label, "export_seconds": time.perf_counter() - t0,
               **{k: summary[k] for k in ("bits_per_weight", "quantized_bytes", "file_bytes",
                                          "widths")}}
        api.set_bits(model, widths)
        row["elastic"] = perplexity(model, windows, progress=False)
        if isinstance(widths, int):
            hf = AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32,
                quantization_config=CompressedTensorsConfig(dequantize=True))
            row["transformers"] = perplexity(hf.eval(), windows, progress=False)
            del hf
        ct = load_compressed_tensors(out, AutoModelForCausalLM)
        row["compressed_tensors"] = perplexity(ct, windows, progress=False)
        del ct
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"elastic": Path(a.elastic).name, "windows": a.windows, "seq_len": 512,
           "scale_dtype": a.scale_dtype,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                      f"{torch.__version__}",
           "versions": {"transformers": transformers.__version__,
                        "compressed_tensors": compressed_tensors.__version__},
           "rows": rows}
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def report(res: dict) -> None:
    print(f"\n{res['machine']}; transformers {res['versions']['transformers']}, "
          f"compressed-tensors {res['versions']['compressed_tensors']}; perplexity over "
          f"{res['windows']} x 512 tokens, {res['scale_dtype']} scales\n")
    print("| config | bits/weight | file MB | elastic | transformers | compressed-tensors |\n"
          "|---|---|---|---|---|---|")
    for r in res["rows"]:
        tf = f"{r['transformers']:.3f}" if "transformers" in r else "n/a"
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
              f"{r['elastic']:.3f} | {tf} | {r['compressed_tensors']:.3f} |")


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
