"""Foundation figures: one elastic model vs round-to-nearest at every width, plus the cost.

Prints a markdown table and writes JSON. By default it calibrates the built-in model with the
demo settings (the same as ``quept quantize``); ``--elastic FOLDER`` evaluates an existing
elastic folder instead. Run from the repository root:

    python benchmarks/foundation.py --out results/foundation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from model_label import group_label, model_label  # benchmarks/

import quept
from quept import data
from quept.cli.common import positive
from quept.config import PRESETS, ElasticSpec, QuEPTConfig


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def switch_times_ms(model: torch.nn.Module, n: int = 20) -> dict[str, float]:
    """Median time of set_bits alone, and of set_bits plus materialising every weight."""
    widths = sorted(model.quept_spec.bits)
    switch, materialise = [], []
    layers = quept.nn.elastic_layers(model).values()
    with torch.no_grad():
        for i in range(n):
            b = widths[i % len(widths)]
            t0 = time.perf_counter()
            quept.set_bits(model, b)
            t1 = time.perf_counter()
            for m in layers:
                m.current_weight()
            t2 = time.perf_counter()
            switch.append((t1 - t0) * 1e3)
            materialise.append((t2 - t0) * 1e3)
    quept.set_bits(model, None)
    return {"set_bits_ms": statistics.median(switch),
            "set_bits_and_materialise_ms": statistics.median(materialise)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default=None, help="evaluate this elastic folder (no calibration)")
    p.add_argument("--windows", type=positive, default=32,
                   help="512-token windows of P&P (default 32)")
    p.add_argument("--bits", default="2,3,4,5,6,7,8", help="widths to evaluate")
    p.add_argument("--out", default="results/foundation.json", help="JSON output path")
    a = p.parse_args()

    t0 = time.perf_counter()
    calib_s, base_model = None, None  # None: the built-in model
    if a.elastic:
        model, tok = quept.load(a.elastic)
        meta = quept.read_meta(a.elastic)
        cfg = QuEPTConfig.from_dict(meta["config"])
        calib_s = meta.get("calibration_seconds")  # as recorded by the run that wrote it
        base_model = meta["base_model"]
    else:
        cfg = QuEPTConfig(spec=ElasticSpec(), calib=PRESETS["cpu-demo"])
        model, tok = quept.load_model()
        quept.prepare(model, cfg.spec, seed=cfg.calib.seed)
        ids = quept.samples_from_text(tok, data.calibration_text(), cfg.calib)
        t1 = time.perf_counter()
        quept.calibrate(model, ids, cfg.calib)
        calib_s = time.perf_counter() - t1
    windows = quept.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
    bits = [int(b) for b in a.bits.split(",")]
    rows = quept.evaluate(model, windows, [None, *bits], rtn=True)
    switch = switch_times_ms(model)
    result = {
        "model": model_label(base_model),
        "eval": f"Pride and Prejudice, {a.windows} x 512 tokens",
        "calibration": f"{cfg.calib.n_samples} x {cfg.calib.seq_len} tokens of the other novels",
        "config": cfg.to_dict(),
        "quantized": "every linear of every decoder block (embeddings/lm_head and norms float)",
        "rows": [r.__dict__ for r in rows],
        "calibration_seconds": calib_s,
        "calibration_reused": bool(a.elastic),
        "total_seconds": time.perf_counter() - t0,
        "peak_rss_gib": peak_rss_gib(),
        **switch,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python benchmarks/foundation.py "
                   + " ".join(Path(x).name if x == a.elastic else x for x in sys.argv[1:]),
    }
    print(f"\n{result['model']}; {result['eval']}; {group_label(cfg.spec)}\n")
    print("| width | bits/weight | QuEPT ppl | RTN ppl |\n|---|---|---|---|")
    for r in rows:
        rtn = "" if r.ppl_rtn is None else f"{r.ppl_rtn:.2f}"
        print(f"| {'float' if r.bits is None else f'W{r.bits}'} | {r.bits_per_weight:.3f} | "
              f"{r.ppl:.2f} | {rtn} |")
    calib = "n/a" if calib_s is None else f"{calib_s:.0f}s"
    if a.elastic:
        calib += " (recorded in the folder)"
    print(f"\ncalibration {calib}, total {result['total_seconds']:.0f}s, "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB, set_bits {switch['set_bits_ms']:.2f} ms "
          f"(with weights materialised {switch['set_bits_and_materialise_ms']:.0f} ms)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
