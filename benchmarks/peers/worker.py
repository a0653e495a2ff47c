"""Child process of the peer benchmark: quantize once with one method, evaluate its widths.

    python -m peers.worker JOB.json RESULT.json      (with benchmarks/ on PYTHONPATH)

JOB.json says the method's adapter, the widths, the model, the texts and the sizes. The model,
the calibration windows and the evaluation windows come from quept, so every method sees the same
tokens, and perplexity is ``quept.eval.perplexity`` for all. With ``tasks`` in the job, every
width is also scored on those zero-shot tasks through lm-evaluation-harness
(:class:`quept.eval.harness.TaskRunner`, the first ``task_limit`` items, made from the
evaluation text), keeping each item's result as a string of 0/1 for paired comparisons.
RESULT.json is rewritten after every width, so a crash keeps what was measured before it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

import quept
from peers.common import block_linears, current_weight, levels_max
from quept.config import CalibConfig
from quept.eval import perplexity

log = logging.getLogger("peers.worker")


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def version(dist: str | None) -> str | None:
    if dist is None:
        return f"quept {quept.__version__}"
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def texts(job: dict[str, Any]) -> tuple[str, str]:
    """(calibration text, evaluation text): the given files, else the built-in novels."""
    from quept import data

    calib = data.load_texts(job["calib_text"]) if job.get("calib_text") else data.calibration_text()
    ev = data.load_texts(job["eval_text"]) if job.get("eval_text") else data.evaluation_text()
    return calib, ev


def write(path: str, result: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def run(job: dict[str, Any], out: str) -> None:
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model, tok = quept.load_model(job.get("model"))
    calib_text, eval_text = texts(job)
    ids = quept.samples_from_text(
        tok, calib_text, CalibConfig(n_samples=job["n_samples"], seq_len=job["seq_len"],
                                     batch_size=1, seed=job["seed"]))
    windows = quept.windows_from_text(tok, eval_text, job["eval_seq_len"], job["windows"])
    result: dict[str, Any] = {
        "cells": {}, "n_samples": job["n_samples"] if job["calibrates"] else None,
        "seq_len": job["seq_len"] if job["calibrates"] else None,
        "library": version(job.get("library")),
        "versions": {"torch": torch.__version__, "transformers": version("transformers")},
    }
    if job["adapter"] is None:
        select, info = (lambda b: model), {}
        result["calib_seconds"] = None
    else:
        adapter = importlib.import_module(f"peers.{job['adapter']}")
        t0 = time.perf_counter()
        q = adapter.quantize(model, tok, ids, job)
        result["calib_seconds"] = time.perf_counter() - t0
        select, info = q.select, q.info
    result["calib_peak_rss_gib"] = peak_rss_gib()
    result.update(info)
    write(out, result)
    for bits in job["bits"] or [None]:
        net = select(bits)
        first = next(iter(block_linears(net).values()))
        levels = levels_max(current_weight(first, bits), job["group_size"])
        if bits is not None and levels > 2**bits:
            raise RuntimeError(f"{job['method']} W{bits}: a group of the first linear holds "
                               f"{levels} distinct values (> 2^{bits}); not a {bits}-bit model")
        t0 = time.perf_counter()
        ppl = perplexity(net, windows, job["batch_size"])
        key = "float" if bits is None else str(bits)
        cell = {"ppl": ppl, "levels_max": levels, "eval_seconds": time.perf_counter() - t0}
        log.info("%s %s: perplexity %.3f", job["method"], key, ppl)
        if job.get("tasks"):
            t0 = time.perf_counter()
            cell["tasks"] = score_tasks(net, tok, eval_text, job)
            cell["task_seconds"] = time.perf_counter() - t0
            log.info("%s %s: tasks %s", job["method"], key, {
                t: {m: round(v, 4) for m, v in s.items() if isinstance(v, float)}
                for t, s in cell["tasks"].items()})
        result["cells"][key] = cell
        write(out, result)


def score_tasks(net: torch.nn.Module, tok: Any, text: str,
                job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The job's tasks on ``net`` as it stands; each item's 0/1 result kept as a string."""
    from quept.eval.harness import TaskRunner

    scores = TaskRunner(net, tok, job["tasks"], text=text, limit=job.get("task_limit"),
                        per_item=True)()
    for row in scores.values():
        row["per_item"] = {m: "".join(str(int(x)) for x in v)
                           for m, v in row.get("per_item", {}).items()}
    return scores


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(json.loads(Path(args[0]).read_text()), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
