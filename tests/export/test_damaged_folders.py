"""A model folder with a damaged file is refused by the command line with the file or folder
named (exit 2 and a last line on stderr that says so), never with a raw library error or a traceback: a plain
HF folder's config, weights or tokenizer, a packed folder's tokenizer, a compressed-tensors
folder's weights, an ONNX export's graph or summary."""

from __future__ import annotations

import re
import shutil

import pytest

from quept.cli import main

from .tiny import TEXT, elastic_folder, hf_folder

JUNK = b"\x00junk"
NOT_A_TOKENIZER = b'{"format": 3}'  # valid JSON, but not what a tokenizer file holds


NEEDS = {"ct": ("compressed_tensors",), "onnx": ("onnxscript", "onnxruntime")}
FORMAT = {"packed": [], "ct": ["--format", "compressed-tensors"], "onnx": ["--format", "onnx"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder holding a tiny HF model folder ("base") and a calibration text; the exports of
    its elastic folder are made there on first use."""
    root = tmp_path_factory.mktemp("damaged")
    elastic_folder(root / "elastic", hf_folder(root / "base"))
    (root / "t.txt").write_text(TEXT * 4)
    return root


def made(root, kind):
    for module in NEEDS.get(kind, ()):
        pytest.importorskip(module)
    if not (root / kind).exists():
        assert main(["export", str(root / "elastic"), "--bits", "3", "--out", str(root / kind),
                     *FORMAT[kind]]) == 0
    return root / kind


@pytest.mark.parametrize("kind, name, damage, says", [
    ("base", "config.json", JUNK, "config.json is not valid JSON"),
    ("base", "model.safetensors", JUNK, "the weights in .* cannot be read"),
    ("base", "tokenizer.json", NOT_A_TOKENIZER, "the tokenizer in .* cannot be loaded"),
    ("packed", "tokenizer.json", NOT_A_TOKENIZER, "the tokenizer in .* cannot be loaded"),
    ("ct", "model.safetensors", JUNK, "model.safetensors cannot be read"),
    ("onnx", "model.onnx", JUNK, "model.onnx cannot be loaded by ONNX Runtime"),
    ("onnx", "quept-export.json", JUNK, "quept-export.json is not valid JSON"),
    ("onnx", "quept-export.json", b'{"format": "onnx"}', "names no task quept runs"),
])
def test_a_damaged_file_is_named_by_eval_and_run(root, capsys, kind, name, damage, says):
    folder, text = root / f"{kind}-{name}", root / "t.txt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(made(root, kind), folder)
    (folder / name).write_bytes(damage)
    capsys.readouterr()
    for argv in (["eval", str(folder), "--text", str(text), "--windows", "1", "--seq-len", "16"],
                 ["run", str(folder), "--prompt", "It is", "--max-new-tokens", "2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after any loading bar of transformers'
        assert last.startswith("quept: error: ") and "Traceback" not in err, err
        assert re.search(says, err), err
