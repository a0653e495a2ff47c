"""quept.cli.run_script: a benchmark ends on bad input as the CLI does, with one line naming
what is wrong; a bug keeps its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from quept import api
from quept.cli import run_script
from quept.config import ConfigError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quept_errors_and_missing_files_end_with_one_line(tmp_path, capsys):
    def bad_folder():
        api.read_meta(tmp_path / "nowhere")

    def bad_config():
        raise ConfigError("--bits: bit-width 9 is outside 2..8")

    def missing_file():
        (tmp_path / "missing.txt").read_text()

    assert run_script(bad_folder, "bench.py") == 2
    assert capsys.readouterr().err == (f"bench.py: error: {tmp_path / 'nowhere'} is not a quept "
                                       "elastic folder (no quept.json); make one with `quept "
                                       "quantize --out FOLDER`\n")
    assert run_script(bad_config, "bench.py") == 2
    assert capsys.readouterr().err == "bench.py: error: --bits: bit-width 9 is outside 2..8\n"
    assert run_script(missing_file, "bench.py") == 2
    assert "missing.txt" in capsys.readouterr().err


def test_a_missing_peer_package_names_its_extra(capsys):
    def needs_hqq():
        raise ModuleNotFoundError("No module named 'hqq'", name="hqq")

    assert run_script(needs_hqq, "peers.py") == 2
    assert capsys.readouterr().err == ("peers.py: error: this needs the hqq package, which is "
                                       "not installed: pip install 'quept[peers]'\n")


def test_a_bug_keeps_its_traceback_and_a_status_is_passed_on():
    def bug():
        raise ValueError("not one of quept's errors")

    with pytest.raises(ValueError, match="not one of quept's errors"):
        run_script(bug, "bench.py")
    assert run_script(lambda: 3, "bench.py") == 3
    assert run_script(lambda: None, "bench.py") == 0
    assert run_script(lambda: {"rows": []}, "bench.py") == 0  # a main returning its results


@pytest.mark.parametrize("script, extra", [("mixed_precision.py", []),
                                           ("replay_block.py", ["--block", "0"])])
def test_a_benchmark_given_no_elastic_folder_says_so(script, extra, tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--elastic",
                          str(tmp_path / "nowhere"), *extra],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"{script}: error: {tmp_path / 'nowhere'} is not a quept elastic folder (no quept.json); "
        "make one with `quept quantize --out FOLDER`")


def test_the_cli_points_to_the_traceback_of_an_error_raised_outside_quept(tmp_path, capsys,
                                                                         monkeypatch):
    """quept's own errors are worded for the user; one from a library it calls (torch here)
    is shown with a pointer to -v, which prints the traceback."""
    import torch

    from quept.cli import main, run

    monkeypatch.setattr(run, "describe", lambda path: torch.zeros(2) @ torch.zeros(3))
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quept: error: ") and "Traceback" not in err
    assert err.endswith(" (raised outside quept: `quept -v COMMAND ...` prints where)\n")
    assert main(["-v", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raised outside quept" not in err
    monkeypatch.undo()
    assert main(["info", str(tmp_path / "nowhere")]) == 2  # raised by quept: no pointer
    assert "raised outside quept" not in capsys.readouterr().err


def test_version_and_threads_options(capsys):
    import quept
    from quept.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"quept {quept.__version__} (torch ")
    with pytest.raises(SystemExit) as refused:  # torch.set_num_threads(0) used to be skipped
        main(["--threads", "0", "info", "."])
    assert refused.value.code == 2
    assert "argument --threads: expected a positive count, got '0'" in capsys.readouterr().err
