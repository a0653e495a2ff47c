"""`quept eval` of exports (packed, compressed-tensors, ONNX) and plain folders: an encoder's
export is measured against the base model it records (or --model), options that choose among
an elastic folder's widths are refused by what the folder holds, tables show only the columns
that have values, counts of one read in the singular, and every --json result carries the same
keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quept.api import KIND_NAMES
from quept.cli import main
from quept.export.load import WeightsCheck
from quept.export.packed import PackedFormatError
from tests.conftest import tiny_model
from tests.export.tiny import TEXT, elastic_folder, hf_folder, run_json
from tests.non_llm_folders import build_folders, refused

FORMATS = {"ct": "compressed-tensors", "onnx": "onnx"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The encoder and ViT folders of :func:`build_folders`, with their W4 compressed-tensors
    (NAME-ct) and ONNX (NAME-onnx) exports."""
    root = build_folders(tmp_path_factory.mktemp("eval-exports"))
    for name in ("bert", "vit"):
        for suffix, fmt in FORMATS.items():
            assert main(["export", str(root / f"{name}-el"), "--bits", "4", "--format", fmt,
                         "--out", str(root / f"{name}-{suffix}")]) == 0
    return root


@pytest.fixture
def cache(root, monkeypatch):
    monkeypatch.setenv("QUEPT_CACHE", str(root / "cache"))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny causal LM: its float folder, an elastic folder, its packed W4 export, a text."""
    root = tmp_path_factory.mktemp("eval-exports-llm")
    base = hf_folder(root / "base")
    elastic_folder(root / "elastic", base)
    assert main(["export", str(root / "elastic"), "--bits", "4", "--out", str(root / "w4")]) == 0
    (root / "text.txt").write_text(TEXT * 4)
    return root


def _sentences(root: Path) -> list[str]:
    return ["--text", str(root / "eval.txt"), "--sentences", "6", "--json"]


@pytest.mark.parametrize("suffix", list(FORMATS))
def test_an_encoders_export_is_measured_against_the_base_model_it_records(root, capsys,
                                                                          suffix):
    folder = root / f"bert-{suffix}"
    summary = json.loads((folder / "quept-export.json").read_text())
    assert summary["source"]["base_model"] == str((root / "bert").resolve())
    elastic = run_json(capsys, ["eval", str(root / "bert-el"), "--bits", "4",
                                *_sentences(root)])["embedding_rows"][0]
    recorded = run_json(capsys, ["eval", str(folder), *_sentences(root)])
    (row,) = recorded["embedding_rows"]
    assert row["bits"] == 4 and recorded["sentences"] == 6
    assert row["cosine_mean"] == pytest.approx(elastic["cosine_mean"], abs=2e-3)
    named = run_json(capsys, ["eval", str(folder), "--model", str(root / "bert"),
                              *_sentences(root)])
    assert named["embedding_rows"] == recorded["embedding_rows"]
    assert main(["eval", str(folder), "--text", str(root / "eval.txt"), "--sentences", "6"]) == 0
    assert f"W4 {'ONNX' if suffix == 'onnx' else 'compressed-tensors'}, " in (
        capsys.readouterr().out)


@pytest.mark.parametrize("suffix", list(FORMATS))
def test_an_export_written_before_the_record_takes_its_base_model_from_model(
        root, tmp_path, capsys, suffix):
    import shutil

    folder = tmp_path / f"bert-{suffix}"
    shutil.copytree(root / f"bert-{suffix}", folder)
    summary = json.loads((folder / "quept-export.json").read_text())
    del summary["source"]
    (folder / "quept-export.json").write_text(json.dumps(summary))
    refused(capsys, ["eval", str(folder), *_sentences(root)],
            f"{folder} records no base model", "pass --model with the float encoder")
    res = run_json(capsys, ["eval", str(folder), "--model", str(root / "bert"),
                            *_sentences(root)])
    assert 0 < res["embedding_rows"][0]["cosine_mean"] <= 1
    refused(capsys, ["eval", str(folder), "--model", str(root / "vit"), *_sentences(root)],
            f"--model {root / 'vit'} has model_type 'vit', but {folder} holds a model of "
            "model_type 'bert'")


def test_model_is_refused_for_an_export_of_another_model_than_an_encoder(root, cache, capsys):
    for suffix in ("w4", "ct", "onnx"):
        refused(capsys, ["eval", str(root / f"vit-{suffix}"), "--images", "8", "--model",
                         str(root / "vit")], "which needs no base model: --model names the float "
                "encoder an encoder's export is compared with")


@pytest.mark.parametrize("option", [["--rtn"], ["--plan", "*=3"], ["--bits", "4"]],
                         ids=["rtn", "plan", "bits"])
@pytest.mark.parametrize("suffix, kind", [("", "hf"), ("-w4", "packed"),
                                          ("-ct", "compressed-tensors"), ("-onnx", "onnx")])
@pytest.mark.parametrize("model", ["bert", "vit"])
def test_width_options_are_refused_naming_what_a_folder_of_one_configuration_holds(
        root, cache, capsys, option, suffix, kind, model):
    folder = root / f"{model}{suffix}"
    measure = _sentences(root) if model == "bert" else ["--images", "8"]
    refused(capsys, ["eval", str(folder), *option, *measure],
            f"{folder} holds {KIND_NAMES[kind]}", f"{option[0]} applies to the widths of an "
            "elastic folder (`quept quantize`) or compact checkpoint (`quept compact`)")


def test_rtn_is_refused_for_a_plain_causal_lm(llm, capsys):
    refused(capsys, ["eval", str(llm / "base"), "--rtn", "--text", str(llm / "text.txt"),
                     "--seq-len", "32", "--windows", "1"],
            f"{llm / 'base'} holds a Hugging Face model (float weights): --rtn applies")


def test_plans_measured_with_packed_layers_say_so_and_one_window_is_singular(llm, capsys):
    ev = ["--text", str(llm / "text.txt"), "--seq-len", "32", "--windows", "1"]
    assert main(["eval", str(llm / "elastic"), "--plan", "*=3", "--packed", *ev]) == 0
    out = capsys.readouterr().out
    assert "plan *=3 (packed layers): perplexity " in out and "(1 window x 32 tokens)" in out
    assert main(["eval", str(llm / "elastic"), "--plan", "*=3", "--plan", "*=4", "--packed",
                 "--bits", "2", *ev]) == 0
    out = capsys.readouterr().out
    assert "Plans (packed layers), perplexity on 1 window x 32 tokens" in out
    assert f"Perplexity of {llm / 'elastic'} (packed layers) (1 window x 32 tokens)" in out
    assert main(["eval", str(llm / "w4"), *ev]) == 0
    assert "(1 window x 32 tokens): W4 packed" in capsys.readouterr().out


def test_a_block_count_of_one_is_singular():
    net = tiny_model()  # two blocks
    held = [n for n in net.state_dict() if not n.startswith("model.layers.1.")]
    with pytest.raises(PackedFormatError, match=r"the weights of 1 block \(model\.layers\.\*\)"):
        WeightsCheck(Path("config.json"), "w.safetensors", "quept export").block_count(net, held)


@pytest.mark.parametrize("folder, empty", [
    ("vit-ct", "RTN top-1"), ("vit-onnx", "RTN top-1"), ("vit-el", "RTN top-1"),
    ("bert-el", "RTN cosine")])
def test_a_column_without_values_is_left_out(root, cache, capsys, folder, empty):
    options = (["--images", "1"] if folder.startswith("vit") else
               ["--text", str(root / "eval.txt"), "--sentences", "6"])
    widths = ["--bits", "4"] if folder.endswith("-el") else []
    assert main(["eval", str(root / folder), *widths, *options]) == 0
    out = capsys.readouterr().out
    assert empty not in out and "bits/weight stored" in out
    if folder.startswith("vit"):
        assert "(1 image)" in out
    if widths:  # measured, the column is there
        assert main(["eval", str(root / folder), *widths, "--rtn", *options]) == 0
        assert empty in capsys.readouterr().out


def _keys(result: dict) -> tuple[set[str], set[str]]:
    """The top-level keys of an eval result, and those of its rows."""
    rows = next(v for k, v in result.items() if k.endswith("rows"))
    return set(result), {k for r in rows for k in r}


def test_every_eval_json_carries_the_same_keys(root, llm, cache, capsys):
    ev = ["--text", str(llm / "text.txt"), "--seq-len", "32", "--windows", "1", "--json"]
    perplexity = [_keys(run_json(capsys, ["eval", str(llm / name), *ev]))
                  for name in ("base", "elastic", "w4")]
    perplexity.append(_keys(run_json(capsys, ["eval", str(llm / "elastic"), "--bits", "4",
                                              "--packed", *ev])))
    images = [_keys(run_json(capsys, ["eval", str(root / name), "--images", "8", "--json"]))
              for name in ("vit", "vit-el", "vit-w4", "vit-c", "vit-ct", "vit-onnx")]
    encoders = [_keys(run_json(capsys, ["eval", str(root / name), *_sentences(root)]))
                for name in ("bert-el", "bert-w4", "bert-c", "bert-ct", "bert-onnx")]
    for measured in (perplexity, images, encoders):
        assert all(keys == measured[0] for keys in measured), measured
        assert {"folder", "elastic", "packed", "calibration_overlap", "float_is"} <= (
            measured[0][0])
    packed = run_json(capsys, ["eval", str(llm / "w4"), *ev])
    assert packed["elastic"] is False and packed["packed"] is True
    assert packed["rows"][0]["ppl_rtn"] is None
