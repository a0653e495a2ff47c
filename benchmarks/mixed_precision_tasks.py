"""Mixed precision beyond causal LMs: the Pareto curve of an image classifier's or an
encoder's elastic model, uniform widths against training-free plans, through the command line.

    python benchmarks/mixed_precision_tasks.py --elastic vit-elastic      # `quept quantize --model vit`
    python benchmarks/mixed_precision_tasks.py --elastic minilm-elastic   # `quept quantize --model minilm`

It runs `quept plan` once for every budget (the sensitivity table and the in-context sweeps are
cached in the folder; ``--recompute`` measures them afresh), then `quept eval` on every plan
and on every uniform width, given as the inline plans ``*=2`` .. ``*=8`` so that both are
measured by the same code: for an image classifier the mean KL of each test image's class
distribution to the float model's and top-1 on the Fashion-MNIST test split, for an encoder the
mean cosine of each paragraph's embedding with the float encoder's on *Pride and Prejudice*.
It checks every plan against the straight line joining the uniform widths around it (on the
KL, or on one minus the cosine), prints a table and writes JSON (and a plot with matplotlib).

``--exact`` also runs the slow protocol (a whole forward per layer and width) on the inputs the
sensitivity table was measured on, and compares the plans made from each table (per layer) on
the held-out data. ``--sensitivity exact`` makes the plans themselves from the slow protocol's
table (`quept plan --sensitivity exact`), every other step unchanged, so that its JSON and the
default run's compare the final plans of either table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import quept
from quept.api import SENSITIVITY_JSON, read_meta
from quept.cli import main as quept_main
from quept.cli.common import _images, positive
from quept.cli.plan import PLAN_SAMPLES, _plan_inputs
from quept.models import family_for_type
from quept.search import SensitivityConfig, plan_from_table
from quept.search.exact import configuration_kl, exact_sensitivity
from quept.search.table import SensitivityTable

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 5.0)


def run_json(argv: list[str]) -> tuple[dict, float]:
    """One `quept` command in this process: its JSON result and wall-clock seconds."""
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = quept_main([*argv, "--json"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"quept {' '.join(argv)} failed ({rc})")
    return json.loads(out.getvalue()), seconds


def line_checks(uniform: list[dict], plans: list[dict]) -> list[dict]:
    """Each plan against the straight line joining the uniform points just below and above
    its stored bits per weight, on ``cost`` (lower is better)."""
    pts = sorted((u["bits_per_weight"], u["cost"]) for u in uniform)
    out = []
    for p in plans:
        x = p["bits_per_weight"]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                line = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                out.append({"budget": p["budget"], "bits_per_weight": x, "cost": p["cost"],
                            "between": [x0, x1], "line_cost": line,
                            "at_or_below": p["cost"] <= line, "ratio": p["cost"] / line})
                break
    return out


def exact_check(folder: Path, task: str, budgets: list[float]) -> dict:
    """The fast table (cached by `quept plan`) against the slow protocol on the same inputs:
    Spearman over every (layer, width), and each budget's per-layer plan from either table
    measured on held-out data (the test split, or 256 paragraphs of Pride and Prejudice)."""
    from quept import data
    from quept.eval import sentences_from_text

    model, tok = quept.load(folder)
    cfg = SensitivityConfig(n_samples=PLAN_SAMPLES[task][0])
    inputs = _plan_inputs(argparse.Namespace(calib_text=None), model, tok, task, cfg)
    fast = quept.sensitivity(model, inputs, cfg, cache=folder / SENSITIVITY_JSON,
                             progress=False)
    t0 = time.perf_counter()
    slow = exact_sensitivity(model, inputs)
    slow_s = time.perf_counter() - t0
    names = list(slow)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    fv = np.array([fast.kl[n] for n in names]).ravel()
    sv = np.array([slow[n] for n in names]).ravel()
    spearman = float(np.corrcoef(rank(fv), rank(sv))[0, 1])
    if task == "image-classification":
        held = _images(model, "test", 10000, 0)[0]
    else:
        held = sentences_from_text(tok, data.evaluation_text(), 256, max_len=128)
    slow_table = SensitivityTable(fast.bits, fast.group_size, fast.shapes,
                                  {n: tuple(v) for n, v in slow.items()}, "slow", fast.settings)
    rows = []
    for avg in budgets:
        plans = {label: plan_from_table(t, avg_bits=avg)
                 for label, t in (("fast", fast), ("slow", slow_table))}
        costs = configuration_kl(model, held, list(plans.values()), batch_size=256)
        rows.append({"avg_bits": avg, **{f"{k}_bits_per_weight": p.bits_per_weight
                                         for k, p in plans.items()},
                     **{f"{k}_held_out_cost": c for k, c in zip(plans, costs)}})
        print(f"  {avg} bits (per layer): plan from the fast table {costs[0]:.6g}, from the "
              f"slow protocol {costs[1]:.6g} (held out)")
    print(f"fast vs slow table: Spearman {spearman:.4f} over {len(sv)} entries; slow protocol "
          f"{slow_s:.0f} s, fast table {fast.seconds:.0f} s")
    return {"spearman": spearman, "entries": len(sv), "slow_seconds": slow_s,
            "fast_seconds": fast.seconds, "plans": rows}


def plot(uniform: list[dict], plans: list[dict], label: str, title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([u["bits_per_weight"] for u in uniform], [u["cost"] for u in uniform], "o-",
            label="uniform W2..W8")
    ax.plot([p["bits_per_weight"] for p in plans], [p["cost"] for p in plans], "s--",
            label="plans (quept plan)")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (scales and zero-points included)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elastic", required=True, help="elastic folder of an image classifier or "
                   "an encoder")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                   help="bits per weight of the plans, comma-separated")
    p.add_argument("--out", default=None, help="JSON to write (default "
                   "results/mixed_precision_<model type>.json)")
    p.add_argument("--recompute", action="store_true",
                   help="measure the sensitivity table and sweeps afresh")
    p.add_argument("--exact", action="store_true",
                   help="also run the slow protocol (a whole forward per layer and width) on "
                   "the inputs the fast table was measured on, and compare the plans made "
                   "from each table (per layer) on the held-out data")
    p.add_argument("--sensitivity", choices=("fast", "exact"), default="fast",
                   help="the table `quept plan` makes the plans from")
    p.add_argument("--threads", type=positive, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    folder = Path(a.elastic)
    model_type = read_meta(folder)["model_type"]
    task = family_for_type(model_type).task
    if task == "causal-lm":
        raise SystemExit("causal LMs: benchmarks/mixed_precision.py")
    out = Path(a.out or f"results/mixed_precision_{model_type}.json")
    plans_dir = out.with_suffix("")  # the plan files, next to the JSON
    plans_dir.mkdir(parents=True, exist_ok=True)

    made, plan_s = run_json(["plan", str(folder), "--avg-bits", a.budgets, "--out",
                             str(plans_dir), "--sensitivity", a.sensitivity,
                             *(["--recompute"] if a.recompute else [])])
    made = made.get("plans", [made])
    evaluated, eval_s = run_json(["eval", str(folder), "--plan", str(plans_dir),
                                  *(arg for b in range(2, 9) for arg in ("--plan", f"*={b}"))])
    rows = evaluated["plans"]
    if task == "image-classification":
        metric, label = "kl_to_float", "KL of the class distribution to float (nats/image)"
        extra = "accuracy"
        for r in rows:
            r["cost"] = r["kl_to_float"]
        data = f"{evaluated['images']} Fashion-MNIST test images"
    else:
        metric, label = "cosine_mean", "1 - cosine of the sentence embedding to float"
        extra = "neighbour_agreement"
        for r in rows:
            r["cost"] = 1 - r["cosine_mean"]
        data = f"{evaluated['sentences']} paragraphs of Pride and Prejudice"
    uniform = [r for r in rows if r["path"].startswith("*=")]
    by_file = {Path(r["path"]).name: r for r in rows if not r["path"].startswith("*=")}
    plans = []
    for m in made:
        r = dict(by_file[Path(m["out"]).name])
        r.update(budget=m["budget"]["avg_bits"], chosen=m["chosen"], checked=m["checked_kl"],
                 predicted=m["predicted_kl"])
        plans.append(r)
    checks = line_checks(uniform, plans)
    exact = (exact_check(folder, task, [float(b) for b in a.budgets.split(",")])
             if a.exact else None)

    print(f"\n{folder} ({model_type}), {data}; plans made in {plan_s:.0f} s "
          f"(sensitivity {made[0]['sensitivity_seconds'] or 0:.0f} s of it), evaluated in "
          f"{eval_s:.0f} s")
    print(f"| configuration | bits/weight stored | {metric} | {extra} | line | at or below |")
    print("|---|---|---|---|---|---|")
    for r in sorted(uniform + plans, key=lambda r: r["bits_per_weight"]):
        c = next((c for c in checks if r in plans and c["budget"] == r.get("budget")), None)
        name = r["path"] if r in uniform else f"plan {r['budget']} ({r['chosen']})"
        print(f"| {name} | {r['bits_per_weight']:.4f} | {r[metric]:.6g} | {r[extra]:.4f} | "
              + (f"{c['line_cost']:.6g} | {'yes' if c['at_or_below'] else 'NO'} |" if c
                 else " | |"))
    below = sum(c["at_or_below"] for c in checks)
    print(f"{below} of {len(checks)} plans between two uniform widths at or below the line")

    result = {"folder": str(folder), "model_type": model_type, "task": task, "data": data,
              "metric": metric, "cost": label, "sensitivity": a.sensitivity,
              "sensitivity_seconds": made[0]["sensitivity_seconds"],
              "uniform": uniform, "plans": plans,
              "line_checks": checks, "plan_seconds": plan_s, "eval_seconds": eval_s,
              "exact_check": exact,
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "command": " ".join(sys.argv)}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    plot(uniform, plans, label, f"{folder.name}: uniform widths vs plans ({data})",
         out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
