"""Hub texts and hub model ids, read through the real `datasets` and `huggingface_hub` calls
from local folders laid out as the hub repositories are (no hub is reachable in tests)."""

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import pytest

import quept
from quept.config import CalibConfig, QuEPTConfig
from quept.data import hub, load_texts
from quept.data.fetch import DataUnavailableError
from quept.nn import elastic_layers
from tests.export.tiny import SPEC, char_tokenizer, elastic_folder, hf_folder, run_json

pytest.importorskip("datasets")

@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A fresh datasets cache per test: datasets keys a local folder's cache on its name and
    config, not on its files, so folders of one name in two tests would share one."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


TRAIN = [f"= Train article {i} =\n the train text number {i} ." for i in range(6)]
TEST = [f" the test line {i} ." for i in range(5)]


@pytest.fixture
def wikitext(tmp_path, monkeypatch):
    """A local copy of the Salesforce/wikitext layout (one parquet file per split, the
    configs in the README's YAML) standing in for the repo."""
    import datasets

    root = tmp_path / "wikitext"
    cfg = root / "wikitext-2-raw-v1"
    cfg.mkdir(parents=True)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        datasets.Dataset.from_dict({"text": rows}).to_parquet(
            cfg / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n---\n")
    monkeypatch.setitem(hub.DATASETS, "wikitext2",
                        dataclasses.replace(hub.DATASETS["wikitext2"], repo=str(root)))
    return root


@pytest.fixture
def c4(tmp_path, monkeypatch):
    """A local copy of the allenai/c4 layout: gzipped JSON lines under en/."""
    root = tmp_path / "c4"
    (root / "en").mkdir(parents=True)
    source = hub.DATASETS["c4"]
    for split, n in (("train", 40), ("validation", 8)):
        with gzip.open(root / source.data_files[split], "wt") as fh:
            for i in range(n):
                fh.write(json.dumps({"text": f"{split} document {i}.", "url": "u"}) + "\n")
    monkeypatch.setitem(hub.DATASETS, "c4", dataclasses.replace(
        source, repo=str(root), max_docs={"eval": 5}))
    return root


def test_wikitext2_reads_train_for_calibration_and_test_for_evaluation(wikitext):
    assert hub.hub_text("wikitext2", "calib") == "\n\n".join(TRAIN)
    assert hub.hub_text("wikitext2", "eval") == "\n\n".join(TEST)
    assert load_texts(["wikitext2"], role="eval") == "\n\n".join(TEST)


def test_c4_evaluation_is_the_first_documents_and_calibration_a_seeded_draw(c4, monkeypatch):
    assert hub.hub_text("c4", "eval") == " ".join(f"validation document {i}." for i in range(5))
    monkeypatch.setattr(hub, "CALIB_CHARS", 100)  # about six of the 40 training documents
    calib = hub.hub_text("c4", "calib", seed=0)
    docs = calib.split("\n\n")
    assert 5 <= len(docs) < 40 and sum(map(len, docs)) >= 100
    assert all(d.startswith("train document ") for d in docs)
    assert docs != [f"train document {i}." for i in range(len(docs))]  # not the file's order
    assert hub.hub_text("c4", "calib", seed=0) == calib
    assert hub.hub_text("c4", "calib", seed=1) != calib


def test_generic_names_fall_back_from_test_to_validation(tmp_path, monkeypatch):
    import datasets

    root = tmp_path / "owner-data"
    root.mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_json(root / "train.jsonl")
    datasets.Dataset.from_dict({"text": ["c", "d"]}).to_json(root / "validation.jsonl")
    datasets.Dataset.from_dict({"body": ["e"]}).to_json(root / "test.jsonl")
    real = datasets.load_dataset
    calls = []

    def local(repo, config=None, **kw):  # the repo id, answered from the local folder
        calls.append((repo, config, kw["split"]))
        files = {s: str(root / f"{s}.jsonl") for s in ("train", "validation")}
        return real("json", data_files=files, split=kw["split"])

    monkeypatch.setattr(datasets, "load_dataset", local)
    assert hub.hub_text("hf:owner/data", "calib") == "a\n\nb"
    assert hub.hub_text("hf:owner/data", "eval") == "c\n\nd"  # no test split: validation
    assert calls[-2:] == [("owner/data", None, "test"), ("owner/data", None, "validation")]
    assert hub.hub_text("hf:owner/data:cfg@train", "eval") == "a\n\nb"
    assert calls[-1] == ("owner/data", "cfg", "train")


def test_a_missing_text_column_and_bad_names_are_named(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "t.jsonl"
    datasets.Dataset.from_dict({"body": ["e"]}).to_json(path)
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda repo, config=None, **kw: real("json", data_files=str(path),
                                                             split="train"))
    with pytest.raises(ValueError, match="has no 'text' column; it has body"):
        hub.hub_text("hf:owner/data", "calib")
    for bad in ("hf:nothing", "hf:a/b@", "hf:/x"):
        with pytest.raises(ValueError, match="expected hf:OWNER/NAME"):
            hub.parse_hub_text(bad)
    with pytest.raises(ValueError, match="role must be one of"):
        hub.hub_text("wikitext2", "train")


def test_offline_hub_texts_fail_with_what_to_do_instead():
    with pytest.raises(DataUnavailableError, match="allenai/c4.*pass text files instead"):
        hub.hub_text("c4", "eval")  # HF_HUB_OFFLINE=1 in tests, nothing cached


def test_a_file_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c4").write_text("my own text")
    assert load_texts(["c4"]) == "my own text"
    with pytest.raises(FileNotFoundError, match="hub texts wikitext2, c4"):
        load_texts(["missing.txt"])


def test_eval_and_quantize_take_hub_texts(wikitext, tmp_path, capsys, monkeypatch):
    shard = hub.DATASETS["wikitext2"]
    long_test = [f"line {i} of the test split." for i in range(40)]
    import datasets

    datasets.Dataset.from_dict({"text": long_test}).to_parquet(
        Path(shard.repo) / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    base = hf_folder(tmp_path / "base")
    elastic = elastic_folder(tmp_path / "elastic", base)
    res = run_json(capsys, ["eval", str(elastic), "--bits", "4", "--text", "wikitext2",
                            "--windows", "all", "--seq-len", "64", "--json"])
    n_tokens = len(char_tokenizer()("\n\n".join(long_test))["input_ids"])
    assert res["windows"] == n_tokens // 64 > 8 and res["seq_len"] == 64
    assert [r["bits"] for r in res["rows"]] == [None, 4]
    res = run_json(capsys, ["quantize", "--model", str(base), "--out", str(tmp_path / "q"),
                            "--calib-text", "wikitext2", "--eval-text", "wikitext2",
                            "--samples", "2", "--seq-len", "16", "--batch-size", "2",
                            "--ranks", "2,2,2,2", "--group-size", "32", "--eval-bits", "4",
                            "--eval-windows", "3", "--eval-seq-len", "32", "--json"])
    assert res["windows"] == 3 and res["seq_len"] == 32
    meta = quept.api.read_meta(tmp_path / "q")
    assert meta["evaluation"]["data"] == "3 windows x 32 tokens of wikitext2"


def test_eval_options_for_real_sizes_are_checked(tmp_path, capsys, monkeypatch):
    from quept.cli import main

    base = hf_folder(tmp_path / "base")
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            main(["eval", str(base), "--windows", bad])
        assert "positive number of windows or 'all'" in capsys.readouterr().err
    for argv in (["eval", str(base), "--seq-len", "1"],
                 ["quantize", "--model", str(base), "--eval-seq-len", "0"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "expected at least 2 tokens per window, got" in capsys.readouterr().err
    for flag, count in (("--eval-windows", "a positive count"),
                        ("--eval-sentences", "at least 2 sentences"),
                        ("--eval-images", "a positive count")):
        with pytest.raises(SystemExit):
            main(["quantize", "--model", str(base), flag, "-1"])
        err = capsys.readouterr().err
        assert f"expected 0 (skip) or {count}" in err and "got '-1'" in err
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    for argv, says in ((["eval", str(base), "--sentences", "5"], "--sentences applies to an "
                        "encoder; the model is a causal LM"),
                       (["eval", str(base), "--images", "5"], "--images applies to an image "
                        "classifier"),
                       (["quantize", "--model", str(base), "--out", str(tmp_path / "q"),
                         "--calib-text", str(text), "--eval-images", "5"],
                        "--eval-images applies to an image classifier")):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err
    assert not (tmp_path / "q" / "quept.json").exists()  # refused before the calibration
    elastic = elastic_folder(tmp_path / "elastic", base)
    monkeypatch.setattr("quept.cli.evaluate.check_device", lambda device, what: device)
    assert main(["eval", str(elastic), "--packed", "--device", "cuda"]) == 2  # as if present
    assert "packed layers and ONNX models run on the CPU" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_the_gpu_gives_the_cpu_perplexity(tmp_path, capsys):
    base = hf_folder(tmp_path / "base")
    elastic = elastic_folder(tmp_path / "elastic", base)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    args = ["eval", str(elastic), "--bits", "3,4", "--text", str(text), "--seq-len", "64",
            "--windows", "all", "--json"]
    cpu = run_json(capsys, args)
    gpu = run_json(capsys, [*args, "--device", "cuda"])
    for a, b in zip(cpu["rows"], gpu["rows"]):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-3)


def test_hub_model_ids_load_safetensors_only(tmp_path, monkeypatch):
    import huggingface_hub

    folder = hf_folder(tmp_path / "snapshot")
    asked = {}

    def snapshot(repo_id, revision=None, allow_patterns=None):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model, tok = quept.load_model("owner/tiny-llama")
    assert asked["repo_id"] == "owner/tiny-llama" and model.quept_source == "owner/tiny-llama"
    assert "*.safetensors" in asked["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))
                   for p in asked["allow_patterns"])
    assert tok("ab")["input_ids"] == [ord("a") - 30, ord("b") - 30]
    quept.prepare(model, SPEC)
    quept.save(model, tmp_path / "elastic", QuEPTConfig(spec=SPEC, calib=CalibConfig()))
    asked.clear()
    again, _ = quept.load(tmp_path / "elastic")  # the base model found again by its id
    assert asked["repo_id"] == "owner/tiny-llama"
    assert sorted(elastic_layers(again)) == sorted(elastic_layers(model))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DataUnavailableError, match="no safetensors weights"):
        quept.load_model("owner/tiny-llama")


def test_offline_hub_model_ids_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataUnavailableError, match="nobody/none is not a local folder"):
        quept.load_model("nobody/none")
    Path("nobody/none").mkdir(parents=True)  # a local folder of that name is read as one
    with pytest.raises(quept.ArtifactError, match="nobody/none holds no model: .* or "
                                                 "config.json"):
        quept.load_model("nobody/none")
    shutil.rmtree("nobody")
