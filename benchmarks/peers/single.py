"""One elastic QuEPT model against RTN, HQQ and GPTQ in a single process: the run and the
tables that benchmarks/vit_peers.py and benchmarks/encoder_peers.py share (each supplies its
data, its GPTQ call and its score)."""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import quept
from peers import hqq
from peers.common import check_levels
from quept.config import CalibConfig, ElasticSpec

Score = Callable[[nn.Module], dict[str, float]]


def compare(base: nn.Module, spec: ElasticSpec, calib: CalibConfig, calib_data: torch.Tensor,
            widths: list[int], label: str, score: Score,
            gptq: Callable[[nn.Module, int], nn.Module],
            check: Callable[[nn.Module, str], None] = lambda model, method: None,
            ) -> tuple[list[dict[str, Any]], float]:
    """Calibrate one elastic copy of ``base`` and score it and RTN at every width, then HQQ and
    GPTQ (``gptq(model, bits)``) on fresh copies, one width at a time. Every quantized model's
    levels are checked, and the peers' by ``check``. Torch's generator is seeded with the
    calibration seed before each GPTQ run (llmcompressor may shuffle its calibration data with
    it), so its rows do not depend on what ran before. Returns the rows (printed as they come)
    and QuEPT's calibration seconds."""
    group_size = spec.default_group_size
    rows: list[dict[str, Any]] = []

    def measure(method: str, bits: int, model: nn.Module, seconds: float) -> None:
        rows.append({"method": method, "bits": bits, "seconds": seconds, **score(model)})
        print(json.dumps(rows[-1]), flush=True)

    elastic = quept.prepare(copy.deepcopy(base), spec, seed=calib.seed)
    t0 = time.perf_counter()
    quept.calibrate(elastic, calib_data, calib, progress=False)
    calib_s = time.perf_counter() - t0
    for b in widths:
        for method, rtn in ((label, False), ("RTN", True)):
            quept.set_bits(elastic, b, rtn=rtn)
            if not rtn:
                check_levels(elastic, b, group_size, method)
            measure(method, b, elastic, 0.0 if rtn else calib_s)
    peers = (("HQQ", lambda m, b: hqq.quantize(m, None, None, {
        "bits": (b,), "group_size": group_size}).select(b)), ("GPTQ (llmcompressor)", gptq))
    for b in widths:
        for method, run in peers:
            torch.manual_seed(calib.seed)
            t0 = time.perf_counter()
            model = run(copy.deepcopy(base), b)
            seconds = time.perf_counter() - t0
            check_levels(model, b, group_size, method)
            check(model, method)
            measure(method, b, model, seconds)
    return rows, calib_s


def print_tables(rows: list[dict[str, Any]], widths: list[int],
                 metrics: tuple[tuple[str, str, str], ...]) -> None:
    """One markdown table per ``(key, title, format)`` metric: a row per method, a column per
    width (rows without a width, such as the float model's, are left out)."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"] is not None))
    cell = {(r["method"], r["bits"]): r for r in rows}
    for key, title, fmt in metrics:
        print(f"{title}:\n\n| method | " + " | ".join(f"W{b}" for b in widths) + " |\n|---|"
              + "---|" * len(widths))
        for m in methods:
            print(f"| {m} | " + " | ".join(fmt.format(cell[(m, b)][key]) for b in widths)
                  + " |")
        print()


def machine() -> str:
    """The machine and the versions of torch and the peers' libraries, for the JSON record."""
    import hqq as hqq_pkg  # the package (``peers.hqq`` is the adapter)
    import llmcompressor

    return (f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, llmcompressor {llmcompressor.__version__}, "
            f"hqq {getattr(hqq_pkg, '__version__', '?')}")
