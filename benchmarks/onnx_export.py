"""ONNX export of an elastic folder, run by ONNX Runtime: perplexity, size and speed.

For every width (and a plan, with --plan) this exports the model with MatMulNBits layers
(`quept export --format onnx`) and measures, on Pride and Prejudice:

- perplexity of the elastic model at that width (PyTorch, fake quantization) and of the ONNX
  file in ONNX Runtime (CPU execution provider) over the same windows;
- the file size and the stored bits per quantized weight (MatMulNBits containers: 3 bits in 4,
  5-7 bits in 8; float32 scales);
- the time of one forward pass, batch 1, over --seq-len tokens (a prompt) and over 1 token (the
  weight-bound case), for ONNX Runtime on each export, ONNX Runtime on the float32 model and
  PyTorch float32: after all exports, the models take turns, --repeats rounds, medians.

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", required=True, help="calibrated elastic folder")
    p.add_argument("--bits", default="2,3,4,5,6,7,8", help="widths, comma-separated")
    p.add_argument("--plan", default=None, help="also export this plan (from `quept plan`)")
    p.add_argument("--windows", type=int, default=32, help="perplexity windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per model")
    p.add_argument("--accuracy-level", type=int, default=0,
                   help="MatMulNBits accuracy level of the exports (4 = int8 activations)")
    p.add_argument("--work", default=None, help="folder for the exports (default: a temp dir)")
    p.add_argument("--out", default="results/onnx_export.json")
    a = p.parse_args()
    import onnxruntime

    work = Path(a.work or tempfile.mkdtemp(prefix="quept-onnx-"))
    model, tok = quept.load(a.elastic)
    windows = api.windows_from_text(tok, data.evaluation_text(), a.seq_len, a.windows)
    base, _ = quept.load_model(quept.read_meta(a.elastic)["base_model"])
    with torch.no_grad():
        float_ppl = perplexity(base, windows)
    export_float(base, work / "float32")
    configs: list[tuple[str, object]] = [(f"W{b}", int(b)) for b in a.bits.split(",")]
    if a.plan:
        configs.append((f"plan {Path(a.plan).name}", read_widths(a.plan)))
    rows = []
    for label, widths in configs:
        out = work / label.replace(" ", "_")
        t0 = time.perf_counter()
        summary = api.export(model, widths, out, "onnx", tokenizer=tok,
                             accuracy_level=a.accuracy_level)
        row = {"config": label, "folder": out.name, "export_seconds": time.perf_counter() - t0,
               **{k: summary[k] for k in ("bits_per_weight", "quantized_bytes", "file_bytes",
                                          "widths", "containers")}}
        with torch.no_grad():
            api.set_bits(model, widths)
            row["elastic"] = perplexity(model, windows)
            row["onnxruntime"] = perplexity(OrtModel(out), windows)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del model
    timing = time_all(base, work, [r["folder"] for r in rows], windows[:1], a.repeats)
    for r in rows:
        r["forward_ms"] = timing.pop(r["folder"])
    res = {"elastic": Path(a.elastic).name, "windows": a.windows, "seq_len": a.seq_len,
           "repeats": a.repeats, "accuracy_level": a.accuracy_level,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                      f"{torch.__version__}, onnxruntime {onnxruntime.__version__}",
           "float32": {"ppl": float_ppl, "forward_ms": timing}, "rows": rows}
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def export_float(base: torch.nn.Module, folder: Path) -> None:
    """The float32 base model as ONNX (the same graph, plain MatMuls), ONNX Runtime's own
    baseline."""
    from quept.export.onnx_format import ONNX_FILE, _example, _Graph

    args, names, output, shapes = _example(base, "causal-lm")
    with torch.no_grad():
        program = torch.onnx.export(_Graph(base, "causal-lm").eval(), args, dynamo=True,
                                    input_names=names, output_names=[output],
                                    dynamic_shapes=shapes, opset_version=18)
    folder.mkdir(parents=True, exist_ok=True)
    program.save(str(folder / ONNX_FILE))
    base.config.save_pretrained(folder)
    (folder / "quept-export.json").write_text(json.dumps(
        {"format": "onnx", "task": "causal-lm", "output": output, "bits": None}))


def time_all(base: torch.nn.Module, work: Path, folders: list[str], window: torch.Tensor,
             repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of one forward over the window and over its first token, per model; the
    models take turns in every round."""
    models = {"torch": base, "onnxruntime float32": OrtModel(work / "float32"),
              **{f: OrtModel(work / f) for f in folders}}
    inputs = {"prompt": window, "one_token": window[:, :1]}
    times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in inputs} for m in models}
    with torch.no_grad():
        for rnd in range(repeats + 1):
            for name, m in models.items():
                for k, ids in inputs.items():
                    t0 = time.perf_counter()
                    m(ids, use_cache=False)
                    if rnd:  # round 0 warms up
                        times[name][k].append(time.perf_counter() - t0)
    return {m: {k: 1e3 * statistics.median(v) for k, v in d.items()} for m, d in times.items()}


def report(res: dict) -> None:
    f = res["float32"]
    t = f["forward_ms"]
    print(f"\n{res['machine']}; MatMulNBits accuracy level {res['accuracy_level']}; "
          f"perplexity over {res['windows']} x {res['seq_len']} tokens; "
          f"forward ms of 1 x {res['seq_len']} tokens and of 1 token, median of "
          f"{res['repeats']} rounds\n")
    print("| config | bits/weight | file MB | elastic (torch) | ONNX Runtime | forward "
          f"{res['seq_len']} tok | forward 1 tok |\n|---|---|---|---|---|---|---|")
    print(f"| float32, torch | 32 | | {f['ppl']:.3f} | | {t['torch']['prompt']:.0f} | "
          f"{t['torch']['one_token']:.1f} |")
    o = t["onnxruntime float32"]
    print(f"| float32, ONNX Runtime | 32 | | | | {o['prompt']:.0f} | {o['one_token']:.1f} |")
    for r in res["rows"]:
        ms = r["forward_ms"]
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
              f"{r['elastic']:.3f} | {r['onnxruntime']:.3f} | {ms['prompt']:.0f} | "
              f"{ms['one_token']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
