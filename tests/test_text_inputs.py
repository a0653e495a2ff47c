"""Text files as the command line and :func:`quept.data.load_texts` read them (pipes read once,
a byte-order mark dropped, .json refused, an unreadable path named as such), the calibration
samples drawn from a text, and `quept plan`'s check samples."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

import quept
from quept.checks import ConfigError
from quept.cli import main
from quept.config import CalibConfig
from quept.data import load_texts
from quept.data.tokens import calibration_samples
from tests.export.tiny import TEXT, char_tokenizer, elastic_folder, hf_folder


@pytest.fixture
def pipe():
    """A function that writes a text into a pipe and returns its /dev/fd path, as a shell's
    ``<(cat FILE)`` gives it; the pipe is closed after the test."""
    ends = []

    def make(text: str) -> str:
        r, w = os.pipe()
        os.write(w, text.encode())  # the tests' texts fit the pipe's buffer
        os.close(w)
        ends.append(r)
        return f"/dev/fd/{r}"

    yield make
    for r in ends:
        os.close(r)


def test_a_pipe_is_read_as_a_text_once(pipe, tmp_path, capsys):
    assert load_texts([pipe("from a pipe\n")]) == "from a pipe\n"
    base = hf_folder(tmp_path / "base")  # the command reads it once, though it checks it first
    assert main(["eval", str(base), "--text", pipe(TEXT * 8), "--windows", "1", "--seq-len",
                 "32", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["windows"] == 1


def test_a_path_that_exists_but_cannot_be_read_is_named_as_such(tmp_path):
    path = tmp_path / "socket.txt"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(OSError, match="socket.txt' exists but cannot be read"):
            load_texts([path])


@pytest.mark.parametrize("name, content, text", [
    ("bom.txt", "plain text\n", "plain text\n"),
    ("bom.jsonl", '{"text": "a record"}\n', "a record"),
])
def test_a_leading_byte_order_mark_is_no_text(tmp_path, name, content, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert load_texts([path]) == text


def test_a_json_file_is_refused_rather_than_read_brackets_and_all(tmp_path, capsys):
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(["one text", "another"]))
    with pytest.raises(ValueError, match=r"texts.json' is a .json file.*text files are .txt "
                       r"\(plain text\) or .jsonl \(one \{\"text\": ...\} object per line\)"):
        load_texts([path])
    assert main(["eval", str(hf_folder(tmp_path / "base")), "--text", str(path)]) == 2
    assert "is a .json file" in capsys.readouterr().err


def test_samples_that_must_repeat_a_window_are_refused():
    tok = char_tokenizer()
    text = "".join(chr(33 + i) for i in range(33))  # 33 tokens: windows of 32 start at 1 place
    with pytest.raises(ConfigError, match="4 calibration windows of 32 tokens from a text of 33 "
                       r"tokens: the text holds only 1 distinct window\(s\) of that length .* at "
                       "least 3 would repeat another exactly; ask for 1 or fewer windows"):
        quept.samples_from_text(tok, text, CalibConfig(n_samples=4, seq_len=32, batch_size=1))
    ids = torch.arange(40)
    assert calibration_samples(ids, 8, 32, seed=0).shape == (8, 32)  # 8 places: allowed
    with pytest.raises(ConfigError, match="only 8 distinct window"):
        calibration_samples(ids, 9, 32, seed=0)


def test_check_samples_beyond_the_samples_are_refused_before_the_model_loads(tmp_path,
                                                                            monkeypatch, capsys):
    folder = elastic_folder(tmp_path / "el", hf_folder(tmp_path / "base"))

    def load(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(quept.api, "load", load)
    assert main(["plan", str(folder), "--avg-bits", "4", "--samples", "2", "--check-samples",
                 "5", "--out", str(tmp_path / "p.json")]) == 2
    assert ("quept: error: --check-samples 5 is more than the 2 inputs the sensitivity is "
            "measured on (--samples)") in capsys.readouterr().err
