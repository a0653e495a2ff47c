"""QuEPT against peer quantizers: one elastic model vs methods tuned for one width each.

Same model, same calibration windows, same evaluation windows and perplexity code for every
method; peers run through their own released libraries (``pip install -e ".[peers]"``, best in
a separate virtualenv passed as --python). Every run is its own child process, so its wall-clock
time and peak memory are its own and a crash is recorded as its exact error. Results are merged
into OUT.json (re-running a method at a width replaces that cell), and OUT.md / OUT.png are
rewritten after every run. Run from the repository root, e.g.:

    python benchmarks/peers.py --python /path/to/peers-venv/bin/python \\
        --methods float,rtn,hqq --widths 2,3,4,5,6,8 --lock /tmp/quept-heavy.lock
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import report, results  # noqa: E402
from peers.methods import DEFAULT_METHODS, FLOAT, WA_METHODS, method  # noqa: E402

log = logging.getLogger("peers")
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (float = dequantized Q4_1)"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, {platform.system()}"


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (if given) so heavy runs never overlap."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        log.info("waiting for the lock %s", path)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_child(a: argparse.Namespace, job: dict[str, Any], log_path: Path) -> tuple[
        dict[str, Any] | None, dict[str, Any]]:
    """Run one worker; returns (its RESULT.json or None, the parent's record of the run)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp, locked(a.lock):
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        t0 = time.perf_counter()
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([a.python, "-m", "peers.worker", str(job_path),
                                     str(out_path)], cwd=tmp, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        result = json.loads(out_path.read_text()) if out_path.is_file() else None
    run = {"wall_seconds": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
           "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "returncode": proc.returncode, "log": str(log_path),
           # Other work on the machine inflates wall-clock times: record how busy it was.
           "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
    if proc.returncode != 0:
        run["error"] = results.error_line(log_path.read_text(errors="replace"), proc.returncode)
        log.error("%s failed: %s (log: %s)", job["method"], run["error"], log_path)
    return result, run


def absolute(path: str | None) -> str | None:
    """A path given on the command line, made absolute for the child runs (they work in a
    temporary directory); symlinks are kept, so a virtualenv's python stays that venv's."""
    return None if path is None else os.path.abspath(path)


def portable(arg: str) -> str:
    """A command-line argument as the results record it: an absolute path next to the
    checkout becomes relative to it, so the JSON names no machine's directories."""
    p = Path(arg)
    if p.is_absolute() and Path.cwd().parent in p.parents:
        return os.path.relpath(p)
    return arg


def recorded_argv(argv: list[str]) -> list[str]:
    """``argv`` as the results record it: paths next to the checkout made relative, and the
    lock file (a path of the machine, with no bearing on the results) named LOCKFILE."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--lock":
            arg = "LOCKFILE"
        elif arg.startswith("--lock="):
            arg = "--lock=LOCKFILE"
        out.append(portable(arg))
    return out


def jobs_for(a: argparse.Namespace, name: str) -> list[list[int | None]]:
    """The width lists of the runs ``name`` needs: one run per width, or one for all."""
    m = method(name)
    if name == FLOAT:
        return [[None]]
    return [list(a.widths)] if m.one_run else [[b] for b in a.widths]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: built-in SmolLM2)")
    p.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help="calibration text (default: the Austen novels but Pride and Prejudice)")
    p.add_argument("--eval-text", nargs="+", default=None, metavar="FILE",
                   help="evaluation text (default: Pride and Prejudice)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated (default: {','.join(DEFAULT_METHODS)}; also "
                   "autoround-smoke, a 2-iteration check of the AutoRound path)")
    p.add_argument("--widths", type=_ints, default=[2, 3, 4, 5, 6, 8], help="weight widths")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--windows", type=int, default=32, help="512-token evaluation windows")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    p.add_argument("--elastic", default=None, metavar="FOLDER",
                   help="QuEPT: evaluate this elastic folder instead of calibrating one")
    p.add_argument("--out", default="results/peers", help="writes OUT.json, OUT.md, OUT.png")
    p.add_argument("--workdir", default="results/tmp/peers",
                   help="run logs and QuEPT's calibrated folder (default: results/tmp/peers)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the runs (one with quept and the peer libraries)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--lock", default=None, help="flock this file around every run")
    p.add_argument("--note", action="append", default=[], metavar="METHOD=TEXT",
                   help="record a note on a method (e.g. why a cell was not run)")
    p.add_argument("--activations", action="store_true",
                   help="weight+activation mode: every block linear's input quantized per token "
                   "at the weight width too (methods: " + ", ".join(WA_METHODS) + "); use "
                   "another --out than the weight-only table's")
    p.add_argument("--tasks", default=None, metavar="NAMES",
                   help="also score every width on these zero-shot tasks (comma-separated, e.g. "
                   "last-word,next-sentence; needs lm_eval in --python's environment); use "
                   "another --out than the perplexity table's")
    p.add_argument("--task-limit", type=int, default=300, help="items per task (300)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in OUT.json")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT.md/OUT.png only")
    a = p.parse_args()
    if os.sep in a.python:  # a path, not a name looked up on PATH
        a.python = absolute(a.python)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out_json, work = Path(a.out + ".json"), Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    setup = {
        "model": a.model or "default", "eval_text": a.eval_text or "Pride and Prejudice",
        "windows": a.windows, "eval_seq_len": a.eval_seq_len, "group_size": a.group_size,
        "model_label": a.model or DEFAULT_MODEL_LABEL,
        "calib_text": a.calib_text or "the five other Austen novels",
        "machine": machine(a.threads),
        "command": " ".join(["python", *recorded_argv(sys.argv)]),
    }
    if a.activations:  # written only when set: the weight-only table's setup is unchanged
        setup["activations"] = "per-token"
    tasks = [t for t in (a.tasks or "").split(",") if t]
    if tasks:  # likewise
        if a.task_limit < 1:
            raise SystemExit(f"--task-limit must be >= 1 items per task, got {a.task_limit}")
        setup.update(tasks=tasks, task_limit=a.task_limit)
    notes = {}
    for note in a.note:
        name, _, text = note.partition("=")
        method(name)  # refuse a misspelt method
        notes[name] = text
    doc = results.empty(setup) if a.fresh else results.load(out_json, setup)
    doc.setdefault("notes", {}).update(notes)
    names = [] if a.report_only else [m for m in a.methods.split(",") if m]
    for name in names:
        if name != FLOAT and (name in WA_METHODS) != a.activations:
            raise SystemExit(f"method {name} is " + ("weight+activation: add --activations"
                                                     if name in WA_METHODS else
                                                     "weight-only: drop --activations"))
    for name in names:
        m = method(name)
        for widths in jobs_for(a, name):
            job = {"method": name, "adapter": m.adapter, "options": m.options,
                   "library": m.library, "calibrates": m.calibrates, "bits": [
                       b for b in widths if b is not None], "model": absolute(a.model),
                   "calib_text": a.calib_text and [absolute(f) for f in a.calib_text],
                   "eval_text": a.eval_text and [absolute(f) for f in a.eval_text],
                   "group_size": a.group_size, "n_samples": a.n_samples, "seq_len": a.seq_len,
                   "seed": a.seed, "windows": a.windows, "eval_seq_len": a.eval_seq_len,
                   "elastic": absolute(a.elastic), "workdir": str(work.resolve()), "threads": a.threads,
                   "batch_size": 2, "tasks": tasks, "task_limit": a.task_limit}
            tag = name + ("" if widths == [None] else "-w" + "".join(map(str, widths)))
            log.info("run %s", tag)
            result, run = run_child(a, job, work / f"{tag}.log")
            run.update(run_id=f"{tag}@{run['measured_at']}", command=setup["command"])
            cells = results.cells_from_run(name, widths, result, run, a.group_size)
            if not a.fresh:  # another invocation may have written the file meanwhile
                doc = results.load(out_json, setup)
                doc.setdefault("notes", {}).update(notes)
            doc = results.merge(doc, setup, name, cells)
            results.save(doc, out_json)
            _write_report(doc, a.out)
    _write_report(doc, a.out)
    results.save(doc, out_json)
    print(report.markdown(doc))
    return 0


def _write_report(doc: dict[str, Any], out: str) -> None:
    Path(out + ".md").write_text(report.markdown(doc) + "\n")
    report.plot(doc, out + ".png")


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
