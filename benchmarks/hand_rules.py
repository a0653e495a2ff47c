"""Rules of thumb against the allocator: hand-written pattern plans (the kind a practitioner
writes, e.g. "down projections one bit up", llama.cpp's K-quant mixes) and ``quept plan`` at
the same stored bits per weight, on the same elastic model and evaluation windows.

For every rule it records the plan the rule expands to (:func:`quept.plan_record`: stored bits
per weight, scales and zero-points included), asks the allocator (``quept.api.plan``, the
``quept plan`` default: auto granularity, in-context candidates) for a plan at that budget,
and evaluates both on the same windows. Prints a markdown table and writes JSON with each
window's NLL and a paired bootstrap interval of the allocator's perplexity over the rule's.
Run from the repository root on an elastic folder (``quept quantize`` writes one):

    python benchmarks/hand_rules.py --elastic quept-elastic --out results/hand_rules.json

The sensitivity table and the in-context sweeps are read from (or written to) the folder's
caches, as ``quept plan`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from mixed_precision import BOOTSTRAP, bootstrap_ppl, ci95, load_with_table  # benchmarks/

import quept
from quept import data
from quept.cli.common import positive
from quept.eval import window_nll
from quept.nn import elastic_layers


def rules(n_blocks: int, prefix: str) -> dict[str, dict[str, int]]:
    """Pattern plans for a LLaMA-family decoder of ``n_blocks`` blocks named
    ``{prefix}.{i}.``: one bit up where folklore says it pays."""
    edges = {f"{prefix}.{i}.*": 4 for i in (0, 1, n_blocks - 2, n_blocks - 1)}
    return {
        "down +1 (W3 base)": {"*": 3, "*.mlp.down_proj": 4},
        "v and down +1 (W3 base, like Q3_K_M)": {"*": 3, "*.self_attn.v_proj": 4,
                                                 "*.mlp.down_proj": 4},
        "first and last two blocks +1 (W3 base)": {"*": 3, **edges},
        "MLP up/gate -1 (W4 base)": {"*": 4, "*.mlp.up_proj": 3, "*.mlp.gate_proj": 3},
        "v and down +1 (W2 base, like Q2_K)": {"*": 2, "*.self_attn.v_proj": 3,
                                               "*.mlp.down_proj": 3},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default="quept-elastic", help="elastic folder")
    p.add_argument("--windows", type=positive, default=32,
                   help="512-token windows of the text (32)")
    p.add_argument("--seq-len", type=positive, default=512, help="tokens per window (512)")
    p.add_argument("--text", default=None, help="evaluation text (default: Pride and Prejudice)")
    p.add_argument("--calib-text", default=None,
                   help="text of the sensitivity table and the allocator's checks (default: the "
                   "other novels, as `quept plan`)")
    p.add_argument("--samples", type=positive, default=None,
                   help="calibration sequences of the sensitivity table (default 32, as "
                   "`quept plan`)")
    p.add_argument("--check-samples", type=int, default=16,
                   help="calibration sequences the allocator measures its candidates on (16)")
    p.add_argument("--threads", type=positive, default=None, help="torch CPU threads")
    p.add_argument("--out", default="results/hand_rules.json", help="JSON output")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = Path(a.elastic)
    model, tok, ids, table, _ = load_with_table(
        folder, calib_text=data.load_texts([a.calib_text]) if a.calib_text else None,
        n_samples=a.samples)
    names = list(elastic_layers(model))
    prefix = names[0].rsplit(".", 3)[0]  # "model.layers"
    n_blocks = len({n[len(prefix) + 1:].split(".")[0] for n in names})
    check = ids[: a.check_samples]
    sweeps = quept.api.sweep_cache(model, check, folder / quept.api.SWEEPS_JSON)
    text = data.load_texts([a.text], role="eval") if a.text else data.evaluation_text()
    windows = quept.windows_from_text(tok, text, a.seq_len, a.windows)

    rows = []
    for label, rule in rules(n_blocks, prefix).items():
        hand = quept.plan_record(model, rule)
        t0 = time.perf_counter()
        auto = quept.api.plan(model, table, avg_bits=hand.bits_per_weight, check_ids=check,
                              cache=sweeps)
        plan_s = time.perf_counter() - t0
        nll = {}
        for who, plan in (("rule", hand), ("allocator", auto)):
            quept.set_bits(model, plan)
            nll[who] = window_nll(model, windows, progress=True,
                                  desc=f"{label[:24]}: {who}").numpy()
        # the allocator's perplexity over the rule's, the windows resampled together
        ppl_auto, ppl_rule = bootstrap_ppl([{"window_nll": nll[k]}
                                            for k in ("allocator", "rule")])
        lo, hi = ci95(ppl_auto / ppl_rule)
        row = {"rule": label, "entries": rule,
               "rule_bits_per_weight": hand.bits_per_weight,
               "rule_widths": {str(b): n for b, n in hand.histogram().items()},
               "rule_ppl": math.exp(nll["rule"].mean()),
               "allocator_bits_per_weight": auto.bits_per_weight,
               "allocator_widths": {str(b): n for b, n in auto.histogram().items()}, "allocator_chosen": auto.label,
               "allocator_seconds": plan_s,
               "allocator_ppl": math.exp(nll["allocator"].mean()),
               "ratio_95": [lo, hi],
               "windows_allocator_better": int((nll["allocator"] < nll["rule"]).sum()),
               "window_nll": {k: v.tolist() for k, v in nll.items()}}
        rows.append(row)
        print(f"{label}: rule {row['rule_ppl']:.2f} at {hand.bits_per_weight:.4f} bpw, "
              f"allocator {row['allocator_ppl']:.2f} at {auto.bits_per_weight:.4f} bpw "
              f"({auto.label})", file=sys.stderr, flush=True)
    quept.set_bits(model, None)
    uniform = {}
    for bits in (2, 3, 4):
        quept.set_bits(model, bits)
        uniform[str(bits)] = {"bits_per_weight": quept.stored_bits(model),
                         "ppl": math.exp(window_nll(model, windows).mean().item())}
    result = {
        "what": "hand-written pattern plans vs quept plan at the same stored bits per weight",
        "elastic": str(folder), "calibration": json.loads(
            (folder / quept.api.ELASTIC_JSON).read_text())["config"]["calib"],
        "eval": f"{windows.shape[0]} x {a.seq_len} tokens of "
                + (Path(a.text).name if a.text else "Pride and Prejudice"),
        "bootstrap": {"resamples": BOOTSTRAP, "unit": "window", "seed": 0},
        "uniform": uniform, "rows": rows,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}",
        "command": "python benchmarks/hand_rules.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("\n| rule | bits/weight | rule ppl | allocator ppl | allocator / rule (95%) | "
          "windows won |\n|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["ratio_95"]
        print(f"| {r['rule']} | {r['rule_bits_per_weight']:.3f} | {r['rule_ppl']:.2f} | "
              f"{r['allocator_ppl']:.2f} | {r['allocator_ppl'] / r['rule_ppl']:.3f} "
              f"({lo:.3f}-{hi:.3f}) | {r['windows_allocator_better']}/{windows.shape[0]} |")
    print("\nuniform: " + ", ".join(f"W{b} {u['ppl']:.2f} at {u['bits_per_weight']:.3f}"
                                    for b, u in uniform.items()))
    return result


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
