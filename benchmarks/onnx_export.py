"""ONNX export of an elastic folder, run by ONNX Runtime: perplexity, size and speed.

For every width (and a plan, with --plan) this exports the model with MatMulNBits layers
(`quept export --format onnx`) and measures, on Pride and Prejudice:

- perplexity of the elastic model at that width (PyTorch, fake quantization) and of the ONNX
  file in ONNX Runtime (CPU execution provider) over the same windows;
- the file size and the stored bits per quantized weight (MatMulNBits containers: 3 bits in 4,
  5-7 bits in 8; float32 scales);
- the time of one forward pass, batch 1, over --seq-len tokens (a prompt), and greedy decoding
  with the KV cache (--prompt-tokens tokens of the text, then --new-tokens new ones; tokens per
  second after the first), for PyTorch float32, ONNX Runtime on the float32 export and on each
  export (driven by quept's generation loop), and ONNX Runtime GenAI on the same folders (its own
  loop, with its thread count set to torch's in a copy of genai_config.json): after all exports,
  the models take turns, --repeats rounds, medians.

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
from quept.cli.common import positive
from quept.eval import perplexity
from quept.export.onnx_runtime import OrtModel
from quept.search.plan_files import read_widths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", required=True, help="calibrated elastic folder")
    p.add_argument("--bits", default="2,3,4,5,6,7,8", help="widths, comma-separated")
    p.add_argument("--plan", default=None, help="also export this plan (from `quept plan`)")
    p.add_argument("--windows", type=positive, default=32, help="perplexity windows")
    p.add_argument("--seq-len", type=positive, default=512)
    p.add_argument("--repeats", type=positive, default=5, help="timed rounds per model")
    p.add_argument("--prompt-tokens", type=positive, default=64, help="decoding: prompt length")
    p.add_argument("--new-tokens", type=positive, default=64, help="decoding: tokens generated")
    p.add_argument("--packed-bits", default="",
                   help="also time quept's packed folders (fused kernel) at these widths")
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
    export_float(base, tok, work / "float32")
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
    packed = {}
    for b in filter(None, a.packed_bits.split(",")):
        api.export(model, int(b), work / f"packed-W{b}", "quept", tokenizer=tok)
        packed[f"quept packed W{b}"] = api.load_packed(work / f"packed-W{b}")[0]
    del model
    timing = time_all(base, tok, work, [r["folder"] for r in rows], windows[:1], a, packed)
    for r in rows:
        r["speed"] = timing.pop(r["folder"])
    res = {"elastic": Path(a.elastic).name, "windows": a.windows, "seq_len": a.seq_len,
           "repeats": a.repeats, "accuracy_level": a.accuracy_level,
           "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                      f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, "
                      f"onnxruntime-genai {genai_version()}",
           "float32": {"ppl": float_ppl, "speed": timing}, "rows": rows}
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def genai_version() -> str:
    import onnxruntime_genai

    return onnxruntime_genai.__version__


def export_float(base: torch.nn.Module, tok, folder: Path) -> None:
    """The float32 base model as ONNX (the same graph, plain MatMuls), ONNX Runtime's own
    baseline."""
    from quept.export.onnx_format import save_graph

    save_graph(base, "causal-lm", folder, tok)
    # OrtModel reads bits and bits_per_weight; float32 weights store 32 bits each, as quept
    # eval counts a float model
    (folder / "quept-export.json").write_text(json.dumps(
        {"format": "onnx", "task": "causal-lm", "output": "logits", "bits": "float32",
         "bits_per_weight": 32.0}))


class GenAI:
    """ONNX Runtime GenAI on an export folder, its session held to ``threads`` threads (through
    a copy of the folder whose genai_config.json says so)."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        copy = folder.parent / f"{folder.name}-genai"
        copy.mkdir(exist_ok=True)
        for f in folder.iterdir():
            if f.name != "genai_config.json" and not (copy / f.name).exists():
                (copy / f.name).symlink_to(f.resolve())
        cfg = json.loads((folder / "genai_config.json").read_text())
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (copy / "genai_config.json").write_text(json.dumps(cfg))
        self.model = og.Model(str(copy))

    def decode(self, ids: torch.Tensor, new: int) -> tuple[list[int], float]:
        """Greedy ``new`` tokens after ``ids`` (1, T): the tokens and the seconds of every step
        after the first new token (prefill and first token excluded, as quept run counts)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new,
                                  do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids.numpy().astype("int32"))
        gen.generate_next_token()
        t0 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        seconds = time.perf_counter() - t0
        return [int(t) for t in gen.get_sequence(0)][ids.shape[1]:], seconds


def time_all(base: torch.nn.Module, tok, work: Path, folders: list[str], window: torch.Tensor,
             a: argparse.Namespace, packed: dict[str, torch.nn.Module]
             ) -> dict[str, dict[str, float]]:
    """Per model: median ms of one forward over the window, and median decode tokens per second
    in quept's loop (and ONNX Runtime GenAI's, for ONNX folders); the models take turns in
    every round, round 0 warms up. Greedy tokens of GenAI and of quept's loop must agree."""
    from quept.export.runtime import generate

    models = {"torch": base, "onnxruntime float32": OrtModel(work / "float32"),
              **{f: OrtModel(work / f) for f in folders}}
    genai = {name: GenAI(work / ("float32" if name == "onnxruntime float32" else name),
                         torch.get_num_threads()) for name in models if name != "torch"}
    models.update(packed)
    prompt = window[:, :a.prompt_tokens]
    times: dict[str, dict[str, list[float]]] = {
        m: {"prompt": [], "decode": [], "genai_decode": []} for m in models}
    agree: dict[str, bool] = {}
    with torch.no_grad():
        for rnd in range(a.repeats + 1):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(window, use_cache=False)
                elapsed = time.perf_counter() - t0
                gen = generate(m, tok, prompt, a.new_tokens, stop_at_eos=False, warmup=False)
                if rnd:
                    times[name]["prompt"].append(elapsed)
                    times[name]["decode"].append(gen.decode_tokens_per_second)
                if name in genai:
                    tokens, seconds = genai[name].decode(prompt, a.new_tokens)
                    same = tok.decode(tokens, skip_special_tokens=True) == gen.text
                    agree[name] = agree.get(name, True) and same  # in every round
                    if rnd:
                        times[name]["genai_decode"].append((a.new_tokens - 1) / seconds)
    out = {}
    for m, d in times.items():
        out[m] = {"prompt": 1e3 * statistics.median(d["prompt"]),
                  "decode_tok_s": statistics.median(d["decode"])}
        if d["genai_decode"]:
            out[m]["genai_decode_tok_s"] = statistics.median(d["genai_decode"])
            out[m]["genai_same_text"] = agree[m]
    return out


def report(res: dict) -> None:
    f = res["float32"]
    t = f["speed"]
    print(f"\n{res['machine']}; MatMulNBits accuracy level {res['accuracy_level']}; "
          f"perplexity over {res['windows']} x {res['seq_len']} tokens; "
          f"forward ms of 1 x {res['seq_len']} tokens; decode tokens/s after a "
          f"{res['prompt_tokens']}-token prompt ({res['new_tokens']} new, greedy, KV cache) in "
          f"quept's loop and in ONNX Runtime GenAI; medians of {res['repeats']} rounds\n")
    print("| config | bits/weight | file MB | elastic (torch) | ONNX Runtime | forward "
          f"{res['seq_len']} tok, ms | decode tok/s | GenAI decode tok/s |\n"
          "|---|---|---|---|---|---|---|---|")

    def genai(ms: dict) -> str:
        if "genai_decode_tok_s" not in ms:
            return ""
        same = "" if ms["genai_same_text"] else " (text differs)"
        return f"{ms['genai_decode_tok_s']:.1f}{same}"

    tt = t["torch"]
    print(f"| float32, torch | 32 | | {f['ppl']:.3f} | | {tt['prompt']:.0f} | "
          f"{tt['decode_tok_s']:.1f} | |")
    o = t["onnxruntime float32"]
    print(f"| float32, ONNX Runtime | 32 | | | | {o['prompt']:.0f} | {o['decode_tok_s']:.1f} | "
          f"{genai(o)} |")
    for r in res["rows"]:
        ms = r["speed"]
        print(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
              f"{r['elastic']:.3f} | {r['onnxruntime']:.3f} | {ms['prompt']:.0f} | "
              f"{ms['decode_tok_s']:.1f} | {genai(ms)} |")
    for name, ms in t.items():
        if name.startswith("quept packed"):
            print(f"| {name} (torch, fused kernel) | | | | | {ms['prompt']:.0f} | "
                  f"{ms['decode_tok_s']:.1f} | |")


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
