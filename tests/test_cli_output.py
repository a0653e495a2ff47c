"""What the command line prints and records: a reader that closes the pipe early, and the
summaries of `quept plan`, `quept run` and `quept info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import quept
from quept.cli import main
from quept.config import QuEPTConfig
from tests.export.tiny import TEXT, elastic_folder, hf_folder, run_json
from tests.non_llm_folders import refused
from tests.test_encoder import SPEC as BERT_SPEC
from tests.test_encoder import TEXT as BERT_TEXT
from tests.test_encoder import char_bert_tokenizer, tiny_bert


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(tmp_path):
    plan = tmp_path / "hand.json"
    plan.write_text(json.dumps({"*": 4, "model.layers.0.mlp.down_proj": 8}))
    for argv in (["info", str(plan)], ["info", str(plan), "--json"]):
        cli = subprocess.Popen([sys.executable, "-m", "quept.cli", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cli.stdout.close()  # the reader has gone before quept writes a byte (`| head -c 0`)
        err = cli.stderr.read().decode()
        cli.stderr.close()
        assert cli.wait() == 1, err
        assert err == "", err  # no "quept: error: [Errno 32] Broken pipe", no traceback


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    """A tiny elastic decoder folder and a calibration text beside it."""
    root = tmp_path_factory.mktemp("out")
    (root / "t.txt").write_text(TEXT)
    return elastic_folder(root / "el", hf_folder(root / "base"))


def plan_argv(elastic, *budget: str, out: str) -> list[str]:
    return ["plan", str(elastic), *budget, "--out", str(elastic.parent / out), "--samples",
            "4", "--seq-len", "32", "--check-samples", "2", "--calib-text",
            str(elastic.parent / "t.txt")]


def test_plan_says_what_refinement_did(elastic, capsys):
    # before: nothing on stdout, in the plan or in `quept info` (an INFO log line only)
    argv = plan_argv(elastic, "--avg-bits", "3.5", "--refine", "2", out="refined.json")
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("refinement (up to 2 rounds): round 1")]
    assert len(said) == 1, said
    record = json.loads((elastic.parent / "refined.json").read_text())["refinement"]
    assert record["rounds"] == 2 and record["tried"][0]["round"] == 1
    assert main(["info", str(elastic.parent / "refined.json")]) == 0
    assert said[0] in capsys.readouterr().out.splitlines()
    assert run_json(capsys, [*argv, "--json"])["refinement"] == record


def test_a_byte_budget_above_the_widest_plan_is_noted_in_bytes(elastic, capsys):
    # before: the note gave this budget as 6510.4167 bits per weight
    assert main(plan_argv(elastic, "--max-bytes", "60MB", out="p60.json")) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note")]
    kept = json.loads((elastic.parent / "p60.json").read_text())["stored_bytes"]
    widest = quept.api.plan_record(quept.load(elastic)[0], 8).stored_bytes
    assert note == (f"note: the budget of 60,000,000 bytes is more than the widest plan of this "
                    f"model needs: every layer at 8 bits, {widest:,.0f} bytes of quantized "
                    f"linears; this plan stores {kept:,.0f}")


def test_each_speed_line_names_what_ran_as_its_header_does(elastic, capsys):
    # before: headers "(packed, ...)" over speed lines ending "(elastic model)"
    gen = ["--prompt", "It is", "--max-new-tokens", "2", "--no-eos"]
    for extra, mode, ran in ((["--bits", "3,2"], "packed", "packed layers from the elastic folder"),
                             (["--bits", "3", "--fake-quant"], "fake-quantized",
                              "the elastic folder fake-quantized")):
        assert main(["run", str(elastic), *extra, *gen]) == 0
        lines = capsys.readouterr().out.splitlines()
        headers = [x for x in lines if x.startswith("--- W")]
        speeds = [x for x in lines if x.startswith("prefill ")]
        assert len(headers) == len(speeds) == len(extra[1].split(","))
        assert all(f"({mode}, " in h for h in headers)
        assert all(s.endswith(f"({ran})") for s in speeds), speeds


def test_an_encoder_plan_without_seq_len_fits_its_positions(tmp_path, capsys):
    # before: "--seq-len 128 is longer than the encoder's 64 positions", --seq-len not given
    tiny_bert().save_pretrained(tmp_path / "bert")
    char_bert_tokenizer().save_pretrained(tmp_path / "bert")
    model, _ = quept.load_model(tmp_path / "bert")
    quept.prepare(model, BERT_SPEC)
    model.quept_calibrated = True
    quept.save(model, tmp_path / "el", QuEPTConfig(spec=BERT_SPEC))
    (tmp_path / "t.txt").write_text(BERT_TEXT)
    argv = ["plan", str(tmp_path / "el"), "--avg-bits", "3.5", "--out", str(tmp_path / "p.json"),
            "--samples", "4", "--check-samples", "2", "--calib-text", str(tmp_path / "t.txt")]
    assert main(argv) == 0, capsys.readouterr().err
    assert ("note: --seq-len not given: sequences of 64 tokens, the model's positions (the "
            "default, 128, is longer)") in capsys.readouterr().out.splitlines()
    refused(capsys, [*argv, "--seq-len", "128"],
            "--seq-len 128 is longer than the encoder's 64 positions: give 64 or less")
