"""Command line: a thin layer over :mod:`quept.api` (parse, build configs, call, print),
one module per command."""

from __future__ import annotations

import argparse
import contextlib
import dis
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from quept import __version__
from quept.cli.common import _read_texts, positive
from quept.cli.deploy import add_compact, add_export
from quept.cli.evaluate import _add_eval
from quept.cli.plan import _add_plan
from quept.cli.quantize import _add_quantize
from quept.cli.run import add_info, add_run
from quept.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quept", description="Elastic-precision post-training "
                                "quantization: calibrate once, run at any width 2..8.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and the traceback of an error raised outside quept")
    p.add_argument("--version", action="version", version=f"quept {__version__} (torch "
                   f"{torch.__version__})")
    p.add_argument("--threads", type=positive, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_plan(sub)
    add_compact(sub)
    add_export(sub)
    add_run(sub)
    add_info(sub)
    return p


EXTRAS = {"transformers": "hf", "gguf": "hf", "rdata": "hf", "datasets": "hub",
          "lm_eval": "lmeval", "accelerate": "lmeval", "compressed_tensors": "ct",
          "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
          "onnxruntime_genai": "onnx", "matplotlib": "bench", "hqq": "peers",
          "auto_round": "peers", "llmcompressor": "peers"}
"""The optional package each import needs, by the extra of pyproject.toml that installs it."""


def _missing_package(e: ImportError) -> str:
    """What to install for a failed import: the extra that brings a package that is not
    installed; an installed package that fails to import is reported as it failed."""
    top = (e.name or "").partition(".")[0]
    try:
        installed = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a module whose spec cannot be found: not usable
        installed = False
    if top and not installed:
        extra = EXTRAS.get(top)
        how = f"pip install 'quept[{extra}]'" if extra else f"pip install {top}"
        return f"this needs the {top} package, which is not installed: {how}"
    return f"a package failed to import ({e}); reinstalling it may help"


def main(argv: list[str] | None = None) -> int:
    """Run ``quept ARGV``; returns the exit status. A reader that stops reading early
    (``quept info FOLDER | head``) ends the command quietly, as Python's documentation advises
    (its "Note on SIGPIPE"): no error message and no traceback, exit status 1."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here when the output fitted in the buffer
    except BrokenPipeError:
        _discard_stdout()
        return 1
    return status


def _discard_stdout() -> None:
    """Point stdout at the null device, so that what is left in its buffer is not written to
    the closed pipe when Python exits (which would print another BrokenPipeError)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    _read_texts.cache_clear()  # texts are read afresh by every command
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    # OSError: a path refused; ArithmeticError: a NaN stopped a computation and says where
    try:
        with _sigterm_interrupts():
            result = a.func(a)
    except BrokenPipeError:
        raise  # stdout's reader has gone: not an error of the command (see main)
    except (ConfigError, OSError, ValueError, RuntimeError, ArithmeticError) as e:
        if a.verbose:
            traceback.print_exc()
        hint = "" if a.verbose or _raised_by_quept(e) else (
            " (raised outside quept: `quept -v COMMAND ...` prints where)")
        print(f"quept: error: {e}{hint}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"quept: error: {_missing_package(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nquept: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    if getattr(a, "json", False):
        print(json.dumps(result, indent=1))
    return 0


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Stop on SIGTERM (a scheduler's or `timeout`'s stop) as on Ctrl-C: what a command writes
    is then ended the same way (a calibration's finished blocks kept for a resume, an
    unfinished folder cleared or marked) instead of the process vanishing mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("stopped by SIGTERM")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


_PACKAGE = Path(__file__).resolve().parents[1]


def _raised_by_quept(e: BaseException) -> bool:
    """``e`` was raised by quept's own code, which words its errors for the user: it is one of
    quept's exceptions, or a ``raise`` in a quept module raised it. An error from a library
    quept calls may need its traceback to be understood: one raised in the library's Python
    code, and one raised in compiled code (torch's operators, a builtin) called from a quept
    line, whose innermost Python frame is quept's but whose statement there is a call."""
    if _is_quept_error(e):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(
            _PACKAGE):
        return False
    return any(i.offset == tb.tb_lasti and i.opname in ("RAISE_VARARGS", "RERAISE")
               for i in dis.get_instructions(tb.tb_frame.f_code))


def _is_quept_error(e: BaseException) -> bool:
    """One of quept's own exceptions (each names what is wrong and what would be right)."""
    return any(c.__module__.partition(".")[0] == "quept" for c in type(e).__mro__)


def run_script(main: Callable[[], int | None], prog: str | None = None) -> int:
    """Run a script's ``main`` (a benchmark's) with the command line's way of ending: quept's
    own errors, a missing file or a missing optional package end it with one line naming what
    is wrong (exit status 2), Ctrl-C with status 130; any other exception is a bug and keeps
    its traceback. Returns the exit status: ``main``'s own when it returns an int, else 0 (a
    benchmark's ``main`` may return its results)."""
    prog = prog or Path(sys.argv[0]).name
    try:
        status = main()
        return status if isinstance(status, int) else 0
    except ImportError as e:
        print(f"{prog}: error: {_missing_package(e)}", file=sys.stderr)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_quept_error(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
