"""What the in-context candidates add to automatic plans (issue 4), on one elastic folder.

For each budget it makes the automatic plan twice, with the table's candidates only
(``in_context=False``) and with the plans from in-context block costs added (the default),
times both, and evaluates each distinct plan on Pride and Prejudice; then the uniform widths
around them. With ``--compare both-ways`` the second plan is the default without the
candidate that moves blocks both ways from the upper uniform width (``both_ways=False``), so
the rows show what that candidate adds (in the JSON, "in_context" is the default plan and
"table_only" the other). With ``--compare refine`` the second plan is the default refined by
``--refine`` rounds of local search (``quept plan --refine``; in the JSON, "refined"), and each
row gives the refined plan's perplexity change with a 95% interval over resampled windows
(both plans ran on the same windows). Run from the repository root:

    python benchmarks/in_context_plans.py --elastic quept-elastic --budgets 3.25,3.0,2.75,3.5

The sensitivity table is cached in FOLDER/sensitivity.json (as ``quept plan`` does). Output:
one JSON line per budget and per uniform width on stdout as each is measured, then ``--out``
(default results/in_context_plans.json): one indented JSON object with the settings and every
row (``plans``, ``uniform``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mixed_precision import bootstrap_ppl, ci95, load_with_table  # the script's own folder

import quept
from quept import data
from quept.cli.common import positive
from quept.eval import perplexity, window_nll


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default="quept-elastic", help="elastic folder")
    p.add_argument("--budgets", default="3.25,3.0,2.75,3.5", help="stored bits per weight")
    p.add_argument("--windows", type=positive, default=16, help="512-token windows of P&P")
    p.add_argument("--check-samples", type=int, default=16, help="sequences the plans are "
                   "checked and the in-context costs measured on")
    p.add_argument("--uniform", default="2,3,4", help="uniform widths also evaluated")
    p.add_argument("--compare", choices=("table", "both-ways", "refine"), default="table",
                   help="table: automatic plans with the in-context candidates against the "
                   "table's alone; both-ways: with the candidate that moves blocks down or up "
                   "from the upper uniform width against without it; refine: the default "
                   "plan against it refined by --refine rounds")
    p.add_argument("--refine", type=int, default=2, help="with --compare refine: rounds (2)")
    p.add_argument("--keep-sweeps", action="store_true", help="keep and reuse the in-context "
                   "sweeps in FOLDER/sweeps.json, as `quept plan` does (default: measured "
                   "afresh and kept in memory, so that the first budget's time includes them)")
    p.add_argument("--out", default="results/in_context_plans.json", help="JSON output")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = Path(a.elastic)
    model, tok, ids, table, sensitivity_s = load_with_table(folder)
    print(f"sensitivity {sensitivity_s:.0f}s (0 s when cached)", flush=True)
    windows = quept.windows_from_text(tok, data.evaluation_text(), 512, a.windows)
    check = ids[: a.check_samples]
    cache = (quept.api.sweep_cache(model, check, folder / quept.api.SWEEPS_JSON)
             if a.keep_sweeps else {})
    rows = []
    for avg in (float(x) for x in a.budgets.split(",")):
        if a.compare == "refine":
            rows.append(refine_row(model, table, avg, check, cache, windows, a.refine))
            print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "window_nll"}
                                  if isinstance(v, dict) else v)
                              for k, v in rows[-1].items()}), flush=True)
            continue
        t0 = time.perf_counter()
        with_ctx = quept.api.plan(model, table, avg_bits=avg, check_ids=check, cache=cache)
        t1 = time.perf_counter()
        if a.compare == "table":
            table_only = quept.api.plan(model, table, avg_bits=avg, check_ids=check,
                                        in_context=False)
        else:  # the same sweeps (cached) without the both-ways candidate
            table_only = quept.api.plan(model, table, avg_bits=avg, check_ids=check,
                                        both_ways=False, cache=cache)
        t2 = time.perf_counter()
        row = {"budget": avg}
        for key, plan, secs in (("in_context", with_ctx, t1 - t0),
                                ("table_only", table_only, t2 - t1)):
            row[key] = {"chosen": plan.label, "bits_per_weight": plan.bits_per_weight,
                        "widths": plan.histogram(), "checked_kl": plan.checked_kl,
                        "plan_seconds": secs}
        quept.set_bits(model, with_ctx)
        row["in_context"]["ppl"] = perplexity(model, windows, progress=False)
        if dict(table_only) == dict(with_ctx):
            row["table_only"]["ppl"] = row["in_context"]["ppl"]
        else:
            quept.set_bits(model, table_only)
            row["table_only"]["ppl"] = perplexity(model, windows, progress=False)
        print(json.dumps(row), flush=True)
        rows.append(row)
    uniform = []
    for b in (int(x) for x in a.uniform.split(",") if x):
        quept.set_bits(model, b)
        uniform.append({"bits": b, "ppl": perplexity(model, windows, progress=False)})
        print(json.dumps(uniform[-1]), flush=True)
    out = {"elastic": str(folder), "compare": a.compare, "windows": a.windows,
           **({"refine": a.refine} if a.compare == "refine" else {}),
           "check_samples": a.check_samples, "keep_sweeps": a.keep_sweeps,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                      f"torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "sensitivity_seconds": sensitivity_s,
           "plans": rows, "uniform": uniform}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


def refine_row(model, table, avg: float, check, cache: dict, windows, rounds: int) -> dict:
    """The default plan at ``avg`` bits and the same refined by ``rounds`` rounds (whose time
    includes making the default again, its sweeps cached), each evaluated on ``windows``, with
    the refined plan's perplexity change and its 95% interval over resampled windows."""
    t0 = time.perf_counter()
    plain = quept.api.plan(model, table, avg_bits=avg, check_ids=check, cache=cache)
    t1 = time.perf_counter()
    refined = quept.api.plan(model, table, avg_bits=avg, check_ids=check, cache=cache,
                             refine=rounds)
    t2 = time.perf_counter()
    row: dict = {"budget": avg}
    for key, plan, secs in (("default", plain, t1 - t0), ("refined", refined, t2 - t1)):
        quept.set_bits(model, plan)
        nll = window_nll(model, windows, progress=False)
        row[key] = {"chosen": plan.label, "bits_per_weight": plan.bits_per_weight,
                    "widths": plan.histogram(), "checked_kl": plan.checked_kl,
                    "plan_seconds": secs, "ppl": float(np.exp(nll.mean().item())),
                    "window_nll": nll.tolist()}
    a, b = bootstrap_ppl([row["default"], row["refined"]])
    row["ppl_change"] = row["refined"]["ppl"] / row["default"]["ppl"] - 1
    row["ppl_change_ci95"] = ci95(b / a - 1)
    return row


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
