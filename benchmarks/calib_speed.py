"""Calibration time per block for each way of computing the weight fake quantization.

Calibration fake-quantizes every weight at every training step, forward and backward. This
calibrates the first ``--blocks`` blocks of a model with a preset's settings in each way, taking
turns ``--repeats`` times in one process:

- ``composed``: autograd through the composed PyTorch operations (quept before the fused kernel);
- ``pytorch``: the gradient written out in PyTorch operations (the fallback without a C++
  compiler, and the path on GPUs);
- ``kernel``: the fused CPU kernel of ``quept.ops.fq_kernel`` (the default on CPUs);
- ``kernel-bf16``: the kernel, with the training steps' block forward and backward under
  bfloat16 autocast (``CalibConfig(bf16=True)``, ``quept quantize --bf16``): faster only on a
  CPU with bfloat16 matmuls (AVX-512 BF16 or AMX), and not the same arithmetic, so its block
  losses are the ones to compare.

The first three give the same quantized weights to the bit and the same gradients up to float
rounding; those differences grow through a block's training steps as between any two
calibrations run with other thread counts, so the block losses after training agree to about
a percent, not to the bit. ``--epochs`` shortens
the preset's passes per block (the training part of a block's time scales with it; the clip
search and the streams' passes do not). Prints a table (median seconds per block, the ratio to
``composed``, the block losses) and writes JSON.

    python benchmarks/calib_speed.py --preset cpu-long --blocks 2 --epochs 2 --repeats 3 \\
        --json results/calib_speed.json
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

import torch

import quept
from quept import data
from quept.cli.common import positive
from quept.config import PRESET_SPECS, PRESETS
from quept.nn import elastic_linear
from quept.ops import fq_kernel, quant

WAYS = ("composed", "pytorch", "kernel", "kernel-bf16")


def composed(w, bits, group_size, hi_f, lo_f):
    """fake_quant as composed operations, differentiated by autograd."""
    wg = quant.to_groups(w, group_size)
    scale, zero = quant.qparams(wg, bits, hi_f, lo_f)
    q = torch.clamp(quant.round_ste(wg / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape_as(w)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: the built-in one)")
    p.add_argument("--text", nargs="*", default=None,
                   help="calibration text files (default: the built-in calibration text)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-long")
    p.add_argument("--blocks", type=int, default=2, help="first blocks to calibrate")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes per block (default: the preset's)")
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {WAYS}")
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def calibrate_once(a: argparse.Namespace, way: str, text: str) -> dict:
    """One calibration of the first blocks with fake quantization computed ``way``."""
    model, tok = quept.load_model(a.model)
    blocks = model.model.layers
    model.model.layers = blocks[: a.blocks]
    model.config.num_hidden_layers = a.blocks
    spec = PRESET_SPECS[a.preset]
    cfg = PRESETS[a.preset] if a.epochs is None else replace(PRESETS[a.preset], epochs=a.epochs)
    cfg = replace(cfg, device="cpu", bf16=way == "kernel-bf16")
    quept.prepare(model, spec, seed=cfg.seed)
    ids = quept.samples_from_text(tok, text, cfg)
    real_fq, real_usable = elastic_linear.fake_quant, fq_kernel.usable
    if way == "composed":
        elastic_linear.fake_quant = composed
    elif way == "pytorch":
        fq_kernel.usable = lambda *t: False
    try:
        t0 = time.perf_counter()
        reports = quept.calibrate(model, ids, cfg, progress=False)
        total = time.perf_counter() - t0
    finally:
        elastic_linear.fake_quant, fq_kernel.usable = real_fq, real_usable
    return {"seconds": total, "block_seconds": [r.seconds for r in reports],
            "bits": reports[0].bits, "loss_after": [r.loss_after for r in reports]}


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    ways = a.ways.split(",")
    if not set(ways) <= set(WAYS):
        raise SystemExit(f"--ways: expected some of {WAYS}, got {a.ways}")
    torch.set_num_threads(a.threads)
    if any(w.startswith("kernel") for w in ways) and fq_kernel.load() is None:
        raise SystemExit("the fused kernel is unavailable here (no C++ compiler?)")
    text = data.calibration_text() if a.text is None else data.load_texts(a.text)
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(a.repeats):
        for way in ways:
            run = calibrate_once(a, way, text)
            runs[way].append(run)
            print(f"round {r + 1}/{a.repeats} {way}: {run['seconds']:.1f}s", file=sys.stderr)
    rows = []
    for way in ways:
        per_block = [s for run in runs[way] for s in run["block_seconds"]]
        rows.append({"way": way, "median_block_seconds": statistics.median(per_block),
                     "loss_after_last_run": runs[way][-1]["loss_after"]})
    base = next((r["median_block_seconds"] for r in rows if r["way"] == "composed"), None)
    bits = runs[ways[0]][0]["bits"]
    print(f"\nCalibration of {a.blocks} block(s), preset {a.preset}"
          + (f" at {a.epochs} epoch(s)" if a.epochs is not None else "")
          + f", {a.threads} threads, medians of {a.repeats} runs")
    print(f"| way | s per block | vs composed | block {a.blocks} loss after, at W"
          + "/W".join(map(str, bits)) + " |")
    print("|---|---|---|---|")
    for row in rows:
        ratio = "" if base is None else f"{row['median_block_seconds'] / base:.2f}x"
        losses = " / ".join(f"{v:.5f}" for v in row["loss_after_last_run"][-1])
        print(f"| {row['way']} | {row['median_block_seconds']:.2f} | {ratio} | {losses} |")
    result = {"preset": a.preset, "blocks": a.blocks, "epochs": a.epochs, "repeats": a.repeats,
              "threads": a.threads, "model": a.model or "default", "bits": bits, "rows": rows,
              "runs": runs, "machine": platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
