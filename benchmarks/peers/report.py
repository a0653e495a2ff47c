"""The markdown table and the PNG plot of a peer-benchmark results document."""

from __future__ import annotations

import logging
import os
from typing import Any

from peers.methods import FLOAT, METHODS, Method
from peers.results import TIE, ok_ppl, ours_methods, verdict, widths_of

log = logging.getLogger(__name__)
NOT_RUN = "not run"


def fmt_ppl(p: float) -> str:
    """25.137 -> '25.14'; 537000 -> '5.4e5'."""
    if p < 1000:
        return f"{p:.2f}"
    mant, exp = f"{p:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _label(name: str) -> str:
    m: Method | None = METHODS.get(name)
    return m.label if m else name


def _in_plot(name: str) -> bool:
    m = METHODS.get(name)
    return m is None or m.in_plot


def _order(doc: dict[str, Any]) -> list[str]:
    known = [m for m in METHODS if m in doc["cells"] and m != FLOAT]
    return known + sorted(m for m in doc["cells"] if m not in METHODS)


def _cell_text(cell: dict[str, Any] | None, errors: list[str]) -> str:
    if cell is None:
        return NOT_RUN
    if cell.get("status") != "ok":
        errors.append(cell.get("error") or "unknown error")
        return f"error [{len(errors)}]"
    return fmt_ppl(cell["ppl"])


def markdown(doc: dict[str, Any]) -> str:
    """The results as markdown: perplexity, bits per weight, cost per run, errors, notes."""
    s, widths, errors = doc["setup"], widths_of(doc), []
    wa = s.get("activations") == "per-token"
    head = "| method | " + " | ".join(f"W{w}A{w}" if wa else f"W{w}" for w in widths) + " |"
    rule = "|---|" + "---|" * len(widths)
    lines = [
        "# QuEPT against peers", "",
        f"Model {s.get('model_label', s.get('model'))}; perplexity on {s.get('eval_text')}, "
        f"{s.get('windows')} windows x {s.get('eval_seq_len')} tokens; "
        + ("weights asymmetric" if wa else "weight-only, asymmetric")
        + f", group size {s.get('group_size')}, every linear of every decoder block"
        + ("; every such linear's input quantized per token, symmetric, dynamic, at the weight "
           "width" if wa else "") + " (embeddings, lm_head and norms stay float). Calibrating methods get the same token windows of "
        f"{s.get('calib_text')}. Machine: {s.get('machine')}.", "",
    ]
    flt = ok_ppl(doc["cells"].get(FLOAT, {}).get(FLOAT))
    if flt is not None:
        lines += [f"Float baseline ({_label(FLOAT)}, 32-bit weights): perplexity {fmt_ppl(flt)}.", ""]
    best = {w: min((p for m in _order(doc) if _in_plot(m)
                    for p in [ok_ppl(doc["cells"][m].get(w))] if p is not None), default=None)
            for w in widths}
    lines += ["## Perplexity (lower is better; **bold** = best at that width, ties within "
              f"{TIE:.0%})", "", head, rule]
    for m in _order(doc):
        row = []
        for w in widths:
            cell = doc["cells"][m].get(w)
            text = _cell_text(cell, errors)
            p = ok_ppl(cell)
            if p is not None and best[w] is not None and p <= best[w] * (1 + TIE) and _in_plot(m):
                text = f"**{text}**"
            row.append(text)
        lines.append(f"| {_label(m)} | " + " | ".join(row) + " |")
    for ours in ours_methods(doc):
        v = verdict(doc, ours)
        if v:
            lines.append(f"| {_label(ours)} / best peer | " + " | ".join(
                f"{v[w]['ratio']:.3f} ({'tie/win' if v[w]['wins'] else 'loses'})" if w in v
                else "" for w in widths) + " |")
    lines += ["", "## Stored bits per weight (codes + fp16 scale + zero-point per group)", "",
              head, rule]
    for m in _order(doc):
        lines.append(f"| {_label(m)} | " + " | ".join(
            f"{c['bits_per_weight']:.3f}" if (c := doc["cells"][m].get(w)) else ""
            for w in widths) + " |")
    lines += ["", "Codes count at b bits; scales as fp16; zero-points at b bits (packed, as in "
              "the GPTQ/AutoRound/compressed-tensors formats and QuEPT) except HQQ, which keeps a "
              "floating-point zero (16 bits). HQQ's own packing stores 3-bit codes ten to a "
              "32-bit word (3.2 bits) and 5/6-bit codes one per byte.", ""]
    lines += _task_lines(doc)
    lines += _cost_lines(doc)
    if errors:
        lines += ["## Errors (exact, last line of the run's output)", ""]
        lines += [f"{i}. `{e}`" for i, e in enumerate(errors, 1)] + [""]
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {_label(m)}: {t}" for m, t in doc["notes"].items()] + [""]
    return "\n".join(lines)


def _task_cell(cell: dict[str, Any] | None, task: str, metric: str) -> str:
    scores = (cell or {}).get("tasks", {}).get(task)
    if not scores or metric not in scores:
        return ""
    v = scores[metric]
    return f"{v:.1%}" if metric.startswith("acc") else fmt_ppl(v)


def _per_item(cell: dict[str, Any] | None, task: str, metric: str) -> list[float] | None:
    got = (cell or {}).get("tasks", {}).get(task, {}).get("per_item", {}).get(metric)
    return None if got is None else [float(c) for c in got]


def _task_lines(doc: dict[str, Any]) -> list[str]:
    """Zero-shot task scores per method and width, and each QuEPT row's paired difference in
    accuracy against every peer over the same items (with its standard error)."""
    from quept.eval.harness import paired_difference

    tasks = doc["setup"].get("tasks")
    if not tasks:
        return []
    widths = widths_of(doc)
    cols = [FLOAT, *widths]
    metrics = [(t, m) for t in tasks for m in dict.fromkeys(
        k for cells in doc["cells"].values() for c in cells.values()
        for k, v in c.get("tasks", {}).get(t, {}).items()
        if isinstance(v, float) and "_stderr" not in k and k != "items")]
    lines = ["## Zero-shot tasks (lm-evaluation-harness)", "",
             f"Built-in tasks {', '.join(tasks)} made from {doc['setup'].get('eval_text')}, "
             f"the first {doc['setup'].get('task_limit')} items of each; the same model run "
             "as for the perplexity above.", ""]
    for task, metric in metrics:
        better = "higher" if metric.startswith("acc") else "lower"
        lines += [f"### {task} {metric} ({better} is better)", "",
                  "| method | " + " | ".join("float" if w == FLOAT else f"W{w}" for w in cols)
                  + " |", "|---|" + "---|" * len(cols)]
        for m in [FLOAT, *_order(doc)]:
            cells = doc["cells"].get(m, {})
            if any("tasks" in c for c in cells.values()):
                lines.append(f"| {_label(m)} | " + " | ".join(
                    _task_cell(cells.get(w), task, metric) for w in cols) + " |")
        lines.append("")
    flt = doc["cells"].get(FLOAT, {}).get(FLOAT)
    same = []
    for m in _order(doc):
        for task, metric in metrics:
            ref = _per_item(flt, task, metric)
            row = []
            for w in widths:
                got = _per_item(doc["cells"][m].get(w), task, metric)
                ok = ref is not None and got is not None and len(got) == len(ref)
                row.append(f"{sum(a == b for a, b in zip(got, ref)) / len(ref):.1%}" if ok
                           else "")
            if any(row):
                same.append(f"| {_label(m)} | {task} {metric} | " + " | ".join(row) + " |")
    if same:
        lines += ["### Same result as the float model (share of items right or wrong for both)",
                  "", "| method | metric | " + " | ".join(f"W{w}" for w in widths) + " |",
                  "|---|---|" + "---|" * len(widths), *same, ""]
    mine = ours_methods(doc)
    peers = [m for m in _order(doc) if m not in mine and _in_plot(m)]
    rows = []
    for ours in mine:
        for peer in peers:
            for task, metric in metrics:
                row = []
                for w in widths:
                    a = _per_item(doc["cells"][ours].get(w), task, metric)
                    b = _per_item(doc["cells"][peer].get(w), task, metric)
                    if a is None or b is None or len(a) != len(b):
                        row.append("")
                        continue
                    d, err = paired_difference(a, b)
                    row.append(f"{100 * d:+.1f} ± {100 * err:.1f}")
                if any(row):
                    rows.append(f"| {_label(ours)} - {_label(peer)} | {task} {metric} | "
                                + " | ".join(row) + " |")
    if rows:
        lines += ["### Paired differences (percentage points, QuEPT minus peer, over the same "
                  "items; ± its standard error)", "",
                  "| rows | metric | " + " | ".join(f"W{w}" for w in widths) + " |",
                  "|---|---|" + "---|" * len(widths), *rows, ""]
    return lines


def _gib(x: float | None) -> str:
    return "" if x is None else f"{x:.2f} GiB"


def _cost_lines(doc: dict[str, Any]) -> list[str]:
    lines = ["## Cost per run (wall-clock on this machine; peak resident memory)", "",
             "| method | widths | calibration data | quantize / calibrate | peak RSS then | "
             "whole run (load + quantize + eval) | peak RSS of the run |",
             "|---|---|---|---|---|---|---|"]
    seen: dict[str, list[str]] = {}
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    rounding: dict[str, float] = {}  # per run: GPTQ or learned rounding of all its widths
    for m in [FLOAT, *_order(doc)]:
        for w, c in doc["cells"].get(m, {}).items():
            rid = c.get("run_id") or f"{m}/{w}"
            seen.setdefault(rid, []).append(w)
            runs[rid] = (m, c)
            if c.get("rounding_seconds") is not None:
                rounding[rid] = rounding.get(rid, 0.0) + c["rounding_seconds"]
    for rid, (m, c) in runs.items():
        ws = "float" if seen[rid] == [FLOAT] else ",".join(sorted(seen[rid], key=int))
        data = f"{c['n_samples']} x {c['seq_len']} tokens" if c.get("n_samples") else "none"
        secs, wall = c.get("calib_seconds"), c.get("wall_seconds")
        t = "" if secs is None else f"{secs:.0f} s" + (" (reused folder)" if c.get(
            "calib_reused") else "")
        if rid in rounding:
            t += (" + " if t else "") + f"{rounding[rid]:.0f} s rounding"
        lines.append(f"| {_label(m)} | {ws} | {data} | {t} | {_gib(c.get('calib_peak_rss_gib'))}"
                     f" | {'' if wall is None else f'{wall:.0f} s'} | "
                     f"{_gib(c.get('peak_rss_gib'))} |")
    commands = sorted({c["command"] for m in doc["cells"].values() for c in m.values()
                       if c.get("command")})
    lines += ["", "Commands that produced these cells:", ""] + [f"    {c}" for c in commands]
    return lines + [""]


def plot(doc: dict[str, Any], path: str | os.PathLike) -> bool:
    """Perplexity against stored bits per weight, one line per method, log y; False if no
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot written")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in _order(doc):
        if not _in_plot(m):
            continue
        pts = sorted((c["bits_per_weight"], c["ppl"]) for c in doc["cells"][m].values()
                     if ok_ppl(c) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=_label(m))
    flt = ok_ppl(doc["cells"].get(FLOAT, {}).get(FLOAT))
    if flt is not None:
        ax.axhline(flt, color="grey", linestyle="--", label=_label(FLOAT))
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (codes + scales + zero-points)")
    ax.set_ylabel(f"perplexity ({doc['setup'].get('windows')} x "
                  f"{doc['setup'].get('eval_seq_len')} tokens, log)")
    ax.set_title(f"{doc['setup'].get('model_label', 'model')}, group size "
                 f"{doc['setup'].get('group_size')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
