"""`quept quantize` refuses what it cannot do before it calibrates, and options it would
ignore or drop: evaluation sizes, options of another model kind, spec options that do not fit
the bit groups, an empty --out, a quept.json quept did not write, devices and seeds torch
cannot take, texts of whitespace and samples that would only fill memory."""

from __future__ import annotations

import json
import logging
import re

import pytest

import quept
from quept.checks import ConfigError, check_device
from quept.cli import build_parser, main
from quept.cli.quantize import _configs
from tests.export.tiny import TEXT, hf_folder


@pytest.fixture
def no_calibration(monkeypatch):
    """A calibration that must not start: each test here is refused before it."""
    def calibrate(*a, **k):
        raise AssertionError("the calibration started")

    monkeypatch.setattr(quept.api, "calibrate", calibrate)


@pytest.fixture
def decoder(tmp_path):
    """(argv of a small `quept quantize` on a tiny decoder, its --out folder)."""
    base = hf_folder(tmp_path / "base")
    (tmp_path / "calib.txt").write_text(TEXT * 8)
    out = tmp_path / "el"
    return ["quantize", "--model", str(base), "--calib-text", str(tmp_path / "calib.txt"),
            "--samples", "2", "--seq-len", "32", "--epochs", "1", "--out", str(out)], out


@pytest.fixture
def encoder(tmp_path):
    from tests.test_encoder import TEXT as PARAGRAPHS
    from tests.test_encoder import char_bert_tokenizer, tiny_bert

    base = tmp_path / "bert"
    tiny_bert().save_pretrained(base)
    char_bert_tokenizer().save_pretrained(base)
    (tmp_path / "calib.txt").write_text(PARAGRAPHS * 4)
    (tmp_path / "eval.txt").write_text(PARAGRAPHS)  # 24 paragraphs
    return ["quantize", "--model", str(base), "--calib-text", str(tmp_path / "calib.txt"),
            "--eval-text", str(tmp_path / "eval.txt"), "--samples", "2", "--seq-len", "32",
            "--out", str(tmp_path / "el")]


def configs(*argv: str) -> quept.QuEPTConfig:
    return _configs(build_parser().parse_args(["quantize", *argv]))


def test_an_evaluation_text_too_short_for_the_windows_is_refused_before_calibrating(
        decoder, no_calibration, tmp_path, capsys):
    argv, out = decoder
    (tmp_path / "short.txt").write_text(TEXT)
    assert main([*argv, "--eval-text", str(tmp_path / "short.txt"), "--eval-windows", "1000",
                 "--eval-seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert "quept: error: --eval-windows 1000 x --eval-seq-len 32 on short.txt: evaluation " \
        "text has" in err and "checked before the calibration" in err
    assert not out.exists()


def test_an_encoders_default_sentences_are_checked_before_calibrating(encoder, no_calibration,
                                                                       capsys):
    assert main(encoder) == 2
    err = capsys.readouterr().err
    assert "quept: error: --eval-sentences 256 (the default) on eval.txt: the text has 24 " \
        "paragraphs" in err and "checked before the calibration" in err
    assert main([*encoder, "--eval-sentences", "30"]) == 2
    assert "--eval-sentences 30 on eval.txt" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--eval-windows", "3"], ["--eval-seq-len", "64"]])
def test_decoder_evaluation_options_are_refused_for_an_encoder(encoder, no_calibration, option,
                                                              capsys):
    assert main([*encoder, *option]) == 2
    assert (f"quept: error: {option[0]} applies to a causal LM; the model is an encoder"
            in capsys.readouterr().err)


def test_decoder_evaluation_options_default_to_none_so_a_given_one_is_seen():
    a = build_parser().parse_args(["quantize"])
    assert a.eval_windows is None and a.eval_seq_len is None
    help_text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    assert "(default 8," in help_text and "(default 512;" in help_text


def test_the_presets_own_bit_groups_give_the_presets_model():
    for preset in ("cpu-demo", "cpu-long", "paper"):
        groups = "/".join(",".join(map(str, g))
                          for g in quept.config.PRESET_SPECS[preset].bit_groups)
        assert configs("--preset", preset, "--bit-groups", groups) == configs("--preset", preset)
        mode = ["--preset", preset, "--activations", "per-token"]  # the mode's groups likewise
        assert configs(*mode, "--bit-groups", "7,8/5,6/4") == configs(*mode)


def test_other_bit_groups_say_what_their_defaults_become(caplog):
    with caplog.at_level(logging.INFO, logger="quept"):
        cfg = configs("--preset", "cpu-long", "--bit-groups", "8/4")
    assert cfg.spec.ranks == (8, 8) and cfg.calib.lr_adapter_groups is None
    assert ("--bit-groups 8/4 are not the cpu-long preset's 7,8/5,6/4/3/2, whose ranks, merge "
            "weights and fixed clips fit only its groups: ranks 8,8 (--ranks sets them)"
            in caplog.text)


def test_an_empty_ranks_is_refused_with_or_without_bit_groups():
    for argv in (["--bit-groups", "8/4", "--ranks", ""], ["--ranks", ""]):
        with pytest.raises(ConfigError, match="--ranks is empty; give one adapter rank per "
                           "bit group"):
            configs(*argv)


@pytest.mark.parametrize("argv, says", [
    (["--unclipped-bits", "2"], "--unclipped-bits names width 2, which is in none of the bit "
     "groups: --activations per-token uses 3 bit groups 7,8/5,6/4"),
    (["--fixed-clip-bits", "3"], "--fixed-clip-bits names width 3, which is in none of the bit "
     "groups: --activations per-token uses 3 bit groups 7,8/5,6/4"),
    (["--ranks", "1,2,3,4"], "--ranks has 4 entries but --activations per-token uses 3 bit "
     "groups 7,8/5,6/4"),
    (["--lr-adapter-groups", "1e-3,1e-3"], "--lr-adapter-groups has 2 entries but "
     "--activations per-token uses 3 bit groups"),
])
def test_spec_options_that_do_not_fit_the_activation_modes_groups_are_refused(argv, says):
    with pytest.raises(ConfigError, match=says):
        configs("--activations", "per-token", *argv)


def test_spec_options_fit_the_activation_modes_groups():
    cfg = configs("--activations", "per-token", "--ranks", "0,8,8", "--fixed-clip-bits", "7")
    assert cfg.spec.ranks == (0, 8, 8)
    assert cfg.spec.fixed_clip_bits == (7,) and cfg.spec.unclipped_bits == (8,)


def test_a_width_both_unclipped_and_with_a_fixed_clip_is_refused():
    with pytest.raises(ConfigError, match="width 7 is in both --unclipped-bits .* and "
                       "--fixed-clip-bits"):
        configs("--unclipped-bits", "7", "--fixed-clip-bits", "7,8")


def test_an_empty_out_is_refused(decoder, no_calibration, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv, _ = decoder
    assert main([*argv, "--out", ""]) == 2
    assert "quept: error: --out is empty; give the folder to write, e.g. quept-elastic" in (
        capsys.readouterr().err)
    assert main(["plan", str(tmp_path), "--avg-bits", "3", "--out", ""]) == 2
    assert "quept: error: --out is empty" in capsys.readouterr().err


def test_a_quept_json_quept_did_not_write_is_not_replaced(decoder, no_calibration, tmp_path,
                                                          capsys):
    argv, _ = decoder
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "quept.json").write_text('{"name": "x"}')
    assert main([*argv, "--out", str(proj)]) == 2
    err = capsys.readouterr().err
    assert (f"quept: error: --out {proj} holds a quept.json that quept did not write (not a "
            'JSON object with "format": "quept-elastic")') in err
    assert "replaces" not in err
    assert json.loads((proj / "quept.json").read_text()) == {"name": "x"}
    assert not quept.api.folders.holds_elastic_model(proj)
    for command in (["info", str(proj)], ["eval", str(proj)]):  # read: named as not quept's
        assert main(command) == 2
        assert f"{proj / 'quept.json'} has format None, expected 'quept-elastic'" in (
            capsys.readouterr().err)


def test_a_device_quept_does_not_compute_on_is_refused_before_the_model_loads(
        decoder, no_calibration, capsys):
    with pytest.raises(ConfigError, match="'meta': quept computes on cpu, cuda .* not meta"):
        check_device("meta", "--device")
    argv, _ = decoder
    assert main([*argv, "--device", "meta"]) == 2
    assert "quept: error: --device 'meta': quept computes on" in capsys.readouterr().err


def test_a_seed_past_torchs_range_is_refused_by_the_command_line(capsys):
    for seed in ("99999999999999999999", "-1"):
        with pytest.raises(SystemExit):
            main(["quantize", "--seed", seed])
        assert "expected a seed from 0 to 2**63 - 1" in capsys.readouterr().err


def test_an_error_from_torchs_compiled_code_is_not_taken_for_quepts(tmp_path, monkeypatch,
                                                                    capsys):
    """torch's operators raise in compiled code, so the innermost Python frame of their error
    is the quept line that called them: still an error raised outside quept."""
    from quept.cli import _raised_by_quept, run
    from quept.data.tokens import calibration_starts

    with pytest.raises((RuntimeError, ValueError)) as e:
        calibration_starts(100, 2, 4, seed=2**70)  # torch.Generator.manual_seed overflows
    assert not _raised_by_quept(e.value)
    monkeypatch.setattr(run, "describe", lambda path: calibration_starts(100, 2, 4, 2**70))
    assert main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(
        " (raised outside quept: `quept -v COMMAND ...` prints where)\n")
    with pytest.raises(ConfigError) as e:
        check_device("meta")
    assert _raised_by_quept(e.value)


@pytest.mark.parametrize("name, content, says", [
    ("blank.txt", " \t\n\n  \n", "it is only whitespace"),
    ("empty.txt", "", "it is empty"),
    ("blank.jsonl", '{"text": "  "}\n{"text": "\\n"}\n', "it is only whitespace (no record"),
])
def test_a_text_file_of_whitespace_is_refused_by_name(tmp_path, name, content, says):
    from quept.data import load_texts

    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=f"text file '.*{name}' holds no text: {re.escape(says)}"):
        load_texts([tmp_path / name], role="eval")


def test_whitespace_calibration_text_is_refused_before_the_model_loads(decoder, tmp_path,
                                                                       capsys):
    argv, _ = decoder
    (tmp_path / "blank.txt").write_text("   \n\t\n")
    assert main([*argv, "--calib-text", str(tmp_path / "blank.txt")]) == 2
    assert "holds no text: it is only whitespace; give a file with the text to calibrate on" \
        in capsys.readouterr().err


def test_samples_that_would_cover_the_text_a_hundred_times_over_are_refused(
        decoder, no_calibration, capsys):
    import torch

    from quept.data.tokens import NotEnoughTextError, calibration_samples

    with pytest.raises(NotEnoughTextError, match="10000 calibration windows of 200 tokens "
                       "would cover a text of 1000 tokens 2000 times over, past the 100 "
                       "allowed.*at most 500 windows"):
        calibration_samples(torch.arange(1000), 10000, 200, seed=0)
    calibration_samples(torch.arange(1000), 500, 200, seed=0)  # 100 times over: allowed
    with pytest.raises(NotEnoughTextError, match="at most 984 windows"):  # not 6250: they would
        calibration_samples(torch.arange(1000), 10000, 16, seed=0)  # repeat (984 start places)
    argv, out = decoder
    assert main([*argv, "--samples", "100000"]) == 2
    assert "times over, past the 100 allowed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["quantize", "--eval-sentences", "1"],
                                  ["eval", "folder", "--sentences", "1"]])
def test_embedding_fidelity_of_one_sentence_is_refused_by_the_parser(argv, capsys):
    """Fidelity compares each sentence's nearest other one: refused before anything loads,
    not after a calibration (and its folder written)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert ("at least 2 sentences (embedding fidelity compares each paragraph's nearest other "
            "paragraph") in capsys.readouterr().err
    assert build_parser().parse_args(["quantize", "--eval-sentences", "0"]).eval_sentences == 0


@pytest.mark.parametrize("argv, says", [
    (["quantize", "--samples", "0"], "argument --samples: expected a positive count, got '0'"),
    (["quantize", "--epochs", "0"], "argument --epochs: expected a positive count, got '0'"),
    (["plan", "f", "--avg-bits", "3", "--samples", "0"], "argument --samples: expected a "
     "positive count"),
    (["eval", "f", "--seq-len", "64.0"], "argument --seq-len: '64.0' is not a whole number: "
     "expected at least 2 tokens per window"),
    (["quantize", "--seq-len", "1"], "argument --seq-len: expected at least 2 tokens per sample "
     "(a decoder predicts each token from those before it"),
    (["plan", "f", "--avg-bits", "3", "--seq-len", "1"], "argument --seq-len: expected at "
     "least 2 tokens per sample"),
])
def test_counts_are_whole_numbers_checked_under_their_option(argv, says, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert says in capsys.readouterr().err


def test_a_seq_len_past_the_context_is_named_before_the_text_length(decoder, no_calibration,
                                                                   tmp_path, capsys):
    argv, out = decoder
    (tmp_path / "short.txt").write_text(TEXT)
    short = ["--calib-text", str(tmp_path / "short.txt")]
    assert main([*argv, *short, "--seq-len", "20000"]) == 2
    says = "--seq-len 20000 is past the model's context of 1024 tokens: give 1024 or less"
    assert f"quept: error: {says}" in capsys.readouterr().err
    assert main(["eval", argv[2], "--text", str(tmp_path / "short.txt"), "--seq-len",
                 "20000"]) == 2
    assert f"quept: error: {says}" in capsys.readouterr().err
    assert not out.exists()


def test_calibration_text_refusals_name_the_options_and_an_encoders_two_special_tokens(
        decoder, encoder, no_calibration, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("it is a truth\n")  # 14 tokens
    assert main([*encoder, "--calib-text", str(tmp_path / "short.txt"), "--eval-sentences",
                 "0"]) == 2
    assert ("2 samples x 32 tokens (--samples, --seq-len) on short.txt: calibration text has 14 "
            "tokens; need more than seq_len=30 (an encoder's window of seq_len=32 tokens "
            "holds [CLS] and [SEP] around 30 tokens of text)") in capsys.readouterr().err
    argv, out = decoder
    (tmp_path / "33.txt").write_text(TEXT[:33])
    assert main([*argv, "--calib-text", str(tmp_path / "33.txt"), "--samples", "4"]) == 2
    assert ("4 samples x 32 tokens (--samples, --seq-len) on 33.txt: 4 calibration windows of "
            "32 tokens from a text of 33 tokens") in capsys.readouterr().err
    assert not out.exists()
