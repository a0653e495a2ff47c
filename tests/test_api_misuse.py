"""Misuse of the public API is refused before anything changes: a refused call leaves the model
and the folders as they were, and the message says what is wrong and what would be right."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import quept
from quept.api import ArtifactError
from quept.config import CalibConfig, ConfigError, ElasticSpec, QuEPTConfig
from quept.nn import ElasticLinear, elastic_layers
from quept.ops import GroupSizeError
from tests.conftest import tiny_model
from tests.export.tiny import SPEC, elastic_folder, elastic_tiny, hf_folder


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_a_refused_prepare_leaves_the_model_as_it_was(rotation):
    model = tiny_model(intermediate_size=96)  # 96 inputs to down_proj: group 64 does not divide
    before = _state(model)
    with pytest.raises(GroupSizeError, match=r"block 0 mlp.down_proj: group size 64 "
                                             "does not divide in_features=96"):
        quept.prepare(model, ElasticSpec(ranks=(2, 2, 2, 2), rotation=rotation))
    assert not any(isinstance(m, ElasticLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing rotated either
    spec = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32, rotation=rotation)
    fresh = quept.prepare(tiny_model(intermediate_size=96), spec)
    quept.prepare(model, spec)  # the retry is a first prepare
    ids = torch.randint(0, 256, (1, 16))
    for m in (model, fresh):
        quept.set_bits(m, None)
    assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_save_takes_the_config_of_the_prepared_model(tmp_path):
    model = quept.prepare(tiny_model(), SPEC)
    for config, message in (
            (CalibConfig(), "save takes the QuEPTConfig the model was prepared and calibrated "
                            "with, got CalibConfig"),
            (None, "got NoneType"),
            (QuEPTConfig(spec=replace(SPEC, kv_bits=4)), r"differs from the one the model was "
                                                          r"prepared with \(in kv_bits\)"),
            (QuEPTConfig(), r"\(in ranks, default_group_size\)")):
        with pytest.raises(ConfigError, match=message):
            quept.save(model, tmp_path / "e", config)
        assert not (tmp_path / "e").exists()


def test_save_checks_extra_before_it_writes(tmp_path):
    a, b = elastic_tiny(), elastic_tiny()
    quept.set_bits(b, 3)
    with torch.no_grad():
        for m in elastic_layers(b).values():
            m.lora_u.add_(0.1)
    config = QuEPTConfig(spec=SPEC)
    quept.save(a, tmp_path / "e", config, extra={"note": "a"})
    saved = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    with pytest.raises(ConfigError, match="extra must hold JSON values"):
        quept.save(b, tmp_path / "e", config, extra={"t": {1, 2}})
    with pytest.raises(ConfigError, match=r"extra may not set \['format'\]"):
        quept.save(b, tmp_path / "e", config, extra={"format": "mine"})
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == saved


def test_saving_a_model_quept_did_not_load_warns_about_its_base(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="quept.api.store"):
        quept.save(elastic_tiny(), tmp_path / "e", QuEPTConfig(spec=SPEC))
    assert "records the built-in default as its base model" in caplog.text


def test_a_model_saved_without_calibration_is_warned_of_and_recorded(tmp_path, caplog):
    # before: saved silently, and loaded and described as calibrated
    from quept.info import describe, render

    base, _ = quept.load_model(hf_folder(tmp_path / "base"))
    with caplog.at_level(logging.WARNING, logger="quept.api.store"):
        quept.save(quept.prepare(base, SPEC), tmp_path / "e", QuEPTConfig(spec=SPEC))
    assert "prepared but never calibrated" in caplog.text
    assert json.loads((tmp_path / "e" / "quept.json").read_text())["calibrated"] is False
    model, _ = quept.load(tmp_path / "e")
    assert model.quept_calibrated is False
    assert "NOT CALIBRATED" in render(describe(tmp_path / "e"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quept.api.store"):
        quept.save(elastic_tiny(), tmp_path / "c", QuEPTConfig(spec=SPEC))
    assert "never calibrated" not in caplog.text
    assert "calibrated" not in json.loads((tmp_path / "c" / "quept.json").read_text())
    assert "NOT CALIBRATED" not in render(describe(tmp_path / "c"))


def test_a_folder_made_from_a_relative_path_loads_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_folder(tmp_path / "base")
    elastic_folder(tmp_path / "el", tmp_path / "base")
    model, _ = quept.load_model("base")
    assert model.quept_source == str((tmp_path / "base").resolve())
    quept.prepare(model, SPEC)
    quept.save(model, "rel", QuEPTConfig(spec=SPEC))
    os.chdir(tmp_path / "el")
    quept.load(tmp_path / "rel")
    shutil.move(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(ArtifactError, match=r"was made from the base model '.*base' \(its "
                                            r"quept.json says so\), which cannot be loaded.*"
                                            r"quept.load\(folder, model=PATH\)"):
        quept.load(tmp_path / "rel")
    quept.load(tmp_path / "rel", model=tmp_path / "moved")


def test_a_plan_with_one_bad_width_switches_no_layer():
    model = elastic_tiny()
    quept.set_bits(model, 4)
    with pytest.raises(ConfigError, match="layer model.layers.0.mlp.down_proj: bit-width 9"):
        quept.set_bits(model, {"*": 3, "*.mlp.down_proj": 9})
    assert {m.bits for m in elastic_layers(model).values()} == {4}


def test_export_reads_an_elastic_model_only(tmp_path):
    base = hf_folder(tmp_path / "base")
    switchable, _ = quept.load_switchable(elastic_folder(tmp_path / "el", base), 4)
    with pytest.raises(ConfigError, match="this is a switchable packed one"):
        quept.api.export(switchable, 4, tmp_path / "a")
    with pytest.raises(ConfigError, match="the model has no elastic layers to export"):
        quept.api.export(tiny_model(), 4, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(quept.export.switchable.PackedFormatError, match="keep_bytes must be a "
                                                                      "whole number of bytes"):
        quept.load_switchable(tmp_path / "el", 4, keep_bytes="1MB")
    # before: a PackedFormatError, not the ConfigError every other misuse is
    for bad, says in [(dict(keep_bytes=-1), "keep_bytes must be"), (dict(bits=9), "bit-width 9")]:
        with pytest.raises(ConfigError, match=says):
            quept.load_switchable(tmp_path / "el", **{"bits": 4, **bad})
    with pytest.raises(ConfigError, match="a switchable packed model has no float layers; use "
                                          r"the elastic model \(quept.load\) for float"):
        quept.set_bits(switchable, None)
    quept.set_bits(switchable, np.int64(3))  # a NumPy integer is a width
    assert set(switchable.quept_switch.widths.values()) == {3}


def test_widths_as_numpy_integers_and_wrapped_plans_are_taken():
    # before: np.int64(4) was "not an integer", and a plan file's {"plan": {...}} loaded with
    # json.load was "made for another model"
    model = quept.prepare(tiny_model(), SPEC)
    layers = elastic_layers(model)
    quept.set_bits(model, np.int64(4))
    assert {type(m.bits) for m in layers.values()} == {int}
    assert {m.bits for m in layers.values()} == {4}
    for wrapper in ("plan", "bits"):
        quept.set_bits(model, {wrapper: {"*": np.int32(3), "*.mlp.down_proj": 5}})
        widths = {n: m.bits for n, m in layers.items()}
        assert {b for n, b in widths.items() if n.endswith("down_proj")} == {5}
        assert {b for n, b in widths.items() if not n.endswith("down_proj")} == {3}
        assert {type(b) for b in widths.values()} == {int}
    with pytest.raises(ConfigError, match="holds both 'plan' and 'bits'"):
        quept.set_bits(model, {"plan": {"*": 4}, "bits": {"*": 3}})


@pytest.mark.parametrize("text, says", [("4", "pass the width 4"),
                                        ('{"*": 4}', "pass the dict json.loads gives")])
def test_a_width_or_plan_given_as_text_is_named(text, says):
    # before: FileNotFoundError "plan file 4 does not exist"
    model = quept.prepare(tiny_model(), SPEC)
    quept.set_bits(model, 5)
    with pytest.raises(ConfigError, match=f"is text, read as a plan file's path or an inline "
                                          f"plan .*{says}"):
        quept.set_bits(model, text)
    assert {m.bits for m in elastic_layers(model).values()} == {5}


@pytest.mark.parametrize("field, value, message", [
    (("spec", "default_group_size"), "32", "field 'default_group_size' must be int, got str"),
    (("spec", "default_group_size"), 32.0, "must be int, got float 32.0"),
    (("spec", "bit_groups"), None, r"field 'bit_groups' must be tuple\[tuple\[int, \.\.\.\]"),
    (("calib", "seed"), "0", "CalibConfig field 'seed' must be int"),
    (("spec", "group_size"), {"2": "x"}, "must map widths to whole numbers"),
])
def test_a_damaged_config_field_is_named_with_its_file(tmp_path, field, value, message):
    folder = elastic_folder(tmp_path / "el", hf_folder(tmp_path / "base"))
    meta = json.loads((folder / "quept.json").read_text())
    meta["config"][field[0]][field[1]] = value
    (folder / "quept.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=rf"quept.json: its 'config' cannot be read: .*"
                                            rf"{message}"):
        quept.load(folder)


def test_inputs_and_configs_of_the_wrong_kind_are_named(tmp_path):
    model = elastic_tiny()
    ids = torch.randint(0, 256, (2, 16))
    with pytest.raises(ConfigError, match="integer token ids"):
        quept.evaluate(model, ids > 40, [4])
    with pytest.raises(ConfigError, match="integer token ids"):
        quept.calibrate(model, ids.to(torch.uint8), CalibConfig(n_samples=2, seq_len=16))
    with pytest.raises(ConfigError, match=r"calibrate takes a CalibConfig \(pass its .calib\), "
                                          "got QuEPTConfig"):
        quept.calibrate(model, ids, QuEPTConfig())
    with pytest.raises(ConfigError, match="samples_from_text takes a CalibConfig"):
        quept.samples_from_text(None, "text", QuEPTConfig())
    with pytest.raises(ConfigError, match="sensitivity takes a SensitivityConfig, got dict"):
        quept.sensitivity(model, ids, {"n_samples": 4})
    with pytest.raises(ConfigError, match="round_gptq takes a GPTQConfig, got dict"):
        quept.round_gptq(model, 4, ids, {"x": 1})
    with pytest.raises(ConfigError, match="cache names the folder"):
        quept.sensitivity(model, ids, cache=tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="checkpoint folder .* is a file"):
        quept.calibrate(model, ids, CalibConfig(n_samples=2, seq_len=16),
                        checkpoint_dir=tmp_path / "file")


def _other_embeddings(src, dst):
    """A copy of the HF folder ``src`` whose embeddings (and tied head) differ; its linears
    are the same."""
    model, tok = quept.load_model(src)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_a_base_model_with_other_embeddings_is_refused(tmp_path):
    """The folder records a fingerprint of what it takes from its base besides the linears: a
    base with the same linears but other embeddings, norms or head is another model."""
    elastic_folder(tmp_path / "el", hf_folder(tmp_path / "base"))
    other = _other_embeddings(tmp_path / "base", tmp_path / "other")
    quept.load(tmp_path / "el")
    with pytest.raises(ArtifactError, match="the base model weights differ"):
        quept.load(tmp_path / "el", model=other)
    meta = json.loads((tmp_path / "el" / "quept.json").read_text())
    del meta["base_rest_fingerprint"]  # a folder written before it was recorded still loads
    (tmp_path / "el" / "quept.json").write_text(json.dumps(meta))
    quept.load(tmp_path / "el", model=other)
    with pytest.raises(ConfigError, match="quept.load's model names the base model .* got "):
        quept.load(tmp_path / "el", model=tiny_model())


def test_a_checkpoint_of_another_base_model_is_not_resumed(tmp_path):
    from quept.calib.checkpoint import CheckpointMismatchError

    cfg = CalibConfig(n_samples=2, seq_len=16, batch_size=2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = hf_folder(tmp_path / "base")
    for folder in (base, _other_embeddings(base, tmp_path / "other")):
        model, _ = quept.load_model(folder)
        quept.prepare(model, SPEC)
        if folder == base:
            quept.calibrate(model, ids, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
        else:
            with pytest.raises(CheckpointMismatchError,
                               match=r"made with another base model \(base: another model"):
                quept.calibrate(model, ids, cfg, checkpoint_dir=tmp_path / "ckpt",
                                progress=False)


def test_calibration_inputs_must_be_those_the_config_describes():
    model = elastic_tiny()
    ids = torch.randint(0, 256, (4, 16))
    for cfg in (CalibConfig(n_samples=2, seq_len=16), CalibConfig(n_samples=4, seq_len=8)):
        with pytest.raises(ConfigError, match=r"calibrate was given 4 samples of 16 tokens, but "
                                              r"its config says \d samples of \d+ tokens"):
            quept.calibrate(model, ids, cfg, progress=False)
    from tests.test_vit import tiny_vit

    vit = quept.prepare(tiny_vit(), SPEC)
    with pytest.raises(ConfigError, match="given 3 samples, but its config says 2 samples:"):
        quept.calibrate(vit, torch.rand(3, 1, 28, 28), CalibConfig(n_samples=2), progress=False)


def test_texts_seeds_and_config_fields_of_the_wrong_kind_are_named():
    from tests.export.tiny import TEXT, char_tokenizer
    from tests.test_encoder import char_bert_tokenizer

    tok, cfg = char_tokenizer(), CalibConfig(n_samples=2, seq_len=16)
    for text, message in (([TEXT, TEXT], "reads one text .* got list"),
                          (None, "got NoneType"), (b"abc", "got bytes"),
                          (" \n\t ", "was given an empty text")):
        with pytest.raises(ConfigError, match=message):
            quept.samples_from_text(tok, text, cfg)
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        quept.samples_from_text(None, TEXT, cfg)
    with pytest.raises(ConfigError, match="windows_from_text reads one text"):
        quept.windows_from_text(tok, [TEXT], seq_len=16)
    with pytest.raises(ConfigError, match=r"seq_len 2 leaves no text in an encoder's window"):
        quept.samples_from_text(char_bert_tokenizer(), TEXT, CalibConfig(n_samples=2, seq_len=2))
    for kw, message in ((dict(seed="a"), "field 'seed' must be int, got str 'a'"),
                        (dict(seed=1.5), "field 'seed' must be int"),
                        (dict(seed=True), "field 'seed' must be int, got bool"),
                        (dict(seed=2**63), r"seed must be an integer from 0 to 2\*\*63 - 1"),
                        (dict(seed=-1), r"from 0 to 2\*\*63 - 1"),
                        (dict(lr_adapter="0.1"), "field 'lr_adapter' must be float"),
                        (dict(massive_ratio=float("inf")), "a finite ratio > 1")):
        with pytest.raises(ConfigError, match=message):
            CalibConfig(**kw)
    for kw, message in ((dict(clip_refine=2.5), "field 'clip_refine' must be int"),
                        (dict(clip_refine=11), "clip_refine must be from 0 to 10"),
                        (dict(ranks=(0, 16, 8, 8.7)), r"field 'ranks' must be tuple\[int, \.\.\.\]"),
                        (dict(unclipped_bits=(8,), fixed_clip_bits=(8,)),
                         r"width\(s\) \[8\] are in both unclipped_bits")):
        with pytest.raises(ConfigError, match=message):
            ElasticSpec(**kw)
    with pytest.raises(ConfigError, match="prepare's seed must be an integer"):
        quept.prepare(tiny_model(), SPEC, seed="a")
    import numpy as np

    assert CalibConfig(seed=np.int64(3)).to_dict()["seed"] == 3  # made a plain int


def test_a_rotated_model_is_saved_with_the_seed_it_was_rotated_with(tmp_path):
    spec = replace(SPEC, rotation="hadamard")
    model = quept.prepare(tiny_model(), spec, seed=5)
    with pytest.raises(ConfigError, match="prepared \\(and rotated\\) with seed 5, but the "
                                          "config's calib.seed is 0"):
        quept.save(model, tmp_path / "e", QuEPTConfig(spec=spec))
    assert not (tmp_path / "e").exists()
    quept.save(model, tmp_path / "e", QuEPTConfig(spec=spec, calib=CalibConfig(seed=5)))


def test_a_local_folder_named_like_a_built_in_model_is_warned_of(tmp_path, monkeypatch, caplog):
    import quept.data
    from quept.api.models import resolve_model_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quept.data, "encoder_model_dir", lambda: tmp_path / "built-in")
    assert resolve_model_dir("minilm") == tmp_path / "built-in" and not caplog.records
    (tmp_path / "minilm").mkdir()
    with caplog.at_level(logging.WARNING):
        assert resolve_model_dir("minilm") == tmp_path / "built-in"
    assert "'minilm' names the built-in model; the local folder of that name is not read " \
           "(pass ./minilm to read it)" in caplog.text


def test_a_rotation_of_an_order_with_no_hadamard_matrix_changes_nothing():
    model = tiny_model(intermediate_size=112)  # down_proj reads 112: no Hadamard of that order
    before = _state(model)
    with pytest.raises(ConfigError, match="down_proj's input \\(the MLP width\\) 112 cannot be "
                                          "rotated: .*use rotation 'none'"):
        quept.prepare(model, ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=16,
                                         rotation="hadamard"))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_calibrating_a_calibrated_model_again_is_warned_of(tmp_path, caplog):
    model = quept.prepare(tiny_model(), SPEC)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(n_samples=2, seq_len=16, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="quept.api.elastic"):
        quept.calibrate(model, ids, cfg, progress=False)
        assert "already calibrated" not in caplog.text
        quept.calibrate(model, ids, cfg, progress=False)
    assert "the model is already calibrated: calibrating again" in caplog.text
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=SPEC, calib=cfg))
    assert quept.load(tmp_path / "el", model=hf_folder(tmp_path / "b"))[0].quept_calibrated
