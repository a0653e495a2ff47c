"""Zero-shot task accuracy of an elastic model per width, against RTN, through
lm-evaluation-harness (the ``lmeval`` extra).

The built-in tasks ``last-word`` and ``next-sentence`` (:mod:`quept.data.tasks`) are made
from *Pride and Prejudice*, which calibration never sees; the first --limit items of each are
scored at the float model, at each width of --bits, and under RTN at each width of --rtn-bits.
Every accuracy carries its binomial standard error. Run from the repository root, after
`quept quantize` has written ./quept-elastic:

    python benchmarks/tasks.py --elastic quept-elastic

Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from quept import api, data
from quept.cli.common import positive
from quept.eval.harness import TaskRunner

TASKS = ("last-word", "next-sentence")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _cell(scores: dict[str, float], metric: str) -> str:
    if metric.startswith("acc"):
        return f"{scores[metric]:.1%} ± {scores[metric + '_stderr']:.1%}"
    return f"{scores[metric]:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--elastic", default="quept-elastic", help="elastic folder")
    p.add_argument("--bits", type=_ints, default=[2, 3, 4, 8])
    p.add_argument("--rtn-bits", type=_ints, default=[2, 3, 4])
    p.add_argument("--limit", type=positive, default=300, help="items per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="results/tasks.json")
    a = p.parse_args()
    model, tok = api.load(a.elastic)
    runner = TaskRunner(model, tok, TASKS, text=data.evaluation_text(), limit=a.limit,
                        batch_size=a.batch_size)
    configs = [(None, False)] + [(b, False) for b in a.bits] + [(b, True) for b in a.rtn_bits]
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
           f"{torch.__version__}", "elastic": a.elastic, "limit": a.limit, "tasks": TASKS,
           "rows": []}
    for bits, rtn in configs:
        api.set_bits(model, bits, rtn=rtn)
        start = time.perf_counter()
        scores = runner()
        seconds = time.perf_counter() - start
        row = {"bits": bits, "rtn": rtn, "bits_per_weight": api.stored_bits(model),
               "scores": scores, "seconds": seconds}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    api.set_bits(model, None)
    metrics = [("last-word", "acc"), ("last-word", "perplexity"), ("next-sentence", "acc"),
               ("next-sentence", "acc_norm")]
    print("\n| model | bits/weight | " + " | ".join(f"{t} {m}" for t, m in metrics)
          + " |\n|---|---|" + "---|" * len(metrics))
    for row in res["rows"]:
        name = "float" if row["bits"] is None else f"{'RTN' if row['rtn'] else 'QuEPT'} W{row['bits']}"
        print(f"| {name} | {row['bits_per_weight']:.3f} | "
              + " | ".join(_cell(row["scores"][t], m) for t, m in metrics) + " |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
