"""Every candidate an automatic plan chooses among, at one budget (issue 4): its measured KL on
the check sequences (what ``quept plan`` ranks by), on held-out calibration sequences, and its
perplexity on Pride and Prejudice against the line joining the uniform widths around it, with a
95% interval over resampled evaluation windows. It shows how well the KL check ranks plans that
lie close together. Run from the repository root:

    python benchmarks/plan_candidates.py --elastic quept-elastic --budget 5.0

The sensitivity table is cached in FOLDER/sensitivity.json (as ``quept plan`` does). Output: a
table on stdout and ``--out`` (default results/plan_candidates.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mixed_precision import BOOTSTRAP, line_check, load_with_table, uniform_row  # benchmarks/

import quept
from quept import data
from quept.cli.common import positive
from quept.eval import window_nll
from quept.search.candidates import bracketing_widths
from quept.search.exact import configuration_kl


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default="quept-elastic", help="elastic folder")
    p.add_argument("--budget", type=float, default=5.0, help="stored bits per weight")
    p.add_argument("--windows", type=positive, default=32, help="512-token windows of P&P")
    p.add_argument("--check-samples", type=int, default=16,
                   help="calibration sequences the candidates are ranked on (as quept plan)")
    p.add_argument("--out", default="results/plan_candidates.json", help="JSON output")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok, ids, table, _ = load_with_table(Path(a.elastic))
    check, held = ids[: a.check_samples], ids[a.check_samples :]
    if held.shape[0] == 0:
        raise SystemExit(f"--check-samples {a.check_samples} leaves no held-out sequence of "
                         f"the {ids.shape[0]} the sensitivity draws")
    windows = quept.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
    t0 = time.perf_counter()
    cands = quept.api.plan_candidates(model, table, avg_bits=a.budget, check_ids=check,
                                      progress=True)
    plan_s = time.perf_counter() - t0
    configs = list(cands.values())
    kl_check = configuration_kl(model, check, configs)
    kl_held = configuration_kl(model, held, configs)
    kept = min(zip(kl_check, cands), key=lambda x: x[0])[1]  # what quept.plan keeps

    lo, hi = bracketing_widths(table, avg_bits=a.budget)
    u0, u1 = (uniform_row(model, windows, b) for b in (lo, hi))
    rows = []
    for (label, plan), kc, kh in zip(cands.items(), kl_check, kl_held):
        quept.set_bits(model, plan)
        nll = window_nll(model, windows, progress=True, desc=label)
        rows.append({"candidate": label, "kept": label == kept, "widths": plan.histogram(),
                     "bits_per_weight": plan.bits_per_weight, "check_kl": kc, "held_out_kl": kh,
                     "ppl": math.exp(nll.mean().item()), "window_nll": nll.tolist()})
    checks = line_check([u0, u1], [{"budget": a.budget, **r} for r in rows])
    for r, c in zip(rows, checks, strict=True):  # every candidate lies between W<lo> and W<hi>
        r.update(line_ppl=c["line_ppl"], gap=c["gap"], gap_ci95=c["gap_ci95"])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = {k: float(np.corrcoef(rank([r[k] for r in rows]),
                                     rank([r["ppl"] for r in rows]))[0, 1])
                for k in ("check_kl", "held_out_kl")}

    print(f"\nbudget {a.budget} bits per weight, between W{lo} ({u0['ppl']:.2f}) and W{hi} "
          f"({u1['ppl']:.2f}); candidates made in {plan_s:.0f} s; KL on {tuple(check.shape)} "
          f"check and {tuple(held.shape)} held-out tokens; perplexity on P&P {a.windows} x 512\n")
    print("| candidate | bits/weight | check KL | held-out KL | perplexity | vs line (95%) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        lo_ci, hi_ci = r["gap_ci95"]
        print(f"| {r['candidate']}{' (kept)' if r['kept'] else ''} | {r['bits_per_weight']:.4f} "
              f"| {r['check_kl']:.4f} | {r['held_out_kl']:.4f} | {r['ppl']:.2f} | "
              f"{r['gap']:+.2%} ({lo_ci:+.2%} .. {hi_ci:+.2%}) |")
    print(f"\nSpearman of the KL against perplexity over the {len(rows)} candidates: check "
          f"{spearman['check_kl']:.2f}, held-out {spearman['held_out_kl']:.2f}")
    out = {"elastic": a.elastic, "budget": a.budget, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                      f"{torch.__version__}",
           "eval": f"Pride and Prejudice, {a.windows} x 512 tokens",
           "check_tokens": list(check.shape), "held_out_tokens": list(held.shape),
           "candidates_seconds": plan_s, "uniform": [u0, u1], "candidates": rows,
           "spearman_vs_ppl": spearman,
           "bootstrap": {"resamples": BOOTSTRAP, "unit": "512-token window", "seed": 0}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
