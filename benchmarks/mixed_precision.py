"""Mixed-precision figures (issue 4): the Pareto curve of perplexity against true stored bits per
weight, uniform widths vs training-free plans, plus the costs of each step.

Run from the repository root on an elastic folder (``quept quantize`` writes one):

    pip install -e ".[hf,bench]"
    python benchmarks/mixed_precision.py --elastic quept-elastic

It measures the sensitivity table (cached in FOLDER/sensitivity.json; ``--recompute`` to time it
afresh), checks it against the slow protocol (a forward per layer and width) on a subset of
layers, makes plans at 2.25 .. 5 bits per weight (by default at the granularity, layer, sublayer
or block, whose measured KL on 16 calibration sequences is lowest; ``--compare layer`` also
evaluates the per-layer plans), evaluates everything on Pride and Prejudice, checks the issue's
figures and writes results/mixed_precision.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from model_label import DEFAULT_FLOAT, group_label, is_default, model_label, model_name

import quept
from quept import data
from quept.cli.common import positive
from quept.config import QuEPTConfig
from quept.data.tokens import calibration_samples, tokenize
from quept.eval import perplexity, window_nll
from quept.nn import elastic_layers
from quept.search import InfeasibleBudgetError, SensitivityConfig, allocate, plan_from_table
from quept.search.exact import exact_sensitivity
from quept.search.table import SensitivityTable

PLAN_BITS = (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 5.0)
APPLY_BITS = 3.0  # the plan whose set_bits is timed and compared with uniform W3
BOOTSTRAP = 2000  # resamplings of the evaluation windows behind each 95% interval


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def llama7b_allocation_ms(n: int = 5) -> dict[str, float]:
    """Allocation on a synthetic 224 layers x 7 widths table with LLaMA-7B shapes (group 128)."""
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    rng = np.random.default_rng(0)
    cost, size, numel = [], [], 0
    for out, inn in shapes * 32:
        size.append([out * inn * b + out * inn // 128 * (16 + b) for b in range(2, 9)])
        cost.append(sorted(rng.exponential(1.0, 7) * out * inn, reverse=True))
        numel += out * inn
    per_budget = {a: median_ms(lambda a=a: allocate(cost, size, int(a * numel)), n)
                  for a in (2.5, 3.0, 3.25, 4.0, 5.0, 8.0)}
    exact = all(allocate(cost, size, int(a * numel)).exact for a in per_budget)
    return {"layers": len(cost), "widths": 7, "exact": exact,
            "median_ms_per_budget": per_budget, "worst_ms": max(per_budget.values())}


def subset_check(model, ids, table: SensitivityTable, names: list[str], windows, budgets):
    """The slow protocol (a forward per layer and width) on ``names`` and the token windows
    ``ids``; plans for those layers from its table vs from the fast table, the other layers at
    W4: the slow table's summed KL of each plan, and perplexity."""
    t0 = time.perf_counter()
    slow = exact_sensitivity(model, ids, names)
    slow_s = time.perf_counter() - t0
    fast_v = np.array([table.kl[n] for n in names]).ravel()
    slow_v = np.array([slow[n] for n in names]).ravel()
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = float(np.corrcoef(rank(fast_v), rank(slow_v))[0, 1])
    sub = lambda kl: SensitivityTable(table.bits, table.group_size,  # noqa: E731
                                      {n: table.shapes[n] for n in names}, kl, "subset")
    rows = []
    for avg in budgets:
        row = {"avg_bits_of_subset": avg}
        for label, kl in (("fast", {n: table.kl[n] for n in names}), ("slow", slow)):
            plan = plan_from_table(sub(kl), avg_bits=avg)
            full = {n: plan.get(n, 4) for n in elastic_layers(model)}
            quept.set_bits(model, full)
            row[label] = {"widths": dict(plan), "slow_kl_sum": sum(slow[n][table.bits.index(b)]
                                                                   for n, b in plan.items()),
                          "ppl": perplexity(model, windows)}
        rows.append(row)
    return {"layers": names, "windows": len(windows), "slow_seconds": slow_s,
            "spearman": spearman,
            "slow_kl": {n: list(v) for n, v in slow.items()}, "plans": rows}


def load_with_table(folder: Path, recompute: bool = False, calib_text: str | None = None,
                    n_samples: int | None = None):
    """The elastic model, the sensitivity draw of calibration sequences (of ``calib_text``,
    default the other novels; ``n_samples`` of them, default the table's 32), the sensitivity
    table (cached in FOLDER/sensitivity.json, as ``quept plan`` does) and the seconds that call
    took."""
    model, tok = quept.load(folder)
    cfg = SensitivityConfig()
    if n_samples:
        cfg = replace(cfg, n_samples=n_samples)
    ids = calibration_samples(tokenize(tok, calib_text or data.calibration_text()),
                              cfg.n_samples, cfg.seq_len, cfg.seed)
    t0 = time.perf_counter()
    table = quept.api.sensitivity(model, ids, cfg, cache=folder / "sensitivity.json",
                                  recompute=recompute)
    return model, tok, ids, table, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default="quept-elastic", help="elastic folder")
    p.add_argument("--windows", type=positive, default=32, help="512-token windows of P&P (32)")
    p.add_argument("--recompute", action="store_true", help="measure the table even if cached")
    p.add_argument("--subset-blocks", default="2,15,28",
                   help="blocks whose linears get the slow protocol ('' skips the check)")
    p.add_argument("--granularity", default="auto",
                   choices=("auto", "layer", "sublayer", "block"), help="allocation unit")
    p.add_argument("--check-samples", type=int, default=16,
                   help="calibration sequences the auto granularity measures candidates on")
    p.add_argument("--no-in-context", dest="in_context", action="store_false",
                   help="auto: the table's candidates only (no plans moved from uniform widths)")
    p.add_argument("--compare", default="",
                   help="comma-separated fixed granularities also evaluated, e.g. 'layer'")
    p.add_argument("--out", default="results/mixed_precision.json", help="JSON output")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only draw the plot of a JSON this script wrote, next to it")
    a = p.parse_args()
    if a.replot:
        done = json.loads(Path(a.replot).read_text())
        windows = done.get("windows") or int(done["eval"].split(", ")[1].split(" x ")[0])
        plot(done, Path(a.replot).with_suffix(".png"), windows,  # older JSON: from "eval"
             done.get("base_model", "default"), done.get("group"))
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model, tok, ids, table, sens_call_s = load_with_table(Path(a.elastic), a.recompute)
    windows = quept.windows_from_text(tok, data.evaluation_text(), 512, a.windows)

    alloc = llama7b_allocation_ms()
    plans, results = {}, {"uniform": [], "plans": [], "compare": []}
    # The in-context sweeps are shared by the budgets between the same two uniform widths.
    check, sweeps = ids[: a.check_samples], {}
    for avg in PLAN_BITS:
        try:
            t0 = time.perf_counter()
            plans[avg] = quept.api.plan(model, table, avg_bits=avg, granularity=a.granularity,
                                        check_ids=check, in_context=a.in_context, cache=sweeps,
                                        earlier=(list(plans.values())[-1:]
                                                 if a.granularity == "auto" else ()))
            results["plans"].append({"budget": avg, "plan_ms": (time.perf_counter() - t0) * 1e3})
        except InfeasibleBudgetError as e:
            results["plans"].append({"budget": avg, "infeasible": str(e)})
    results["uniform"] = [uniform_row(model, windows, bits) for bits in (None, *range(2, 9))]
    for row in results["plans"]:
        plan = plans.get(row["budget"])
        if plan is not None:
            quept.set_bits(model, plan)
            nll = window_nll(model, windows, progress=True, desc=f"plan {row['budget']}")
            row.update(bits_per_weight=plan.bits_per_weight, widths=plan.histogram(),
                       predicted_kl=plan.predicted_kl, exact=plan.exact,
                       granularity=plan.granularity, chosen=plan.label,
                       checked_kl=plan.checked_kl, ppl=math.exp(nll.mean().item()),
                       window_nll=nll.tolist())
            print(f"plan {row['budget']}: {row['bits_per_weight']:.4f} bpw, {plan.label}, "
                  f"ppl {row['ppl']:.2f}", flush=True)
    for gran in filter(None, a.compare.split(",")):
        for avg in plans:
            plan = quept.api.plan(model, table, avg_bits=avg, granularity=gran)
            quept.set_bits(model, plan)
            results["compare"].append({
                "budget": avg, "granularity": gran, "bits_per_weight": plan.bits_per_weight,
                "widths": plan.histogram(), "predicted_kl": plan.predicted_kl,
                "ppl": perplexity(model, windows, progress=True, desc=f"{gran} {avg}")})

    set_ms, mat_ms = apply_times_ms(model, plans.get(APPLY_BITS))
    subset = None
    if a.subset_blocks:
        names = [n for n in elastic_layers(model)
                 if int(n.split(".")[2]) in {int(b) for b in a.subset_blocks.split(",")}]
        # The slow protocol on the first 8 of the calibration sequences (a quarter of the text
        # the fast table saw): 147 forwards over all 32 would take ~25 min here.
        subset = subset_check(model, ids[:8], table, names, windows[:8], (2.75, 3.25))

    result = report(table, sens_call_s, alloc, results, set_ms, mat_ms, subset, a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    plot(results, Path(a.out).with_suffix(".png"), a.windows, result["base_model"],
         result["group"])
    return 0


def apply_times_ms(model, plan) -> tuple[float | None, float | None]:
    """Median ms of set_bits to ``plan`` alone and with every weight materialised; None, None
    when there is no plan (its budget was infeasible)."""
    if plan is None:
        print(f"plan {APPLY_BITS}: infeasible, set_bits not timed", flush=True)
        return None, None
    quept.set_bits(model, None)
    set_ms = median_ms(lambda: quept.set_bits(model, plan), 20)
    layers = list(elastic_layers(model).values())

    def apply_and_materialise() -> None:
        quept.set_bits(model, None)
        quept.set_bits(model, plan)
        with torch.no_grad():
            for m in layers:
                m.current_weight()

    return set_ms, median_ms(apply_and_materialise, 5)


def uniform_row(model, windows, bits: int | None) -> dict:
    """Uniform ``bits`` (None: float) on ``windows``: stored bits per weight, perplexity and the
    per-window NLLs the intervals resample."""
    quept.set_bits(model, bits)
    nll = window_nll(model, windows, progress=True, desc=f"W{bits}")
    return {"bits": bits, "bits_per_weight": 32.0 if bits is None else quept.stored_bits(model),
            "ppl": math.exp(nll.mean().item()), "window_nll": nll.tolist()}


def bootstrap_ppl(rows: list[dict], n_boot: int = BOOTSTRAP, seed: int = 0) -> list[np.ndarray]:
    """Perplexities of each row (one configuration's ``window_nll``) over the same ``n_boot``
    resamplings of the evaluation windows: a paired bootstrap, as every configuration ran on
    the same windows."""
    nll = np.array([r["window_nll"] for r in rows])
    idx = np.random.default_rng(seed).integers(0, nll.shape[1], (n_boot, nll.shape[1]))
    return list(np.exp(nll[:, idx].mean(-1)))


def ci95(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def line_check(uniform: list[dict], plan_rows: list[dict]) -> list[dict]:
    """Each plan vs the straight line joining its neighbouring uniform points, with the gap
    (plan / line - 1) and its 95% interval over resampled windows (the line resampled too)."""
    pts = sorted((u for u in uniform if u["bits"] is not None), key=lambda u: u["bits_per_weight"])
    out = []
    for r in plan_rows:
        if "ppl" not in r:
            continue
        x = r["bits_per_weight"]
        for u0, u1 in zip(pts, pts[1:]):
            (x0, y0), (x1, y1) = ((u["bits_per_weight"], u["ppl"]) for u in (u0, u1))
            if x0 <= x <= x1:
                t = (x - x0) / (x1 - x0)
                line = y0 + (y1 - y0) * t
                b0, b1, bp = bootstrap_ppl([u0, u1, r])
                out.append({"budget": r["budget"], "between": [x0, x1], "line_ppl": line,
                            "ppl": r["ppl"], "at_or_below": r["ppl"] <= line,
                            "gap": r["ppl"] / line - 1,
                            "gap_ci95": ci95(bp / (b0 + (b1 - b0) * t) - 1)})
                break
    return out


def report(table, sens_call_s, alloc, results, set_ms, mat_ms, subset, a) -> dict:
    checks = line_check(results["uniform"], results["plans"])
    meta = quept.read_meta(a.elastic)
    base_model, group = meta["base_model"], group_label(
        QuEPTConfig.from_dict(meta["config"]).spec)
    # The plan at APPLY_BITS against uniform W3, unless that budget was infeasible.
    p3 = next(r for r in results["plans"] if r["budget"] == APPLY_BITS)
    w3 = next(u for u in results["uniform"] if u["bits"] == 3)
    skipped = p3.get("infeasible")
    gain = gain_ci = None
    if skipped is None:
        gain = 1 - p3["ppl"] / w3["ppl"]
        b3, bp3 = bootstrap_ppl([w3, p3])
        gain_ci = ci95(1 - bp3 / b3)
    print(f"\n{model_label(base_model)}, {group}, Pride and Prejudice "
          f"{a.windows} x 512 tokens; {platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| configuration | stored bits/weight | perplexity | granularity | layers per width |"
          "\n|---|---|---|---|---|")
    for u in results["uniform"]:
        label = "float" if u["bits"] is None else f"uniform W{u['bits']}"
        print(f"| {label} | {u['bits_per_weight']:.4f} | {u['ppl']:.2f} | | |")
    for r in results["plans"] + results["compare"]:
        if "ppl" in r:
            hist = ", ".join(f"W{b}: {n}" for b, n in r["widths"].items())
            label = f"plan {r['budget']}" + ("" if r in results["plans"] else " (compare)")
            print(f"| {label} | {r['bits_per_weight']:.4f} | {r['ppl']:.2f} | "
                  f"{r.get('chosen', r['granularity'])} | {hist} |")
        else:
            print(f"| plan {r['budget']} | infeasible | | | {r['infeasible']} |")
    print("\nchecks:")
    for c in checks:
        lo, hi = c["gap_ci95"]
        print(f"  plan {c['budget']}: ppl {c['ppl']:.2f} vs line {c['line_ppl']:.2f} between "
              f"{c['between'][0]:.3f} and {c['between'][1]:.3f} bpw: "
              f"{'at/below' if c['at_or_below'] else 'ABOVE'} ({c['gap']:+.1%}; 95% interval "
              f"over resampled windows {lo:+.1%} .. {hi:+.1%})")
    if skipped is None:
        print(f"  {APPLY_BITS}-bit plan vs uniform W3: {p3['ppl']:.2f} vs {w3['ppl']:.2f} = "
              f"{abs(gain):.1%} {'lower' if gain >= 0 else 'higher'} "
              f"(gain {gain:+.1%}, 95% interval {gain_ci[0]:+.1%} .. {gain_ci[1]:+.1%}; "
              f"{'meets' if gain >= 0.15 else 'misses'} >= 15%)")
    else:
        print(f"  {APPLY_BITS}-bit plan vs uniform W3: skipped, the budget is infeasible "
              f"({skipped})")
    print(f"  sensitivity: {table.seconds:.0f} s for {len(table.kl)} layers x {len(table.bits)} "
          f"widths (api.sensitivity call {sens_call_s:.0f} s; {table.settings})")
    print(f"  allocation, 224 x 7 LLaMA-7B table: worst {alloc['worst_ms']:.0f} ms over "
          f"budgets, exact={alloc['exact']}")
    if set_ms is None:
        print(f"  applying a plan: not timed (no {APPLY_BITS}-bit plan)")
    else:
        print(f"  applying a plan: set_bits median {set_ms:.2f} ms (20 runs); with every weight "
              f"materialised {mat_ms:.0f} ms")
    if subset:
        print(f"\nfast vs slow protocol on {len(subset['layers'])} layers "
              f"(slow: {subset['slow_seconds']:.0f} s): Spearman {subset['spearman']:.3f}")
        for r in subset["plans"]:
            f, s = r["fast"], r["slow"]
            print(f"  subset budget {r['avg_bits_of_subset']}: slow-KL sum fast plan "
                  f"{f['slow_kl_sum']:.4f} vs slow plan {s['slow_kl_sum']:.4f}; ppl "
                  f"({subset['windows']} windows) "
                  f"{f['ppl']:.2f} vs {s['ppl']:.2f}")
    return {"model": model_label(base_model), "base_model": base_model, "group": group,
            "eval": f"Pride and Prejudice, {a.windows} x 512 tokens", "windows": a.windows,
            "elastic": a.elastic,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}",
            "in_context": a.in_context, "date": time.strftime("%Y-%m-%d"),
            "sensitivity_seconds": table.seconds, "sensitivity_settings": table.settings,
            "allocation_llama7b": alloc, "set_bits_plan_ms": set_ms,
            "set_bits_plan_and_materialise_ms": mat_ms, **results, "line_checks": checks,
            "plan3_vs_w3_gain": gain, "plan3_vs_w3_gain_ci95": gain_ci,
            # why the two figures above and the set_bits times are None, if they are
            "plan3_skipped": None if skipped is None else f"{APPLY_BITS}-bit budget: {skipped}",
            "bootstrap": {"resamples": BOOTSTRAP, "unit": "512-token window", "seed": 0},
            "subset_check": subset}


def plot(results: dict, path: Path, n_windows: int, base_model: str | None,
         group: str | None) -> None:
    """Perplexity against stored bits per weight; the title names the model and, where known
    (JSON of earlier runs did not record it), the group size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot (pip install -e '.[bench]', then "
              f"--replot {path.with_suffix('.json')})")
        return

    uni = [u for u in results["uniform"] if u["bits"] is not None]
    plans = [r for r in results["plans"] if "ppl" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([u["bits_per_weight"] for u in uni], [u["ppl"] for u in uni], "o-", label="uniform")
    for u in uni:
        ax.annotate(f"W{u['bits']}", (u["bits_per_weight"], u["ppl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.plot([r["bits_per_weight"] for r in plans], [r["ppl"] for r in plans], "s--",
            label="mixed-precision plan")
    for gran in sorted({r["granularity"] for r in results.get("compare", [])}):
        rows = [r for r in results["compare"] if r["granularity"] == gran]
        ax.plot([r["bits_per_weight"] for r in rows], [r["ppl"] for r in rows], "x:",
                label=f"plan, {gran} granularity only")
    fp = next(u["ppl"] for u in results["uniform"] if u["bits"] is None)
    ax.axhline(fp, color="grey", lw=0.8, ls=":",
               label=f"float ({DEFAULT_FLOAT})" if is_default(base_model) else "float")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (scales and zero-points included)")
    ax.set_ylabel(f"perplexity, Pride and Prejudice ({n_windows} x 512)")
    ax.set_title(", ".join(filter(None, (model_name(base_model), "one elastic model", group))))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
