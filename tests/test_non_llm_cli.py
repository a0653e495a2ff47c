"""Encoders and image classifiers on the command line: the perplexity options of `quept eval`
(--windows, --seq-len, --packed) and `quept quantize --seq-len` are refused for them, and
`quept info` describes their folders without tokens, a packed head, a KV cache or `quept run`."""

from __future__ import annotations

import pytest

import quept
from quept.cli import main
from tests.non_llm_folders import build_folders
from tests.non_llm_folders import refused as _refused


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An elastic (random) encoder and ViT, each with its packed W4 export and compact
    checkpoint, Fashion-MNIST-shaped images in a cache, and an evaluation text."""
    return build_folders(tmp_path_factory.mktemp("non-llm"))


@pytest.fixture
def cache(root, monkeypatch):
    monkeypatch.setenv("QUEPT_CACHE", str(root / "cache"))


@pytest.mark.parametrize("option", [["--windows", "3"], ["--windows", "all"],
                                    ["--seq-len", "2048"]])
def test_eval_refuses_perplexity_windows_for_an_encoder(root, capsys, option):
    text = ["--text", str(root / "eval.txt"), "--sentences", "12"]
    words = f"{option[0]} applies to a causal LM; the model is an encoder"
    _refused(capsys, ["eval", str(root / "bert-el"), "--bits", "4", *text, *option], words)
    _refused(capsys, ["eval", str(root / "bert-w4"), *text, *option], words)
    _refused(capsys, ["eval", str(root / "bert-c"), "--bits", "4", *text, *option], words)


@pytest.mark.parametrize("option", [["--windows", "3"], ["--seq-len", "64"]])
def test_eval_refuses_perplexity_windows_for_an_image_classifier(root, cache, capsys, option):
    words = f"{option[0]} applies to a causal LM; the model is an image classifier"
    _refused(capsys, ["eval", str(root / "vit-el"), "--bits", "4", "--images", "40", *option],
             words)
    _refused(capsys, ["eval", str(root / "vit-w4"), "--images", "40", *option], words)


def test_quantize_refuses_seq_len_for_an_image_classifier(root, cache, tmp_path, capsys):
    _refused(capsys, ["quantize", "--model", str(root / "vit"), "--out", str(tmp_path / "o"),
                      "--samples", "32", "--group-size", "32", "--ranks", "2,2,2,2",
                      "--eval-images", "0", "--seq-len", "64"],
             "--seq-len: text options, but the model is an image classifier")
    assert not (tmp_path / "o" / "quept.json").exists()


@pytest.mark.parametrize("name, what", [("bert", "an encoder (bert)"),
                                        ("vit", "an image classifier (vit)")])
def test_eval_packed_of_an_encoder_or_image_classifier_points_to_an_export(
        root, capsys, monkeypatch, name, what):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --packed was refused")

    monkeypatch.setattr(quept.api, "load_switchable", no_load)
    for folder in (root / f"{name}-el", root / f"{name}-c"):
        err = _refused(capsys, ["eval", str(folder), "--bits", "4", "--packed"],
                       "--packed measures a causal LM's perplexity with packed layers; "
                       f"{folder} holds {what}",
                       f"`quept export {folder} --bits 4 --out DIR`", "`quept eval DIR`")
        assert "vocabulary" not in err


def test_info_counts_an_image_classifiers_calibration_in_images(root, cache, tmp_path, capsys):
    assert main(["quantize", "--model", str(root / "vit"), "--out", str(tmp_path / "el"),
                 "--samples", "32", "--group-size", "32", "--ranks", "2,2,2,2", "--epochs", "1",
                 "--eval-images", "0"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "el")]) == 0
    shown = capsys.readouterr().out
    assert "calibrated on 32 Fashion-MNIST training images, 1 epoch" in shown
    assert "tokens" not in shown
    assert main(["info", str(root / "vit-el")]) == 0  # saved through the API: images of its own
    shown = capsys.readouterr().out
    assert "calibrated on 32 images, " in shown and "tokens" not in shown


def test_info_of_packed_and_compact_folders_says_only_what_applies(root, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(root / "bert-el"), "--bits", "3", "--out",
                 str(tmp_path / "bert-w3")]) == 0
    assert "packed head" not in capsys.readouterr().out  # none is packed
    for name in ("bert", "vit"):
        assert main(["info", str(root / f"{name}-w4")]) == 0
        shown = capsys.readouterr().out
        assert "packed head" not in shown and "KV cache" not in shown, shown
        assert "\nweight-only\n" in shown
        assert main(["info", str(root / f"{name}-c")]) == 0
        shown = capsys.readouterr().out
        assert "quept run" not in shown and "what `quept export` materialises from it:" in shown
    from tests.export.tiny import elastic_folder, hf_folder

    elastic = elastic_folder(tmp_path / "el", hf_folder(tmp_path / "base"))  # a causal LM
    assert main(["export", str(elastic), "--bits", "4", "--out", str(tmp_path / "w4")]) == 0
    assert main(["compact", str(elastic), "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "w4")]) == 0
    assert "\nweight-only; float KV cache\n" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "c")]) == 0
    assert f"`quept run {tmp_path / 'c'} --bits 4,3,2` runs these packed" in capsys.readouterr().out


def test_tasks_refuse_the_perplexity_window_options(tmp_path, capsys):
    """--tasks scores each task's own items: --windows and --seq-len would be ignored there."""
    from tests.export.tiny import elastic_folder, hf_folder

    folder = elastic_folder(tmp_path / "el", hf_folder(tmp_path / "base"))
    for extra in (["--windows", "4"], ["--seq-len", "64"], ["--windows", "all"]):
        assert main(["eval", str(folder), "--tasks", "last-word", "--bits", "4", *extra]) == 2
        err = capsys.readouterr().err
        assert f"{extra[0]} set perplexity windows; --tasks scores each task's own items" in err
