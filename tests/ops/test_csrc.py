"""The C++ sources of the CPU kernels ship in quept/ops/csrc and define what the loaders bind."""

import re

import pytest

from quept.ops.kernels import read_source


@pytest.mark.parametrize("name, functions", [
    ("qgemv.cpp", ["qgemv", "qdequant", "kv_quantize", "kv_attend"]),
    ("fake_quant.cpp", ["fq_forward", "fq_backward"]),
])
def test_sources_define_the_bound_functions(name, functions):
    text = read_source(name)
    assert "#include <torch/extension.h>" in text
    for f in functions:  # load_inline binds these names: each needs a definition
        assert re.search(rf"^\S.*\b{f}\(", text, re.M), f


@pytest.mark.parametrize("module", ["kernels", "fq_kernel"])
def test_a_missing_source_falls_back(module, monkeypatch, caplog):
    import importlib

    mod = importlib.import_module(f"quept.ops.{module}")

    def missing(name):
        raise FileNotFoundError(name)

    monkeypatch.setattr(mod, "read_source", missing)
    monkeypatch.setattr(mod, "_tried", False)  # monkeypatch puts the real state back after
    monkeypatch.setattr(mod, "_module", None)
    assert mod.load() is None and "unavailable" in caplog.text
