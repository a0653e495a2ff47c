"""Switching width at run time with packed layers (``quept.load_switchable``): switch time,
memory and decode speed (also with the output head packed at 8 bits), against a packed folder
of one width and the fake-quantized compact model, and the switched model's logits against
the exported packed folders.

Run from the repository root under the shared lock (it times things):

    quept compact quept-elastic --out quept-compact
    flock /tmp/quept-heavy.lock python benchmarks/switchable.py --compact quept-compact

Each way of running is measured in its own process (memory is the process's resident set after
loading, minus the same process's before; peak = high-water mark, minus the same). Speed: batch
1, a 64-token prompt of Pride and Prejudice, 32 new tokens (greedy, KV cache), median of
--repeats runs after one untimed warm-up run (first runs are far slower). Switch time: the
median over --cycles passes through every width, and over ten switches between W3 and W4 with
the packed layers of both kept (--keep-mb). Writes results/switchable.json and prints markdown
tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WIDTHS = (2, 3, 4, 5, 6, 7, 8)
MODES = ("switchable", "switchable, 8-bit head", "packed", "fake-quant")


def rss_mb() -> tuple[float, float]:
    """(resident MB now, peak resident MB) of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def decode_speed(model, tok, prompt, new: int, repeats: int) -> dict:
    from quept.export.runtime import generate

    generate(model, tok, prompt, new, stop_at_eos=False)  # warm-up, untimed
    runs = [generate(model, tok, prompt, new, stop_at_eos=False) for _ in range(repeats)]
    return {"prefill_tok_s": statistics.median(r.prefill_tokens_per_second for r in runs),
            "decode_tok_s": statistics.median(r.decode_tokens_per_second for r in runs),
            "text": runs[0].text}


def child(a: argparse.Namespace) -> dict:
    """One way of running, measured in this process; prints its JSON."""
    import transformers  # noqa: F401  (imported before the baseline, as every mode needs it)

    import quept
    from quept import api, data
    from quept.api.models import folder_tokenizer
    from quept.ops import kernels

    kernels.load()
    tok = folder_tokenizer(a.compact)
    text = data.evaluation_text()
    prompt = tok(text[:2000], return_tensors="pt").input_ids[:, : a.prompt_tokens]
    before, _ = rss_mb()
    t0 = time.perf_counter()
    if a.child == "switchable":
        model, _ = quept.load_switchable(a.compact, 4)
    elif a.child == "switchable, 8-bit head":
        model, _ = quept.load_switchable(a.compact, 4, head_bits=8)
    elif a.child == "packed":
        model, _ = api.load_packed(Path(a.work) / "w4")
    else:
        model, _ = api.load_compact(a.compact)
        api.set_bits(model, 4)
    load_s = time.perf_counter() - t0
    with torch.no_grad():  # the first forward builds the compute copies (and fake-quant caches)
        model(prompt[:, :8])
    after, peak = rss_mb()
    out = {"mode": a.child, "load_seconds": load_s, "rss_mb": after - before,
           "peak_rss_mb": peak - before,
           "speed": {"W4": decode_speed(model, tok, prompt, a.new_tokens, a.repeats)}}
    if a.child != "switchable":
        return out
    sw = model.quept_switch
    out["sizes"] = sw.sizes()
    switch: dict[int, list[float]] = {b: [] for b in WIDTHS}
    order = (3, 2, 5, 8, 6, 7, 4)  # every width, each switch away from another one
    over = []  # a switch's peak above the resident set after it
    for _ in range(a.cycles):
        for b in order:
            Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark
            switch[b].append(sw.set_bits(b).seconds)
            now, peak = rss_mb()
            over.append(peak - now)
    out["switch_peak_over_resident_mb"] = max(over)
    out["resident_mb_after_switching"] = rss_mb()[0] - before
    out["switch_seconds"] = {b: statistics.median(v) for b, v in switch.items()}
    out["switch_seconds_all"] = switch
    # toggling between two widths whose packed layers are kept (--keep-mb)
    sw.keep_bytes = int(a.keep_mb * 1e6)
    sw.set_bits(3)
    sw.set_bits(4)
    toggles = [sw.set_bits(b) for _ in range(5) for b in (3, 4)]
    out["toggle_kept"] = {"keep_mb": a.keep_mb, "kept_mb": sw.kept_bytes() / 1e6,
                          "reused": min(r.reused for r in toggles),
                          "seconds": statistics.median(r.seconds for r in toggles)}
    sw.keep_bytes = 0
    sw.set_bits(3)  # drops what was kept
    out["packed_mb"], out["exact"] = {}, {}
    ids = prompt[:, :64]
    for b in WIDTHS:
        sw.set_bits(b)
        out["packed_mb"][b] = sw.sizes()["packed_bytes"] / 1e6
        with torch.no_grad():
            mine = model(ids).logits
            ref = api.load_packed(Path(a.work) / f"w{b}")[0](ids).logits
        out["exact"][b] = (mine - ref).abs().max().item()
        if b != 4:
            out["speed"][f"W{b}"] = decode_speed(model, tok, prompt, a.new_tokens, a.repeats)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--compact", required=True, help="compact checkpoint (`quept compact`)")
    p.add_argument("--work", default=None, help="folder for the packed folders it exports")
    p.add_argument("--repeats", type=int, default=3, help="generation runs per measurement")
    p.add_argument("--cycles", type=int, default=3, help="passes through every width")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--keep-mb", type=float, default=120.0,
                   help="packed layers kept while toggling between W3 and W4")
    p.add_argument("--out", default="results/switchable.json")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return 0

    from quept import api

    work = Path(a.work or tempfile.mkdtemp(prefix="quept-switch-"))
    model, tok = api.load_compact(a.compact)
    files = {}
    for b in WIDTHS:
        api.export(model, b, work / f"w{b}", tokenizer=tok)
        files[b] = (work / f"w{b}" / "packed.safetensors").stat().st_size / 1e6
    del model
    res: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}",
        "compact": str(a.compact), "date": time.strftime("%Y-%m-%d"),
        "settings": {"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                     "repeats": a.repeats, "warmup_runs": 1, "cycles": a.cycles},
        "packed_file_mb": files,
        "compact_file_mb": (Path(a.compact) / "compact.safetensors").stat().st_size / 1e6,
        "modes": {}}
    for mode in MODES:
        argv = [sys.executable, __file__, "--child", mode, "--compact", str(a.compact), "--work",
                str(work), "--repeats", str(a.repeats), "--cycles", str(a.cycles),
                "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                "--keep-mb", str(a.keep_mb)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"the {mode} measurement failed (exit {done.returncode})")
        res["modes"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
    res = json.loads(json.dumps(res))  # keys as the file has them
    report(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


def report(res: dict) -> None:
    m = res["modes"]
    print(f"\n{res['machine']}; {res['settings']}\n")
    print("| way of running (W4) | load s | resident MB | peak MB | prefill tok/s | decode tok/s |"
          "\n|---|---|---|---|---|---|")
    for mode, v in m.items():
        s = v["speed"]["W4"]
        print(f"| {mode} | {v['load_seconds']:.1f} | {v['rss_mb']:.0f} | {v['peak_rss_mb']:.0f} | "
              f"{s['prefill_tok_s']:.1f} | {s['decode_tok_s']:.1f} |")
    sw = m["switchable"]
    print("\n| width | switch s (median) | packed MB in memory | packed file MB | decode tok/s | "
          "max logit diff vs packed folder |\n|---|---|---|---|---|---|")
    for b in WIDTHS:
        k = str(b)
        print(f"| W{b} | {sw['switch_seconds'][k]:.2f} | {sw['packed_mb'][k]:.1f} | "
              f"{res['packed_file_mb'][k]:.1f} | {sw['speed'][f'W{b}']['decode_tok_s']:.1f} | "
              f"{sw['exact'][k]:.3g} |")
    t = sw["toggle_kept"]
    print(f"\ntoggling W3 <-> W4 with {t['keep_mb']:.0f} MB kept: median {t['seconds'] * 1e3:.1f} ms "
          f"a switch, {t['reused']} layers reused at least, {t['kept_mb']:.1f} MB kept")
    s = sw["sizes"]
    every = sum(res["packed_file_mb"].values())
    print(f"\nsource of every width in memory: {s['source_bytes'] / 1e6:.1f} MB "
          f"({s['source_bits_per_weight']:.2f} bits per weight); the seven packed files: "
          f"{every:.1f} MB; resident after the switches {sw['resident_mb_after_switching']:.0f} "
          f"MB, a switch's peak at most {sw['switch_peak_over_resident_mb']:.0f} MB above it")


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
