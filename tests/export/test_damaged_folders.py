"""A model folder with a damaged file is refused by the command line with the file or folder
named (exit 2 and a last line on stderr that says so), never with a raw library error or a traceback: a plain
HF folder's config, weights or tokenizer, a packed folder's tokenizer, a compressed-tensors
folder's weights, an ONNX export's graph or summary; and a JSON file that parses but holds a
field that is missing or of the wrong kind, in every kind of folder."""

from __future__ import annotations

import json
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
    if kind in ("base", "elastic"):
        return root / kind
    if not (root / kind).exists():
        write = (["compact", str(root / "elastic")] if kind == "compact" else
                 ["export", str(root / "elastic"), "--bits", "3", *FORMAT[kind]])
        assert main([*write, "--out", str(root / kind)]) == 0
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


@pytest.mark.parametrize("kind, name, damage, says", [
    ("packed", "packed.safetensors", b'{"a": 1}', "packed.safetensors cannot be read: "),
    ("packed", "packed.safetensors", JUNK, "packed.safetensors cannot be read: "),
    ("compact", "compact.safetensors", b'{"a": 1}', "compact.safetensors cannot be read: "),
    ("elastic", "elastic.safetensors", b'{"a": 1}', "elastic.safetensors cannot be read: "),
])
def test_a_damaged_weights_file_is_named_by_info(root, capsys, kind, name, damage, says):
    folder = root / f"info-{kind}-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(made(root, kind), folder)
    (folder / name).write_bytes(damage)
    capsys.readouterr()
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"quept: error: {folder / name} cannot be "
                                                   "read: "), err
    assert says in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind, name, drop, says", [
    ("packed", "packed.safetensors", "model.layers.1.mlp.up_proj.qweight",
     "has no qweight tensor of layer model.layers.1.mlp.up_proj, which quept-packed.json "
     "lists"),
    ("compact", "compact.safetensors", "model.layers.1.mlp.up_proj.master",
     "has no master tensor of layer model.layers.1.mlp.up_proj, which quept-compact.json "
     "lists"),
])
def test_a_weights_file_missing_a_layer_is_named_by_info(root, capsys, kind, name, drop, says):
    from safetensors.torch import load_file, save_file

    folder = root / f"info-{kind}-missing"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(made(root, kind), folder)
    tensors = load_file(str(folder / name))
    del tensors[drop]
    save_file(tensors, str(folder / name))
    capsys.readouterr()
    assert main(["info", str(folder)]) == 2
    assert says in capsys.readouterr().err


def _set(path: str, value):
    """An edit of a JSON object: the field at ``path`` (keys joined by "/"; a key "*" is the
    first key there) set to ``value``, or deleted where ``value`` is DROP."""
    def edit(d):
        *parents, last = path.split("/")
        for key in parents:
            d = d[next(iter(d))] if key == "*" else d[key]
        last = next(iter(d)) if last == "*" else last
        if value is DROP:
            del d[last]
        else:
            d[last] = value
    return edit


DROP = object()
INFO, EVAL = "info", "eval"


@pytest.mark.parametrize("kind, name, edit, says, commands", [
    ("elastic", "quept.json", _set("config", DROP), "quept.json is damaged: it holds no "
     "'config', which should be a JSON object", (INFO, EVAL)),
    ("elastic", "quept.json", _set("layers", None), "it holds a JSON null as 'layers', which "
     "should be a JSON array", (INFO, EVAL)),
    ("elastic", "quept.json", _set("base_model", [1]), "a JSON array as 'base_model'",
     (INFO, EVAL)),
    ("packed", "quept-packed.json", _set("scale_dtype", "int8"), "scale dtype 'int8' is not "
     "one of", (INFO, EVAL)),
    ("packed", "quept-packed.json", _set("layers/*/in", "64"), r"quept-packed.json \(layers "
     r"entry model.layers.0.self_attn.q_proj\) is damaged: it holds a JSON string as 'in'",
     (INFO, EVAL)),
    ("packed", "quept-packed.json", _set("sizes", None), "a JSON null as 'sizes'",
     (INFO, EVAL)),
    ("packed", "quept-packed.json", _set("head", []), "a JSON array as 'head'", (INFO, EVAL)),
    ("compact", "quept-compact.json", _set("compact/master", 8), r"its compact settings hold "
     r"\['master'\]", (INFO, EVAL)),
    ("compact", "quept-compact.json", _set("layers/*", "64x64"), "layer "
     "'model.layers.0.self_attn.q_proj' should have a shape", (INFO, EVAL)),
    ("onnx", "quept-export.json", _set("bits_per_weight", None), "a JSON null as "
     "'bits_per_weight', which should be a JSON number", (INFO, EVAL)),
    ("ct", "config.json", _set("quantization_config/config_groups/*/weights/group_size", "x"),
     "its quantization_config cannot be read", (EVAL,)),
    ("ct", "config.json", _set("quantization_config/config_groups/*", None),
     "config group 'group_0' is not an object", (INFO,)),
    ("ct", "config.json", _set("quantization_config/config_groups/*/weights", None),
     "config group 'group_0' quantizes no weights", (EVAL,)),
    ("base", "config.json", _set("quantization_config", {"quant_method": "gptq"}),
     "holds a model quantized by 'gptq', which quept does not read", (EVAL,)),
])
def test_a_damaged_json_field_is_named(root, capsys, kind, name, edit, says, commands):
    folder, text = root / f"{kind}-{name}-field", root / "t.txt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(made(root, kind), folder)
    d = json.loads((folder / name).read_text())
    edit(d)
    (folder / name).write_text(json.dumps(d))
    capsys.readouterr()
    for command in commands:
        argv = ([INFO, str(folder)] if command == INFO else
                [EVAL, str(folder), "--text", str(text), "--windows", "1", "--seq-len", "16"])
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("quept: error: "), err
        assert "Traceback" not in err and re.search(says, err), err


def test_a_model_folder_missing_weights_is_refused_not_filled_at_random(root, capsys):
    from safetensors.torch import load_file, save_file

    folder = root / "base-missing"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / "base", folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["eval", str(folder), "--text", str(root / "t.txt"), "--windows", "1",
                 "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert ("1 weights of the model its config.json describes are not in its safetensors files "
            "(e.g. ['model.layers.1.mlp.up_proj.weight'])") in err


def test_damaged_plan_caches_are_measured_again_and_plans_named(root, capsys):
    """A damaged sensitivity table is a cache: `quept info` says so and `quept plan` measures
    it again; a damaged plan file is named."""
    folder = root / "elastic-caches"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / "elastic", folder)
    plan = root / "caches-plan.json"
    calib = ["--calib-text", str(root / "t.txt"), "--samples", "2", "--seq-len", "16",
             "--check-samples", "2"]
    assert main(["plan", str(folder), "--avg-bits", "4", *calib, "--out", str(plan)]) == 0
    table = json.loads((folder / "sensitivity.json").read_text())
    table["group_size"] = None
    (folder / "sensitivity.json").write_text(json.dumps(table))
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mixed precision: .*sensitivity.json: malformed entry .* \(`quept plan` "
                     r"measures it again\)", out), out
    assert main(["plan", str(folder), "--avg-bits", "4", *calib, "--out", str(plan)]) == 0
    assert isinstance(json.loads((folder / "sensitivity.json").read_text())["group_size"], dict)
    d = json.loads(plan.read_text())
    d["objective"] = ["next-token-kl"]
    plan.write_text(json.dumps(d))
    capsys.readouterr()
    for argv in (["info", str(plan)], ["eval", str(folder), "--plan", str(plan), "--text",
                                       str(root / "t.txt"), "--windows", "1", "--seq-len", "16"]):
        assert main(argv) == 2
        assert "objective ['next-token-kl'] is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("holds, says", [
    ("nothing", "holds no model: none of quept.json"),
    ("plans", "holds plans from `quept plan`, not a model"),
    ("checkpoint", "holds an unfinished calibration"),
])
def test_a_folder_holding_no_model_is_named_by_what_it_holds(root, capsys, holds, says):
    """Every command that reads a model names a folder holding none by what it does hold: not
    as a Hugging Face model, nor with advice about --model."""
    folder = root / f"no-model-{holds}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    if holds == "plans":
        (folder / "p.json").write_text(json.dumps({"format": "quept-plan", "widths": {}}))
    if holds == "checkpoint":
        (folder / ".calib-checkpoint").mkdir()
        (folder / ".calib-checkpoint" / "progress.json").write_text("{}")
    out = root / f"no-model-out-{holds}"
    for argv in (["eval", str(folder)], ["run", str(folder), "--prompt", "hi"],
                 ["export", str(folder), "--bits", "4", "--out", str(out)],
                 ["compact", str(folder), "--out", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "--model" not in err and "holds a Hugging Face" not in err, err
        assert not out.exists()
