"""A folder or plan of the wrong kind is named by what it holds, never blamed on the options:
`quept plan` names a non-elastic folder as the other commands do; --model refuses quept's own
folders (and one whose JSON was deleted) as base models; a packed folder or compact checkpoint
without its config.json is named damaged; a folder whose quept.json is another model's is named
mixed up before --images or --sentences are checked against it; a plan made for another model
says so."""

from __future__ import annotations

import json
import shutil

import pytest

import quept
from quept.api import ArtifactError, resolve_model_dir
from quept.checks import ConfigError
from quept.cli import main
from quept.nn import elastic_layers
from quept.nn.switch import plan_widths
from quept.outputs import UNFINISHED
from tests.non_llm_folders import build_folders
from tests.non_llm_folders import refused as _refused
from tests.test_encoder import SPEC


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny (random) elastic encoder and ViT with their packed W4 exports and compact
    checkpoints, Fashion-MNIST-shaped images in a cache, and a text."""
    return build_folders(tmp_path_factory.mktemp("reader-messages"))


@pytest.fixture
def cache(root, monkeypatch):
    monkeypatch.setenv("QUEPT_CACHE", str(root / "cache"))


def _copy(root, name: str, to: str, *drop: str):
    """A copy of the folder ``name`` as ``to``, without the files ``drop``."""
    folder = root / to
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / name, folder)
    for f in drop:
        (folder / f).unlink()
    return folder


def test_plan_names_a_non_elastic_folder_by_what_it_holds(root, cache, tmp_path, capsys):
    ckpt = tmp_path / "int"  # a calibration stopped before its folder was written
    (ckpt / ".calib-checkpoint").mkdir(parents=True)
    (ckpt / ".calib-checkpoint" / "progress.json").write_text("{}")
    out = tmp_path / "p.json"
    for folder, says in ((ckpt, "holds an unfinished calibration"),
                         (root / "vit-w4", "holds a packed model"),
                         (root / "vit-c", "holds a compact checkpoint"),
                         (root / "vit", "holds a Hugging Face model")):
        err = _refused(capsys, ["plan", str(folder), "--avg-bits", "3.5", "--out", str(out)],
                       says)
        assert "no quept.json" not in err, err
    assert not out.exists()


def test_model_refuses_quept_folders_as_a_base_model(root, cache, tmp_path, capsys):
    marked = _copy(root, "vit", "vit-unfinished")
    (marked / UNFINISHED).write_text("a packed model")
    for folder, says in ((root / "vit-w4", "holds a packed model written by quept"),
                         (root / "vit-c", "holds a compact checkpoint written by quept"),
                         (marked, "holds a packed model whose writing was stopped")):
        with pytest.raises(ArtifactError, match="pass a Hugging Face model folder") as e:
            resolve_model_dir(folder)
        assert says in str(e.value)
        err = _refused(capsys, ["quantize", "--model", str(folder), "--out",
                                str(tmp_path / "o"), "--eval-images", "0"], says)
        assert "model.safetensors" not in err, err
    assert not (tmp_path / "o" / "quept.json").exists()


@pytest.mark.parametrize("name, drop, says", [
    ("vit-w4", "quept-packed.json", "holds the weights of a packed model but no "
     "quept-packed.json"),
    ("vit-c", "quept-compact.json", "holds the weights of a compact checkpoint but no "
     "quept-compact.json"),
])
def test_a_quept_folder_without_its_json_is_damaged_not_a_hf_folder(root, cache, capsys, name,
                                                                     drop, says):
    folder = _copy(root, name, f"{name}-no-json", drop)  # config.json is still there
    with pytest.raises(ArtifactError, match="is a damaged quept folder, not a Hugging Face"):
        resolve_model_dir(folder)
    _refused(capsys, ["eval", str(folder), "--images", "40"], says)
    resolve_model_dir(root / "vit")  # a real one, with model.safetensors, is read


@pytest.mark.parametrize("name, holds, again", [
    ("vit-w4", "a packed model", "quept export"),
    ("vit-c", "a compact checkpoint", "quept compact"),
])
def test_a_folder_without_its_config_json_is_named_damaged(root, cache, tmp_path, capsys, name,
                                                           holds, again):
    folder = _copy(root, name, f"{name}-no-config", "config.json")
    says = (f"{folder} is damaged: it holds {holds} but no config.json", f"`{again}`")
    _refused(capsys, ["eval", str(folder), *(["--bits", "4"] if name == "vit-c" else [])],
             *says)
    if name == "vit-c":
        _refused(capsys, ["export", str(folder), "--bits", "4", "--out", str(tmp_path / "w")],
                 *says)
        assert not (tmp_path / "w").exists()
        from quept.export.packed import PackedFormatError

        for load in (quept.api.load_compact, lambda f: quept.api.load_switchable(f, 4)):
            with pytest.raises(PackedFormatError, match="it holds a compact checkpoint but no "
                               "config.json"):
                load(folder)
    else:
        from quept.export.load import load_packed
        from quept.export.packed import PackedFormatError

        with pytest.raises(PackedFormatError, match="is damaged: it holds a packed model but "
                           "no config.json"):
            load_packed(folder)


def test_another_models_quept_json_is_named_before_the_options(root, cache, capsys):
    vit = _copy(root, "vit-el", "vit-mixed")  # a ViT's adapters, an encoder's quept.json
    shutil.copy(root / "bert-el" / "quept.json", vit / "quept.json")
    bert = _copy(root, "bert-el", "bert-mixed")
    shutil.copy(root / "vit-el" / "quept.json", bert / "quept.json")
    says = "which quept.json lists: the folder is damaged or mixed up"
    text = str(root / "eval.txt")
    for argv in (["eval", str(vit), "--bits", "4", "--images", "40"],
                 ["eval", str(bert), "--bits", "4", "--text", text, "--sentences", "8"],
                 ["plan", str(bert), "--avg-bits", "3.5", "--calib-text", text, "--out",
                  str(root / "mixed-plan.json")]):
        err = _refused(capsys, argv, says)
        assert "applies to" not in err and "text options" not in err, err


def test_a_plan_for_another_model_says_so(root, cache, capsys):
    model, _ = quept.load_model(root / "bert")
    bert_layers = list(elastic_layers(quept.prepare(model, SPEC)))
    plan = root / "bert-plan.json"
    plan.write_text(json.dumps(dict.fromkeys(bert_layers, 4)))
    err = _refused(capsys, ["eval", str(root / "vit-el"), "--plan", str(plan), "--images", "40"],
                   "made for another model", repr(bert_layers[0]))
    assert "add a first entry" not in err, err
    vit, _ = quept.load_model(root / "vit")
    layers = elastic_layers(quept.prepare(vit, SPEC))
    with pytest.raises(ConfigError, match="plan names none of the model's") as e:
        plan_widths(layers, dict.fromkeys(bert_layers, 4))
    assert repr(next(iter(layers))) in str(e.value)
    with pytest.raises(ConfigError, match="add a first entry"):  # one layer left out: the hint
        plan_widths(layers, dict.fromkeys(list(layers)[1:], 4))


@pytest.mark.parametrize("name,holds,listed_in,again", [
    ("vit-w4", "a packed model", "quept-packed.json", "quept export"),
    ("vit-c", "a compact checkpoint", "quept-compact.json", "quept compact"),
])
def test_info_names_a_missing_or_foreign_config_json(root, cache, capsys, name, holds,
                                                     listed_in, again):
    folder = _copy(root, name, f"{name}-info-no-config", "config.json")
    _refused(capsys, ["info", str(folder)],
             f"{folder} is damaged: it holds {holds} but no config.json", f"`{again}`")
    folder = _copy(root, name, f"{name}-info-bert-config")
    shutil.copy(root / name.replace("vit", "bert") / "config.json", folder / "config.json")
    _refused(capsys, ["info", str(folder)], f"describes a 'bert' model, but {listed_in} a 'vit' "
             "one: the folder is damaged or mixed up", f"`{again}`")
    assert main(["info", str(root / name)]) == 0  # the folder as written is described
