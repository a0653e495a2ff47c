"""Does the KV quantizer need its per-head Hadamard rotation? One check on the W8 RTN model.

The default model is prepared with ``kv_bits`` (no calibration: RTN weights at --weight-bits),
then evaluated with the KV quantizer at each width of --kv-bits, each head quantized in the
rotated basis and in the plain one (the rotation switched off by hand on the key and value
projections), and with no KV quantization. Perplexity on --windows windows of 512 tokens of
Pride and Prejudice. Run from the repository root:

    python benchmarks/kv_rotation.py

Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from quept import api, data
from quept.cli.common import positive
from quept.config import ElasticSpec
from quept.models.kv import head_dim


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--kv-bits", default="4,3,8")
    p.add_argument("--windows", type=positive, default=8)
    p.add_argument("--out", default="results/kv_rotation.json")
    a = p.parse_args()
    model, tok = api.load_model(None)
    api.prepare(model, ElasticSpec(kv_bits=8))
    dim = head_dim(model)
    windows = api.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
    layers = [m for m in model.modules() if getattr(m, "kv_quant", None) is not None]
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
           f"{torch.__version__}", "weights": f"W{a.weight_bits} RTN", "windows": a.windows,
           "ppl": {}}
    configs = [(None, False)] + [(int(b), r) for b in a.kv_bits.split(",") for r in (True, False)]
    for bits, rotate in configs:
        for m in layers:
            m.kv_quant = None if bits is None else (bits, dim, rotate)
        row = api.evaluate(model, windows, [a.weight_bits], rtn=True, progress=False)[0]
        name = "none" if bits is None else f"KV{bits}, {'rotated' if rotate else 'not rotated'}"
        res["ppl"][name] = row.ppl_rtn
        print(f"{name}: {row.ppl_rtn:.2f}", flush=True)
    print(f"\n| KV cache | perplexity (W{a.weight_bits} RTN) |\n|---|---|")
    for name, ppl in res["ppl"].items():
        print(f"| {name} | {ppl:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
