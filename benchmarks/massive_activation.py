"""Does an elastic model keep the float model's massive activation at low widths?

Small LLaMA-family models put one huge value in the residual stream of the first token from an
early block on (SmolLM2-135M: channel 507 grows from ~65 to ~27000 in block 12 and stays there
until block 29). A single "super weight" of that block's ``mlp.down_proj`` makes it; if a low
width's clip cuts that weight, the value collapses and every later block sees a different
attention pattern. This script follows each width's own quantized stream through the blocks on
the folder's calibration samples and prints, per block: the largest first-token value in float
and at each width, and the width's mean L1 error to the float block output, over all tokens
and over all but the first. It also lists the super weights (``ElasticLinear.find_super_weights``
on the float inputs, ratio ``--ratio``) with their value at each width (adapter folded in,
clipped, quantized). The folder is only read. Run from the repository root:

    python benchmarks/massive_activation.py --elastic FOLDER [--elastic FOLDER2] --bits 2,3 \\
        --json results/massive_activation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import quept
from quept import data
from quept.calib.capture import capture_block_inputs, mean_sq_inputs, move_kwargs
from quept.cli.common import positive
from quept.config import QuEPTConfig
from quept.models.families import family_for
from quept.nn import ElasticLinear, set_bits


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elastic", action="append", required=True, help="elastic folder (repeat)")
    p.add_argument("--bits", default="2,3", help="widths to follow (default 2,3)")
    p.add_argument("--samples", type=positive, default=8,
                   help="first calibration samples to run (default 8)")
    p.add_argument("--ratio", type=float, default=100.0,
                   help="super-weight ratio, as ElasticSpec.protect_outliers (default 100)")
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def follow(folder: str, bits: list[int], n: int, ratio: float) -> dict:
    model, tok = quept.load(folder)
    cfg = QuEPTConfig.from_dict(quept.read_meta(folder)["config"])
    ids = quept.samples_from_text(tok, data.calibration_text(), cfg.calib)[:n]
    fam = family_for(model)
    bs = cfg.calib.batch_size
    x0, kw = capture_block_inputs(model, fam, ids, bs)
    kw = move_kwargs(kw, "cpu", torch.float32)

    def run(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fam.call_block(block, x[i : i + bs], kw).float()
                              for i in range(0, x.shape[0], bs)])

    x_fp, streams = x0, {b: x0 for b in bits}
    blocks, supers = [], []
    for i, block in enumerate(fam.get_blocks(model)):
        layers = {n: m for n, m in block.named_modules() if isinstance(m, ElasticLinear)}
        amax: dict[str, torch.Tensor] = {}
        set_bits(block, None)
        with mean_sq_inputs(layers, amax):
            y_fp = run(block, x_fp)
        for name, m in layers.items():
            for r, j in m.find_super_weights(amax[name], ratio):
                with torch.no_grad():
                    q = {str(b): round(m.quantized_weight(b)[r, j].item(), 3) for b in bits}
                supers.append({"block": i + 1, "layer": name, "row": r, "col": j,
                               "weight": round(m.weight[r, j].item(), 3),
                               "input_max": round(amax[name][j].item(), 1), "quantized": q})
        row = {"block": i + 1, "float_token0_max": y_fp[:, 0].abs().max().item()}
        for b in bits:
            set_bits(block, b)
            y = run(block, streams[b])
            err = (y - y_fp).abs().mean(-1)  # (N, T)
            row[str(b)] = {"token0_max": y[:, 0].abs().max().item(), "l1": err.mean().item(),
                           "l1_without_token0": err[:, 1:].mean().item()}
            streams[b] = y
        set_bits(block, None)
        x_fp = y_fp
        blocks.append(row)
    return {"folder": Path(folder).name, "blocks": blocks, "super_weights": supers}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    bits = [int(b) for b in a.bits.split(",")]
    out = {"what": __doc__.split("\n\n")[0], "bits": bits, "samples": a.samples,
           "ratio": a.ratio, "machine": f"{platform.machine()}, {a.threads} threads, torch "
           f"{torch.__version__}",
           "command": " ".join(["python", "benchmarks/massive_activation.py", *sys.argv[1:]]),
           "runs": []}
    for folder in a.elastic:
        r = follow(folder, bits, a.samples, a.ratio)
        out["runs"].append(r)
        print(f"\n{r['folder']}: super weights (ratio {a.ratio:g})")
        for s in r["super_weights"]:
            print(f"  block {s['block']:2d} {s['layer']}: W[{s['row']}, {s['col']}] = "
                  f"{s['weight']} (input up to {s['input_max']}); at "
                  + ", ".join(f"W{b} {v}" for b, v in s["quantized"].items()))
        head = "block  float tok0 | " + " | ".join(
            f"W{b}: tok0 max   L1 (all / w/o tok0)" for b in bits)
        print(head)
        for row in r["blocks"]:
            cells = [f"{row[str(b)]['token0_max']:9.0f}   {row[str(b)]['l1']:.4f} / "
                     f"{row[str(b)]['l1_without_token0']:.4f}" for b in bits]
            print(f"{row['block']:5d}  {row['float_token0_max']:10.0f} | " + " | ".join(cells))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
