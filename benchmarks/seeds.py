"""How much one calibration moves with its seed: the same preset calibrated once per seed.

Every figure in the docs is one calibration. This says how far apart two calibrations that
differ only in their seed land at each width, so that a difference between settings (or
against a peer) can be read against it. ``--data-seed N`` draws the calibration windows with
seed N in every run, so only the adapter initialisation and the bit draws change (what differs
between two runs on the peers' shared windows); without it each run draws its own windows too
(what a user changing ``quept quantize --seed`` gets).

Prints a markdown table (perplexity per width and seed, mean, and the spread: largest minus
smallest over the mean) and writes JSON after every run, so a long series can be stopped and
resumed (``--resume``). Run from the repository root:

    python benchmarks/seeds.py --seeds 0,1,2 --data-seed 0 --out results/seeds_demo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import quept
from quept import data
from quept.cli.common import positive
from quept.config import PRESET_SPECS, PRESETS, QuEPTConfig


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def spread(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width (float first, then by bits) over ``runs`` (each ``{"seed", "rows": [{"bits",
    "ppl"}]}``): every seed's perplexity, their mean, population standard deviation, and the
    spread (max - min) / mean."""
    widths: dict[int | None, dict[int, float]] = {}
    for run in runs:
        for row in run["rows"]:
            widths.setdefault(row["bits"], {})[run["seed"]] = row["ppl"]
    out = []
    for bits in sorted(widths, key=lambda b: -1 if b is None else b):
        ppl = widths[bits]
        values = list(ppl.values())
        mean = statistics.fmean(values)
        out.append({"bits": bits, "ppl": ppl, "mean": mean,
                    "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                    "spread": (max(values) - min(values)) / mean})
    return out


def _calibrate_one(cfg: QuEPTConfig, seed: int, data_seed: int | None, model_id: str | None,
                   calib_text: str, eval_ids: torch.Tensor, bits: list[int]) -> dict[str, Any]:
    calib = replace(cfg.calib, seed=seed)
    model, tok = quept.load_model(model_id)
    quept.prepare(model, cfg.spec, seed=seed)
    ids = quept.samples_from_text(tok, calib_text, calib if data_seed is None
                                  else replace(calib, seed=data_seed))
    t0 = time.perf_counter()
    quept.calibrate(model, ids, calib)
    seconds = time.perf_counter() - t0
    rows = quept.evaluate(model, eval_ids, [None, *bits])
    return {"seed": seed, "data_seed": seed if data_seed is None else data_seed,
            "calibration_seconds": seconds,
            "rows": [{"bits": r.bits, "ppl": r.ppl, "bits_per_weight": r.bits_per_weight}
                     for r in rows]}


def _print(result: dict[str, Any]) -> None:
    seeds = [r["seed"] for r in result["runs"]]
    print(f"\n{result['model']}; {result['eval']}; preset {result['preset']}; "
          f"{result['windows_drawn']}\n")
    print("| width | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | spread |")
    print("|---" * (len(seeds) + 4) + "|")
    for row in result["spread"]:
        cells = " | ".join(f"{row['ppl'][s]:.2f}" for s in seeds)
        name = "float" if row["bits"] is None else f"W{row['bits']}"
        print(f"| {name} | {cells} | {row['mean']:.2f} | {row['std']:.2f} | "
              f"{row['spread']:.1%} |")
    times = [r["calibration_seconds"] for r in result["runs"]]
    print(f"\ncalibration {statistics.median(times):.0f}s median over {len(times)} runs")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="default 0,1,2")
    p.add_argument("--data-seed", type=int, default=None,
                   help="draw the calibration windows with this seed in every run (default: "
                   "each run's own seed)")
    p.add_argument("--model", default=None, help="model folder (default: the built-in one)")
    p.add_argument("--calib-text", default=None, help="text file (default: the other novels)")
    p.add_argument("--eval-text", default=None, help="text file (default: Pride and Prejudice)")
    p.add_argument("--windows", type=positive, default=32, help="evaluation windows (default 32)")
    p.add_argument("--seq-len", type=positive, default=512, help="tokens per window (default 512)")
    p.add_argument("--samples", type=positive, default=None, help="calibration windows (default: "
                   "the preset's)")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="tokens per calibration window (default: the preset's)")
    p.add_argument("--bits", type=_ints, default=None, help="widths (default: the preset's)")
    p.add_argument("--protect-outliers", type=float, default=None, metavar="RATIO",
                   help="hold super weights exact (ElasticSpec.protect_outliers; default: the "
                   "preset's)")
    p.add_argument("--massive-ratio", type=float, default=None, metavar="RATIO",
                   help="the massive-activation term (CalibConfig.massive_ratio; default: the "
                   "preset's)")
    p.add_argument("--threads", type=positive, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out (same settings) and do the others")
    p.add_argument("--out", default="results/seeds.json", help="JSON output path")
    a = p.parse_args(argv)
    if len(set(a.seeds)) != len(a.seeds):
        raise SystemExit(f"--seeds: each seed once, got {a.seeds}")
    if a.threads:
        torch.set_num_threads(a.threads)

    calib = PRESETS[a.preset]
    calib = replace(calib, n_samples=a.samples or calib.n_samples,
                    seq_len=a.calib_seq_len or calib.seq_len)
    if a.massive_ratio is not None:
        calib = replace(calib, massive_ratio=a.massive_ratio)
    spec = PRESET_SPECS[a.preset]
    if a.protect_outliers is not None:
        spec = replace(spec, protect_outliers=a.protect_outliers)
    cfg = QuEPTConfig(spec=spec, calib=calib)
    bits = a.bits or sorted(cfg.spec.bits)
    calib_text = (data.load_texts([a.calib_text]) if a.calib_text
                  else data.calibration_text())
    eval_text = data.load_texts([a.eval_text], role="eval") if a.eval_text else \
        data.evaluation_text()
    _, tok = quept.load_model(a.model)
    eval_ids = quept.windows_from_text(tok, eval_text, a.seq_len, a.windows)
    settings = {"preset": a.preset, "config": cfg.to_dict(), "data_seed": a.data_seed,
                "bits": bits, "windows": eval_ids.shape[0], "seq_len": a.seq_len,
                "model": a.model or "SmolLM2-135M-Instruct (float = dequantized Q4_1)"}
    settings = json.loads(json.dumps(settings))  # as it reads back from the JSON
    out = Path(a.out)
    runs: list[dict[str, Any]] = []
    if a.resume and out.is_file():
        old = json.loads(out.read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"--resume: {out} holds runs of other settings; give another --out")
        runs = [r for r in old["runs"] if r["seed"] in a.seeds]
    done = {r["seed"] for r in runs}
    def record() -> dict[str, Any]:
        return {
            "settings": settings, "model": settings["model"], "preset": a.preset,
            "eval": f"{eval_ids.shape[0]} x {a.seq_len} tokens of "
                    + (Path(a.eval_text).name if a.eval_text else "Pride and Prejudice"),
            "windows_drawn": (f"calibration windows drawn with seed {a.data_seed} in every run"
                              if a.data_seed is not None else
                              "calibration windows drawn with each run's seed"),
            "runs": runs, "spread": spread(runs),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}",
            "command": "python benchmarks/seeds.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
        }

    for seed in a.seeds:
        if seed in done:
            print(f"seed {seed}: kept from {out}", file=sys.stderr)
            continue
        print(f"seed {seed}: calibrating ({a.preset})", file=sys.stderr)
        runs.append(_calibrate_one(cfg, seed, a.data_seed, a.model, calib_text, eval_ids,
                                   bits))
        runs.sort(key=lambda r: a.seeds.index(r["seed"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record(), indent=1))
    result = record()
    _print(result)
    return result


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
