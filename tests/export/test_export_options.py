"""What an export refuses before it writes: options of another format, an --out that would
spoil something (inside the folder read, a GGUF path naming a folder, a folder of other
files), a GGUF export without a tokenizer, ONNX groups MatMulNBits cannot take; and a
quantized KV cache on a model quept cannot patch (an ONNX Runtime model)."""

from __future__ import annotations

import re

import pytest
from torch import nn

from quept import api
from quept.cli import main
from quept.config import ConfigError, ElasticSpec
from quept.outputs import UNFINISHED
from tests.conftest import tiny_config

from .tiny import elastic_folder, elastic_tiny, hf_folder


@pytest.fixture(scope="module")
def model():
    return elastic_tiny()


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-options")
    return elastic_folder(root / "el", hf_folder(root / "base"))


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(("format", "option", "says"), [
    ("compressed-tensors", {"head_bits": 8}, "head_bits=8 applies to the quept format, not "
     "compressed-tensors"),
    ("quept", {"accuracy_level": 4}, "accuracy_level=4 applies to the onnx format, not quept"),
    ("onnx", {"scale_dtype": "float32"}, "scale_dtype='float32' applies to the quept and "
     "compressed-tensors formats, not onnx (MatMulNBits takes float32 scales)"),
])
def test_an_option_of_another_format_is_refused_before_anything_is_written(
        model, tmp_path, format, option, says):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"^{re.escape(says)}: leave it at its default"):
        api.export(model, 4, out, format, **option)
    assert not out.exists()


def test_every_format_takes_the_options_at_their_defaults():
    """The CLI passes scale_dtype="float16" and accuracy_level=0 to every format."""
    from quept.api.deploy import check_format_options

    for format in api.EXPORT_FORMATS:
        check_format_options(format, scale_dtype="float16", head_bits=None,
                                 accuracy_level=0)
    with pytest.raises(ConfigError, match="not gguf .its blocks store float16 scales."):
        check_format_options("gguf", scale_dtype="float32", head_bits=None,
                                 accuracy_level=0)


# --------------------------------------------------------------------------- GGUF
def test_gguf_out_ending_with_a_separator_is_refused_as_a_folder(model, tmp_path):
    from tests.export.test_gguf import tiny_tokenizer

    out = f"{tmp_path / 'newdir'}/"
    with pytest.raises(ConfigError, match="newdir/ ends with a path separator, which names a "
                       "folder; a GGUF export is one file: .* e.g. .*newdir/model.gguf"):
        api.export(elastic_tiny(vocab_size=320), 4, out, "gguf", tokenizer=tiny_tokenizer())
    assert not (tmp_path / "newdir").exists()


def test_gguf_export_without_a_tokenizer_asks_for_it(model, tmp_path):
    with pytest.raises(ValueError, match=r"GGUF export needs the model's tokenizer.* pass "
                       r"tokenizer=\.\.\."):
        api.export(model, 4, tmp_path / "a.gguf", "gguf")
    assert not (tmp_path / "a.gguf").exists()


# --------------------------------------------------------------------------- ONNX groups
@pytest.mark.parametrize(("group", "widths", "says"), [
    (8, {}, "the 4-bit group is 8: calibrate with a group size of 16, 32 or 64 "),
    (48, {"hidden_size": 48, "intermediate_size": 96}, "the 4-bit group is 48: calibrate "
     "with a group size of 16 "),
    (40, {"hidden_size": 40, "intermediate_size": 80}, r"the 4-bit group is 40: no block "
     r"divides every quantized layer's inputs \(40 in common\)"),
])
def test_onnx_group_refusal_names_the_blocks_that_divide_the_inputs(tmp_path, group, widths,
                                                                    says):
    pytest.importorskip("onnxscript")
    from quept.export.onnx_format import write_onnx

    net = elastic_tiny(ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=group), **widths)
    with pytest.raises(ValueError, match=f"MatMulNBits needs a power-of-two block of at least "
                       f"16 inputs; {says}"):
        write_onnx(net, None, tmp_path / "x", 4)
    assert not (tmp_path / "x" / "model.onnx").exists()


# --------------------------------------------------------------------------- --out folders
@pytest.mark.parametrize("format", ["quept", "compressed-tensors", "onnx", "gguf"])
def test_no_format_writes_inside_the_folder_it_reads(elastic, capsys, format):
    out = elastic / ("sub.gguf" if format == "gguf" else "sub")
    assert main(["export", str(elastic), "--bits", "4", "--format", format, "--out",
                 str(out)]) == 2
    assert f"{out} is inside {elastic}, the folder being read; give a path outside it" in (
        last_error(capsys))
    assert not out.exists()


def test_the_api_export_refuses_the_folder_its_model_was_loaded_from(model, tmp_path):
    api.save_compact(model, tmp_path / "compact")
    compact, _ = api.load_compact(tmp_path / "compact")
    for format in ("quept", "compressed-tensors"):
        with pytest.raises(ConfigError, match="is inside .*compact, the folder being read"):
            api.export(compact, 4, tmp_path / "compact" / "sub", format)
    assert not (tmp_path / "compact" / "sub").exists()


@pytest.mark.parametrize("format", ["quept", "compressed-tensors", "onnx"])
def test_a_folder_of_other_files_is_refused_and_left_as_it_was(model, tmp_path, format):
    out = tmp_path / "junk"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(ConfigError, match="junk is not empty and holds no model "
                       r"\(model.safetensors, notes.txt\); writing .* there would leave those "
                       "files beside it: give a new or empty folder"):
        api.export(model, 4, out, format)
    assert sorted(f.name for f in out.iterdir()) == ["model.safetensors", "notes.txt"]


def test_an_empty_folder_and_an_earlier_export_of_the_same_kind_are_written(model, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    api.export(model, 4, out)
    api.export(model, 3, out)  # replaced
    assert api.load_packed(out)[0].quept_packed["bits"] == 3


def test_an_unfinished_write_of_another_kind_is_refused(model, tmp_path):
    out = tmp_path / "stopped"
    out.mkdir()
    (out / UNFINISHED).write_text("a compact checkpoint")
    (out / "compact.safetensors").write_bytes(b"half")
    with pytest.raises(ConfigError, match="holds a compact checkpoint whose writing was "
                       "stopped .* writing a packed model there would mix the two"):
        api.export(model, 4, out)
    (out / UNFINISHED).write_text("a packed model")  # its own kind: written over
    api.export(model, 4, out)
    assert not (out / UNFINISHED).exists()


def test_save_compact_refuses_a_folder_of_other_files(model, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(ConfigError, match="is not empty and holds no model .notes.txt."):
        api.save_compact(model, tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- KV cache
class OnnxStandIn(nn.Module):
    """What :class:`quept.export.onnx_runtime.OrtModel` shows torch: a llama config and no
    blocks (the graph runs in ONNX Runtime)."""

    def __init__(self):
        super().__init__()
        self.config = tiny_config()


def test_a_quantized_kv_cache_refuses_a_model_without_blocks_to_patch():
    pytest.importorskip("transformers")
    from quept.export.kv_cache import QuantizedKVCache
    from quept.models.kv import install_kv_attention

    says = ("the quantized KV cache runs on elastic and packed models, whose attention in "
            "model.layers it patches; this OnnxStandIn holds no model.layers: an ONNX export's "
            "KV cache is ONNX Runtime's own")
    for make in (install_kv_attention, QuantizedKVCache):
        with pytest.raises(ConfigError, match=f"^{re.escape(says)}"):
            make(OnnxStandIn())
