"""The public API refuses misuse with a ConfigError that says what is wrong, where a raw
AttributeError, TypeError or ZeroDivisionError would otherwise surface from deep inside."""

import pytest
import torch

import quept
from quept.config import ConfigError, ElasticSpec, QuEPTConfig
from tests.conftest import tiny_model

SPEC = ElasticSpec(default_group_size=32)


@pytest.fixture
def elastic():
    return quept.prepare(tiny_model(), SPEC)


def test_a_model_that_is_not_prepared_is_named_as_such(tmp_path):
    model = tiny_model()
    with pytest.raises(ConfigError, match="no elastic layers"):
        quept.stored_bits(model)
    with pytest.raises(ConfigError, match="no elastic layers to save"):
        quept.save(model, tmp_path / "e", QuEPTConfig())
    assert not (tmp_path / "e").exists()


def test_prepare_takes_a_spec():
    with pytest.raises(ConfigError, match=r"prepare takes an ElasticSpec \(pass its .spec\), "
                                          "got QuEPTConfig"):
        quept.prepare(tiny_model(), QuEPTConfig())
    with pytest.raises(ConfigError, match="prepare takes an ElasticSpec, got str"):
        quept.prepare(tiny_model(), "3")


def test_plans_name_what_does_not_match(elastic):
    with pytest.raises(ConfigError, match="plan keys must be layer names or shell-style "
                                          "patterns \\(strings\\), got 3"):
        quept.set_bits(elastic, {3: 3})
    with pytest.raises(ConfigError) as missing:
        quept.set_bits(elastic, {})
    assert "14 layers missing" in str(missing.value) and "unknown" not in str(missing.value)
    with pytest.raises(ConfigError) as unknown:
        quept.set_bits(elastic, {"*": 3, "x": 4})
    assert "1 unknown name (e.g. ['x'])" in str(unknown.value)
    assert "missing" not in str(unknown.value)


def test_stored_bits_reads_plans_as_set_bits_does(elastic):
    down = "model.layers.1.mlp.down_proj"
    by_pattern = quept.stored_bits(elastic, {"*": 3, "*.down_proj": 4})
    by_name = quept.stored_bits(elastic, {n: 4 if n.endswith("down_proj") else 3
                                          for n in quept.api.elastic_layers(elastic)})
    assert by_pattern == by_name
    assert quept.stored_bits(elastic, 3) < by_pattern < quept.stored_bits(elastic, 4)
    with pytest.raises(ConfigError, match="bit-width 9 is outside 2..8"):
        quept.stored_bits(elastic, 9)
    with pytest.raises(ConfigError, match=f"layer {down}: bit-width 1 is outside"):
        quept.stored_bits(elastic, {"*": 3, down: 1})
    # a float layer counts 32 bits
    assert quept.stored_bits(elastic, {"*": None}) == 32.0


def test_budgets_and_plan_options_are_checked(elastic):
    for bad in ("3", float("inf"), True, None):
        with pytest.raises(ConfigError, match="avg_bits must be a finite number|exactly one"):
            quept.check_budget(elastic, avg_bits=bad)
    with pytest.raises(ConfigError, match="max_bytes must be a finite number, got '60MB'"):
        quept.check_budget(elastic, max_bytes="60MB")
    ids = torch.randint(0, 256, (2, 8))
    table = quept.sensitivity(elastic, ids, progress=False)
    with pytest.raises(ConfigError, match="granularity must be 'auto' .* got 'layers'"):
        quept.plan(elastic, table, avg_bits=4, granularity="layers")
    with pytest.raises(ConfigError, match="refine must be an integer >= 0"):
        quept.plan(elastic, table, avg_bits=4, check_ids=ids, refine=1.5)


def test_writers_refuse_a_file_where_a_folder_goes(elastic, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt is a file; an elastic model is written "
                                          "as a folder"):
        quept.save(elastic, file, QuEPTConfig(spec=SPEC))
    with pytest.raises(ConfigError, match="notes.txt is a file; a compact checkpoint"):
        quept.api.save_compact(elastic, file)
    assert file.read_text() == "keep me"
    with pytest.raises(ConfigError, match="save_compact's config is a QuEPTConfig .* got "
                                          "ElasticSpec"):
        quept.api.save_compact(elastic, tmp_path / "c", config=SPEC)


def test_one_width_is_evaluated_as_a_list_of_one(elastic):
    windows = torch.randint(0, 256, (2, 8))
    one = quept.evaluate(elastic, windows, 3, progress=False)
    assert [r.bits for r in one] == [3]
    assert one[0].ppl == quept.evaluate(elastic, windows, [3], progress=False)[0].ppl


def test_each_evaluator_takes_its_own_task_and_inputs():
    from quept.eval import Sentences
    from tests.test_encoder import tiny_bert
    from tests.test_vit import tiny_vit

    vit = quept.prepare(tiny_vit(), SPEC)
    pixels, labels = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    assert quept.evaluate_accuracy(vit, pixels, labels, [3], progress=False)[0].bits == 3
    for bad_pixels, says in ((pixels.long(), "float pixel values"), (pixels[:, 0], "float pixel"),
                             (torch.rand(4, 3, 28, 28), "have 3 channels; the model takes 1"),
                             (torch.rand(4, 1, 32, 32), "are 32x32; the model takes 28x28")):
        with pytest.raises(ConfigError, match=says):
            quept.evaluate_accuracy(vit, bad_pixels, labels, [3], progress=False)
    for bad_labels, says in ((labels.float(), "labels must be \\(N,\\) integer class indices"),
                             (labels + 20, "labels run from 2[0-9] to 2[0-9]; the model has "
                                           "classes 0..9")):
        with pytest.raises(ConfigError, match=says):
            quept.evaluate_accuracy(vit, pixels, bad_labels, [3], progress=False)
    with pytest.raises(ConfigError, match="calibration inputs are 32x32; the model takes 28x28"):
        quept.calibrate(vit, torch.rand(2, 1, 32, 32), quept.CalibConfig(n_samples=2),
                        progress=False)
    with pytest.raises(ConfigError, match="a vit model is evaluated by quept.evaluate_accuracy"):
        quept.evaluate(vit, torch.randint(0, 5, (2, 8)), [3], progress=False)

    bert = quept.prepare(tiny_bert(), SPEC)
    ids = torch.randint(0, 32, (3, 10))
    with pytest.raises(ConfigError, match="a bert-encoder model is evaluated by "
                                          "quept.evaluate_embeddings"):
        quept.evaluate(bert, ids, [3], progress=False)
    with pytest.raises(ConfigError, match="evaluate_embeddings takes quept.eval.Sentences"):
        quept.evaluate_embeddings(bert, ids, [3], progress=False)
    mask = torch.ones_like(ids)
    mask[1] = 0
    vocab = "token ids from 1[0-9][0-9] to 1[0-9][0-9]; the model's vocabulary is 0..31"
    for sentences, says, sensitivity_says in (
            (Sentences(ids, mask), "sentence 1 has no token", "sentence 1 has no token"),
            (Sentences(ids + 100, torch.ones_like(ids)), vocab, vocab),
            # the objective's own shape check comes first in the sensitivity
            (Sentences(ids, mask[:, :9]), "of one shape", "must be quept.eval.Sentences")):
        with pytest.raises(ConfigError, match=says):
            quept.evaluate_embeddings(bert, sentences, [3], progress=False)
        with pytest.raises(ConfigError, match=sensitivity_says):
            quept.sensitivity(bert, sentences, progress=False)
    long = torch.randint(0, 32, (2, 80))
    with pytest.raises(ConfigError, match="calibration inputs are 80 tokens long; the model "
                                          "has 64 positions"):
        quept.calibrate(bert, long, quept.CalibConfig(n_samples=2), progress=False)


def test_head_bits_are_refused_for_a_model_without_a_vocabulary_head(tmp_path):
    from quept.export.packed import PackedFormatError
    from tests.test_encoder import tiny_bert
    from tests.test_vit import tiny_vit

    for model in (tiny_bert(), tiny_vit()):
        quept.prepare(model, SPEC)
        with pytest.raises(PackedFormatError, match=f"a {model.config.model_type} model has no "
                                                    "output head over the vocabulary"):
            quept.api.export(model, 3, tmp_path / model.config.model_type, head_bits=8)


def test_windows_past_a_decoders_context_are_refused_and_generation_past_it_warns(elastic,
                                                                                   caplog):
    """A decoder computes past its max_position_embeddings without an error, but not what it
    was trained for: a perplexity, a calibration or a sensitivity there would be measured on
    something else, so they are refused; generating past it is allowed, with a warning."""
    from quept.config import CalibConfig
    from quept.export.runtime import generate
    from tests.export.tiny import char_tokenizer

    past = torch.randint(0, 256, (1, 129))  # the tiny decoder has 128 positions
    says = r"are 129 tokens long, past the model's context of 128 tokens"
    with pytest.raises(ConfigError, match=says):
        quept.evaluate(elastic, past, [4], progress=False)
    with pytest.raises(ConfigError, match=says):
        quept.calibrate(elastic, past, CalibConfig(n_samples=1, seq_len=129, batch_size=1),
                        progress=False)
    with pytest.raises(ConfigError, match=says):
        quept.sensitivity(elastic, past, progress=False)
    assert quept.evaluate(elastic, past[:, :128], [4], progress=False)[0].ppl > 0
    quept.set_bits(elastic, 4)
    with caplog.at_level("WARNING", logger="quept.export.runtime"):
        generate(elastic, char_tokenizer(), past[:, :126], 4, warmup=False)
    assert "the prompt (126 tokens) and 4 new tokens run past the model's context of 128" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quept.export.runtime"):
        generate(elastic, char_tokenizer(), past[:, :126], 3, warmup=False)  # the last new
    assert "context" not in caplog.text  # token is never fed: 128 positions computed


def test_quantize_refuses_evaluation_windows_past_the_context_before_calibrating(tmp_path,
                                                                                  capsys):
    from quept.cli import main
    from tests.export.tiny import TEXT, char_tokenizer

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)  # 128 positions
    char_tokenizer().save_pretrained(base)
    (tmp_path / "t.txt").write_text(TEXT * 8)
    argv = ["quantize", "--model", str(base), "--calib-text", str(tmp_path / "t.txt"),
            "--samples", "2", "--seq-len", "32", "--epochs", "1", "--out", str(tmp_path / "el")]
    assert main([*argv, "--eval-seq-len", "512"]) == 2
    assert ("quept: error: --eval-seq-len 512 is past the model's context of 128 tokens: give "
            "128 or less (checked now, not after the calibration)") in capsys.readouterr().err
    assert not (tmp_path / "el").exists()
