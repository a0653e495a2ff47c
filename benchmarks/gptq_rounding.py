"""Perplexity of an elastic model's widths with round-to-nearest against GPTQ and learned
rounding.

For each width, on the same evaluation windows (default: 32 x 512 tokens of *Pride and
Prejudice*) and, for the GPTQ rows, the same calibration windows (default: the folder's own
calibration settings, drawn again from the built-in calibration text):

- ``elastic``: the folder as calibrated, round-to-nearest on the learned grid with the adapter
  (what ``quept.set_bits`` runs and ``quept export`` wrote before GPTQ rounding);
- ``gptq``: GPTQ on the learned grid, targeting the base weight (``quept export --rounding
  gptq``, the default of :class:`quept.export.gptq.GPTQConfig`);
- ``gptq-adapters``: GPTQ on the learned grid, targeting the weight with the adapter;
- ``learned``: rounding offsets learned block by block on the learned grid, from nearest
  (``quept export --rounding learned``; the folder's loss settings, ``--iters`` steps);
- ``gptq-minmax``: GPTQ on the min/max grid (no clips, no adapter): GPTQ itself, as this
  project implements it, for reference (the peers' figures come from their own libraries in
  ``benchmarks/peers.py``).

Prints a table and writes JSON. Run from the repository root:

    python benchmarks/gptq_rounding.py --elastic quept-elastic --widths 2,3,4 \\
        --out results/gptq_rounding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import quept
from quept import data
from quept.cli.common import positive
from quept.config import QuEPTConfig
from quept.eval import perplexity
from quept.export.gptq import GPTQConfig, clear_rounding
from quept.export.learned import LearnedRoundingConfig
from quept.nn import elastic_layers
from quept.nn.elastic_linear import NO_CLIP_LOGIT

MODES = ("elastic", "gptq", "gptq-adapters", "gptq-minmax", "learned")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elastic", required=True, help="elastic folder from `quept quantize`")
    p.add_argument("--widths", default="2,3,4", help="comma-separated widths")
    p.add_argument("--modes", default=",".join(MODES[:3]), help=f"comma-separated, of {MODES}")
    p.add_argument("--windows", type=positive, default=32, help="evaluation windows of 512 tokens")
    p.add_argument("--samples", type=positive, default=None,
                   help="calibration sequences (default: the folder's calibration count)")
    p.add_argument("--seq-len", type=positive, default=None,
                   help="tokens per calibration sequence (default: the folder's)")
    p.add_argument("--iters", type=positive, default=LearnedRoundingConfig.iters,
                   help="learned: signed-gradient steps per block")
    p.add_argument("--bf16", action="store_true",
                   help="learned: training steps under bfloat16 autocast (checks in float32)")
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--out", default=None, help="write the result here (JSON)")
    return p.parse_args(argv)


def _unclip(model: torch.nn.Module, bits: int) -> None:
    """Set every layer's clips at ``bits`` to none (the min/max grid) and zero its adapters."""
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.clip_hi[str(bits)].fill_(NO_CLIP_LOGIT)
            m.clip_lo[str(bits)].fill_(NO_CLIP_LOGIT)
            m.lora_u.zero_()


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    widths = [int(b) for b in a.widths.split(",")]
    modes = a.modes.split(",")
    if not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: expected some of {MODES}, got {a.modes}")
    calib = QuEPTConfig.from_dict(quept.read_meta(a.elastic)["config"]).calib
    calib = replace(calib, n_samples=a.samples or calib.n_samples,
                    seq_len=a.seq_len or calib.seq_len)
    learned = LearnedRoundingConfig(iters=a.iters, bf16=a.bf16, loss=calib.loss,
                                    massive_ratio=calib.massive_ratio or None,
                                    massive_slack=calib.massive_slack)
    model, tok = quept.load(a.elastic)
    ids = quept.samples_from_text(tok, data.calibration_text(), calib)
    windows = quept.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
    quept.set_bits(model, None)
    rows = [{"bits": None, "mode": "float", "ppl": perplexity(model, windows)}]
    print(f"float: {rows[0]['ppl']:.3f}", file=sys.stderr)
    gptq = {m: GPTQConfig(adapters=m == "gptq-adapters") for m in modes if m.startswith("gptq")}
    for b in widths:
        for mode in modes:
            net = model
            if mode == "gptq-minmax":  # a copy of its own: its clips and adapters get overwritten
                net, _ = quept.load(a.elastic)
                _unclip(net, b)
            t0 = time.perf_counter()
            if mode == "elastic":
                quept.set_bits(net, b)
                info = {}
            elif mode == "learned":
                info = quept.round_learned(net, b, ids, learned, progress=False)
            else:
                info = quept.round_gptq(net, b, ids, gptq[mode], progress=False)
            ppl = perplexity(net, windows)
            clear_rounding(net)
            rows.append({"bits": b, "mode": mode, "ppl": ppl,
                         "rounding_seconds": info.get("seconds"),
                         "blocks_improved": info.get("blocks_improved"),
                         "seconds": time.perf_counter() - t0})
            print(f"W{b} {mode}: {ppl:.3f}", file=sys.stderr)
    base = {r["bits"]: r["ppl"] for r in rows if r["mode"] == "elastic"}
    print(f"\n{a.elastic}: perplexity on {a.windows} x 512 tokens of Pride and Prejudice "
          f"(float {rows[0]['ppl']:.2f}); GPTQ and learned rounding on {calib.n_samples} x "
          f"{calib.seq_len} calibration tokens")
    print("| width | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for b in widths:
        cells = []
        for mode in modes:
            r = next(r for r in rows if r["bits"] == b and r["mode"] == mode)
            rel = (f" ({r['ppl'] / base[b] - 1:+.1%})" if mode != "elastic" and b in base
                   else "")
            cells.append(f"{r['ppl']:.2f}{rel}")
        print(f"| W{b} | " + " | ".join(cells) + " |")
    result = {"elastic": Path(a.elastic).name, "windows": a.windows, "calibration": {
        "n_samples": calib.n_samples, "seq_len": calib.seq_len, "seed": calib.seed},
        "gptq": {m: vars(c) for m, c in gptq.items()}, "learned": vars(learned), "rows": rows,
        "machine": platform.machine(),
        "threads": a.threads, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d")}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
