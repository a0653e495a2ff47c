"""benchmarks/mixed_precision.py: the line check and its interval over resampled windows."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from mixed_precision import bootstrap_ppl, line_check  # noqa: E402


def row(bits, bpw, nll):
    return {"bits": bits, "bits_per_weight": bpw, "ppl": math.exp(np.mean(nll)),
            "window_nll": list(nll)}


def test_line_check_gives_the_gap_and_an_interval_that_holds_it():
    rng = np.random.default_rng(0)
    base = rng.normal(3.3, 0.3, 32)  # windows differ a lot; configurations shift them alike
    w2, w3 = row(2, 2.25, base + 0.6), row(3, 3.25, base + 0.2)
    below = {"budget": 2.75, **row(None, 2.75, base + 0.3)}
    above = {"budget": 3.0, **row(None, 3.0, base + 0.4 + rng.normal(0, 0.02, 32))}
    at_w3 = {"budget": 3.25, **row(None, 3.25, base + 0.2)}
    checks = {c["budget"]: c for c in line_check([w2, w3], [below, above, at_w3])}
    line = w2["ppl"] + (w3["ppl"] - w2["ppl"]) * 0.5
    assert checks[2.75]["line_ppl"] == pytest.approx(line)
    assert checks[2.75]["gap"] == pytest.approx(below["ppl"] / line - 1)
    assert checks[2.75]["at_or_below"] and not checks[3.0]["at_or_below"]
    for c in checks.values():
        lo, hi = c["gap_ci95"]
        assert lo <= c["gap"] <= hi
    assert checks[2.75]["gap_ci95"][1] < 0 < checks[3.0]["gap_ci95"][0]  # paired: clear-cut
    assert checks[3.25]["gap_ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_bootstrap_resamples_every_configuration_alike():
    a, b = row(2, 2.0, [1.0, 2.0, 3.0]), row(3, 3.0, [1.5, 2.5, 3.5])
    pa, pb = bootstrap_ppl([a, b], n_boot=50)
    assert pa.shape == (50,) and np.allclose(pb / pa, math.exp(0.5))
