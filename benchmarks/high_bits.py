"""Where an elastic model's error at given widths (7 and 8 by default) comes from.

At 7 and 8 bits round-to-nearest is already within 0.2% of the float model, and the elastic
model lands a few hundredths of perplexity above it. This script takes an elastic folder apart
at those widths, on the same evaluation windows:

- ``elastic``: the folder as calibrated (adapter prefix + learned clips);
- ``searched clips, learned adapter``: the learned clips replaced by the searched ones below,
  the adapters kept (do the learned clips generalise, or only fit the calibration text?);
- ``learned clips, no adapter``: the adapters zeroed, the learned clips kept;
- ``searched clips, no adapter``: the clips the calibration starts from (the per-group search
  weighted by the mean squared float input per channel, on the folder's own calibration
  windows), before any training;
- ``rtn``: no adapter, no clipping.

Zeroing the adapters changes every width, so the folder is only read, never written. Run from
the repository root:

    python benchmarks/high_bits.py --elastic quept-elastic --out results/high_bits.json

``--bits 4,5,6`` takes apart the middle widths the same way (results/clip_sources.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from model_label import model_label  # benchmarks/

import quept
from quept import data
from quept.calib.capture import mean_sq_inputs
from quept.cli.common import positive
from quept.config import QuEPTConfig
from quept.data.tokens import calibration_starts, heldout_windows, tokenize
from quept.nn import elastic_layers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default="quept-elastic", help="elastic folder (read only)")
    p.add_argument("--windows", type=positive, default=32, help="512-token windows (default 32)")
    p.add_argument("--text", choices=("eval", "heldout"), default="eval",
                   help="eval: Pride and Prejudice (default); heldout: windows of the other "
                        "novels that share no token with the folder's calibration samples")
    p.add_argument("--bits", default="7,8", help="widths to take apart (default 7,8)")
    p.add_argument("--adapter-kept-only", action="store_true",
                   help="only the two variants that keep the adapters (skip the zeroed ones "
                        "and RTN: under half the time)")
    p.add_argument("--out", default="results/high_bits.json", help="JSON output path")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bits = [int(b) for b in a.bits.split(",")]

    meta = quept.read_meta(a.elastic)
    cfg = QuEPTConfig.from_dict(meta["config"])
    model, tok = quept.load(a.elastic)
    layers = elastic_layers(model)
    if a.text == "eval":
        windows = quept.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
        text = f"Pride and Prejudice, {a.windows} x 512 tokens"
    else:
        text_ids = tokenize(tok, data.calibration_text())
        c = cfg.calib
        used = calibration_starts(text_ids.numel(), c.n_samples, c.seq_len, c.seed)
        windows = heldout_windows(text_ids, a.windows, 512, used, c.seq_len)
        text = (f"the other novels, {a.windows} x 512 tokens spread over the text, none sharing "
                "a token with the calibration samples")

    def ppl(rtn: bool = False) -> dict[int, float]:
        rows = quept.evaluate(model, windows, bits, rtn=rtn, progress=False)
        return {r.bits: (r.ppl_rtn if rtn else r.ppl) for r in rows}

    # The per-group clip search the calibration starts from, on the folder's own calibration
    # windows, weighted by the mean squared float input per channel.
    ids = quept.samples_from_text(tok, data.calibration_text(), cfg.calib)
    bs = cfg.calib.batch_size
    with torch.no_grad(), mean_sq_inputs(layers) as sq:
        quept.set_bits(model, None)
        for i in range(0, ids.shape[0], bs):
            model(ids[i : i + bs])

    def clips(searched: bool) -> None:
        with torch.no_grad():
            for n, m in layers.items():
                for b in bits:
                    if searched:
                        m.init_clip_by_search(b, sq[n])
                    else:
                        m.clip_hi[str(b)].copy_(learned[n][0][b])
                        m.clip_lo[str(b)].copy_(learned[n][1][b])
                m.clear_cache()

    learned = {n: ({b: m.clip_hi[str(b)].detach().clone() for b in bits},
                   {b: m.clip_lo[str(b)].detach().clone() for b in bits})
               for n, m in layers.items()}
    variants: dict[str, dict[int, float]] = {}
    variants["elastic"] = ppl()
    clips(searched=True)
    variants["searched clips, learned adapter"] = ppl()
    if not a.adapter_kept_only:
        clips(searched=False)
        with torch.no_grad():
            for m in layers.values():
                m.lora_u.zero_()
                m.clear_cache()
        variants["learned clips, no adapter"] = ppl()
        clips(searched=True)
        variants["searched clips, no adapter"] = ppl()
        variants["rtn"] = ppl(rtn=True)

    print(f"\nPerplexity on {text}, {a.elastic} ({model_label(meta['base_model'])})")
    print("| variant | " + " | ".join(f"W{b}" for b in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for name, row in variants.items():
        print(f"| {name} | " + " | ".join(f"{row[b]:.4f}" for b in bits) + " |")
    result = {
        "model": model_label(meta["base_model"]),
        "eval": text,
        "elastic": Path(a.elastic).name,
        "config": cfg.to_dict(),
        "ppl": {k: {str(b): v for b, v in row.items()} for k, row in variants.items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "command": "python benchmarks/high_bits.py " + " ".join(sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
