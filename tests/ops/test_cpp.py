"""The C++ kernels of quept.ops: their sources ship in quept/ops/csrc and define what the
loaders bind; a source that cannot be read, or a compiler that is missing, leaves the PyTorch
operations in place; concurrent builds wait for each other and a killed build's lock goes."""

import logging
import re

import pytest

from quept.ops import cpp


@pytest.mark.parametrize("name, functions", [
    ("qgemv.cpp", ["qgemv", "qdequant", "kv_quantize", "kv_attend"]),
    ("fake_quant.cpp", ["fq_forward", "fq_backward"]),
])
def test_sources_define_the_bound_functions(name, functions):
    text = cpp.read_source(name)
    assert "#include <torch/extension.h>" in text
    for f in functions:  # load_inline binds these names: each needs a definition
        assert re.search(rf"^\S.*\b{f}\(", text, re.M), f


def test_the_loaders_name_their_sources_and_functions():
    from quept.ops import fq_kernel, kernels

    for kernel in (kernels._KERNEL, fq_kernel._KERNEL):
        text = cpp.read_source(kernel.source)
        assert all(re.search(rf"\b{f}\(", text) for f in kernel.functions)


def test_a_missing_source_falls_back_once(caplog):
    kernel = cpp.CppKernel("quept_test", "missing.cpp", ["f"], "test kernel unavailable (%s)")
    with caplog.at_level(logging.WARNING):
        assert kernel.load() is None
        assert kernel.load() is None  # tried once: no second warning
    assert caplog.text.count("test kernel unavailable") == 1 and "missing.cpp" in caplog.text


def test_no_kernel_when_asked(monkeypatch):
    monkeypatch.setenv("QUEPT_NO_KERNEL", "1")
    assert cpp.CppKernel("quept_test", "qgemv.cpp", ["qgemv"], "unavailable (%s)").load() is None


def test_build_lock_removes_a_killed_builds_lock_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "lock").touch()  # what torch leaves when a build is killed
    with cpp._build_lock("ext") as folder:
        assert folder == tmp_path / "ext" and not (folder / "lock").exists()


def test_build_lock_waits_for_a_live_build(tmp_path, monkeypatch):
    import fcntl
    import threading

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "ext").mkdir()
    entered = threading.Event()

    def build():
        with cpp._build_lock("ext"):
            entered.set()

    with open(tmp_path / "ext" / "quept.flock", "a") as held:  # another build holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        (tmp_path / "ext" / "lock").touch()  # its torch lock file is live: must stay
        t = threading.Thread(target=build)
        t.start()
        assert not entered.wait(0.5) and (tmp_path / "ext" / "lock").exists()
        (tmp_path / "ext" / "lock").unlink()  # the build ends: torch removes its file
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(10)
    assert entered.is_set()
