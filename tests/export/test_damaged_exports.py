"""An export whose files disagree with each other is refused in one line naming the file and
the field at fault, never run with a wrong width or label, taken for another kind of folder,
or failed on with a library's multi-line message: a compressed-tensors config's widths and
sizes against its weights, a packed folder's config and JSON against its weights, an ONNX
export's summary against its graph and config, a missing tokenizer.json."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from quept.cli import main

from .test_damaged_folders import _set, made
from .tiny import TEXT, elastic_folder, hf_folder

GROUP = "quantization_config/config_groups/group_0/weights"  # of the ct export's config.json


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An elastic folder over a tiny HF model and a text; its W3 exports (packed, "ct" and
    "onnx") are made on first use."""
    root = tmp_path_factory.mktemp("damaged-exports")
    elastic_folder(root / "elastic", hf_folder(root / "base"))
    (root / "t.txt").write_text(TEXT * 4)
    return root


def _copy(root, kind: str, label: str, name: str | None = None, edit=None):
    """A copy of the ``kind`` export, its JSON file ``name`` changed by ``edit`` (or, where
    ``edit`` is None, the file ``name`` deleted)."""
    folder = root / f"{kind}-{label}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(made(root, kind), folder)
    if name is not None and edit is None:
        (folder / name).unlink()
    elif name is not None:
        d = json.loads((folder / name).read_text())
        edit(d)
        (folder / name).write_text(json.dumps(d))
    return folder


def _argv(root, command: str, folder) -> list[str]:
    return {"info": ["info", str(folder)],
            "eval": ["eval", str(folder), "--text", str(root / "t.txt"), "--windows", "1",
                     "--seq-len", "16"],
            "run": ["run", str(folder), "--prompt", "It is", "--max-new-tokens", "2"]}[command]


def _refused(root, capsys, folder, says: str, commands=("info", "eval")) -> None:
    """Each command exits 2 with one last line that matches ``says``, and no traceback or
    PyTorch state-dict report."""
    capsys.readouterr()
    for command in commands:
        assert main(_argv(root, command, folder)) == 2, command
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("quept: error: ") and re.search(says, last), err
        assert "Traceback" not in err and "size mismatch" not in err, err


@pytest.mark.parametrize("bits", [2, 4, 5])
def test_a_ct_num_bits_the_codes_are_not_at_is_refused(root, capsys, bits):
    folder = _copy(root, "ct", f"num-bits-{bits}", "config.json",
                   _set(f"{GROUP}/num_bits", bits))
    _refused(root, capsys, folder, rf"config.json says quantization_config.config_groups."
             rf"group_0.weights.num_bits {bits}, but .*weight_packed of shape \[64, 6\], "
             r"3-bit codes", ("eval",))


def test_a_ct_group_size_the_scales_do_not_have_is_refused(root, capsys):
    folder = _copy(root, "ct", "group-16", "config.json", _set(f"{GROUP}/group_size", 16))
    _refused(root, capsys, folder, r"weights.group_size 16, but .*weight_scale of shape "
             r"\[64, 2\]", ("eval",))


@pytest.mark.parametrize("kind, name", [("onnx", "model.onnx"), ("onnx", "quept-export.json")])
def test_an_onnx_export_missing_a_file_is_named_damaged(root, capsys, kind, name):
    folder = _copy(root, kind, f"no-{name}", name)
    _refused(root, capsys, folder, rf"is a damaged ONNX export: .*{name} is missing",
             ("info", "eval", "run"))


@pytest.mark.parametrize("kind, name, says", [
    ("packed", "quept-packed.json", r"quept-packed.json is damaged: its \"bits\" says 4, but "
     r"its layers entries hold every layer at 3 bits"),
    ("onnx", "quept-export.json", r"quept-export.json is damaged: its \"bits\" says 4, but "
     r"its \"widths\" hold 14 layers at 3 bits"),
    ("ct", "quept-export.json", r"quept-export.json is damaged: its \"bits\" says 4"),
], ids=["packed", "onnx", "ct"])
def test_a_width_label_its_layers_contradict_is_refused(root, capsys, kind, name, says):
    folder = _copy(root, kind, "label-4", name, _set("bits", 4))
    _refused(root, capsys, folder, says, ("info",) if kind == "ct" else ("info", "eval"))


@pytest.mark.parametrize("kind, name, edit, says", [
    ("packed", "config.json", _set("vocab_size", 300), r"config.json says vocab_size 300, but "
     r".*packed.safetensors holds model.embed_tokens.weight of shape \[256, 64\]"),
    ("packed", "config.json", _set("num_hidden_layers", 3), r"config.json says "
     r"num_hidden_layers 3, but .*packed.safetensors holds the weights of 2 blocks"),
    ("packed", "quept-packed.json", lambda d: (_set("layers/*/bits", 4)(d),
                                               _set("bits", "mixed")(d)),
     r"quept-packed.json says layer model.layers.0.self_attn.q_proj has bits 4, but .*"
     r"q_proj.qweight of shape"),
    ("packed", "quept-packed.json", _set("layers/*/group_size", 64), r"quept-packed.json says "
     r"layer model.layers.0.self_attn.q_proj has group_size 64, but .*q_proj.scale of shape"),
    ("ct", "config.json", _set("hidden_size", 32), r"config.json says hidden_size 32, but "
     r".*model.safetensors holds model.embed_tokens.weight of shape \[256, 64\]"),
    ("ct", "config.json", _set("vocab_size", 300), r"config.json says vocab_size 300"),
    ("ct", "config.json", _set("num_hidden_layers", 3), r"config.json says num_hidden_layers "
     r"3, but .*model.safetensors holds the weights of 2 blocks"),
], ids=["packed-vocab", "packed-layers", "packed-bits", "packed-group", "ct-hidden", "ct-vocab",
        "ct-layers"])
def test_a_config_the_weights_do_not_fit_is_named_in_one_line(root, capsys, request, kind,
                                                              name, edit, says):
    folder = _copy(root, kind, f"fit-{request.node.callspec.id}", name, edit)
    _refused(root, capsys, folder, says, ("eval",))


def test_an_onnx_config_of_another_model_type_is_refused(root, capsys):
    folder = _copy(root, "onnx", "qwen2", "config.json", _set("model_type", "qwen2"))
    _refused(root, capsys, folder, r"config.json describes a 'qwen2' model, but "
             r"genai_config.json a 'llama' one")


def test_an_onnx_task_its_model_does_not_run_is_refused(root, capsys):
    folder = _copy(root, "onnx", "task", "quept-export.json", _set("task", "encoder"))
    _refused(root, capsys, folder, r"describes a 'llama' model \(causal-lm\), but "
             r".*quept-export.json says task 'encoder'")


def test_a_graph_of_another_task_is_named_by_its_inputs(tmp_path):
    from quept.export.onnx_nbits import OnnxExportError
    from quept.export.onnx_runtime import check_graph_inputs

    decoder = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    check_graph_inputs(decoder, "causal-lm", tmp_path)
    with pytest.raises(OnnxExportError, match=r"says task 'encoder', but .*model.onnx takes "
                       r"the inputs .*past_key_values.\* \(those of the causal-lm task\)"):
        check_graph_inputs(decoder, "encoder", tmp_path)
    with pytest.raises(OnnxExportError, match=r"says task 'image-classification', but .* "
                       r"\(those of the encoder task\)"):
        check_graph_inputs(["input_ids", "attention_mask"], "image-classification", tmp_path)


def test_info_names_a_truncated_ct_weights_file(root, capsys):
    folder = _copy(root, "ct", "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(root, capsys, folder, r"model.safetensors cannot be read", ("info",))


def test_info_shows_an_onnx_exports_accuracy_level(root, capsys):
    folder = _copy(root, "onnx", "level-4", "quept-export.json", _set("accuracy_level", 4))
    for shown, level in ((made(root, "onnx"), 0), (folder, 4)):
        capsys.readouterr()
        assert main(["info", str(shown)]) == 0
        assert f"MatMulNBits accuracy level {level} (" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["packed", "ct", "onnx"])
def test_a_missing_tokenizer_json_is_named_in_one_line(root, capsys, kind):
    folder = _copy(root, kind, "no-tokenizer", "tokenizer.json")
    _refused(root, capsys, folder, re.escape(f"{folder / 'tokenizer.json'} is missing (the "
                                             "folder is damaged; export it again)"),
             ("eval", "run"))
