"""Built-in zero-shot tasks and their lm-evaluation-harness bridge, scored against a direct
computation of the same log-likelihoods on a tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import quept
from quept.cli import main
from quept.config import ConfigError
from quept.data.tasks import (
    NotEnoughItemsError,
    last_word_items,
    next_sentence_items,
    sentences,
    task_documents,
)
from quept.nn import elastic_layers
from tests.conftest import tiny_model
from tests.export.tiny import SPEC, char_tokenizer, randomize

pytest.importorskip("lm_eval", reason="the lmeval extra is part of the test install")

WORDS = ("the a of house letter walk garden ball sister mother father evening morning "
         "carriage visit dinner dance fortune marriage conversation window").split()


def synthetic_text(n_paragraphs: int = 30, seed: int = 0) -> str:
    """Paragraphs of four sentences of 8-12 words each, blank-line separated."""
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paragraphs):
        sents = []
        for _ in range(4):
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 12))]
            sents.append(" ".join(words).capitalize() + rng.choice(".!?"))
        paras.append("\n".join(sents))
    return "\n\n".join(paras)


def test_sentences_split_at_ends_but_not_after_titles():
    p = 'Mr. Darcy bowed. "Indeed!" said she? Mrs. Bennet wept; St. James was quiet. Yes.'
    assert sentences(p) == ["Mr. Darcy bowed.", '"Indeed!" said she?',
                            "Mrs. Bennet wept; St. James was quiet.", "Yes."]


def test_last_word_items_end_each_paragraph():
    text = synthetic_text()
    items = last_word_items(text)
    assert len(items) == 30
    for item, para in zip(items, text.split("\n\n")):
        flat = " ".join(para.split())
        assert flat.startswith(item["context"]) and item["target"].isalpha()
        assert flat[:-1].endswith(" " + item["target"])  # the word before the final stop


def test_next_sentence_items_hold_the_true_sentence_at_gold():
    text = synthetic_text()
    items = next_sentence_items(text, seed=3)
    assert items == next_sentence_items(text, seed=3)  # deterministic
    assert items != next_sentence_items(text, seed=4)
    flat = [sentences(" ".join(p.split())) for p in text.split("\n\n")]
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        true = choices[item["gold"]]
        home = [s for s in flat if true in s and item["context"].split(". ")[-1] in " ".join(s)]
        assert home, "the true next sentence comes from the context's paragraph"
        assert " ".join(home[0]).find(item["context"]) < " ".join(home[0]).find(true)


def test_too_short_a_text_is_refused_with_the_count():
    with pytest.raises(NotEnoughItemsError, match="yields 3 last-word items"):
        task_documents("last-word", synthetic_text(3))
    with pytest.raises(ValueError, match="unknown built-in task 'lambada'"):
        task_documents("lambada", synthetic_text())


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of the continuation's token log-probabilities after the context, and whether greedy
    decoding gives every one of them (the continuation's tokens are those of the whole text
    after the context's)."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    cont = whole[len(ctx):]
    logits = model(torch.tensor([whole[:-1]])).logits[0, len(ctx) - 1:]
    logp = torch.log_softmax(logits.double(), -1)
    picked = logp[torch.arange(len(cont)), torch.tensor(cont)]
    return picked.sum().item(), bool((logits.argmax(-1) == torch.tensor(cont)).all())


@pytest.fixture(scope="module")
def lm():
    model = randomize(quept.prepare(tiny_model(max_position_embeddings=1024), SPEC))
    return model, char_tokenizer()


def test_runner_scores_equal_a_direct_computation(lm):
    from quept.eval.harness import TaskRunner

    model, tok = lm
    text = synthetic_text()
    quept.set_bits(model, 3)
    scores = TaskRunner(model, tok, ["last-word", "next-sentence"], text=text, limit=12,
                        batch_size=5, per_item=True)()
    words = last_word_items(text)[:12]
    ll = [loglikelihood(model, tok, w["context"], " " + w["target"]) for w in words]
    lw = scores["last-word"]
    assert lw["items"] == 12
    assert lw["perplexity"] == pytest.approx(math.exp(-sum(x for x, _ in ll) / 12), rel=1e-4)
    assert lw["acc"] == pytest.approx(sum(g for _, g in ll) / 12)
    assert lw["per_item"] == {"acc": [float(g) for _, g in ll]}
    acc = acc_norm = 0
    hits = []
    for item in next_sentence_items(text)[:12]:
        lls = [loglikelihood(model, tok, item["context"], " " + c)[0] for c in item["choices"]]
        acc += max(range(4), key=lambda k: lls[k]) == item["gold"]
        hits.append(float(max(range(4), key=lambda k: lls[k]) == item["gold"]))
        norm = [x / len(c) for x, c in zip(lls, item["choices"])]
        acc_norm += max(range(4), key=lambda k: norm[k]) == item["gold"]
    ns = scores["next-sentence"]
    assert (ns["items"], ns["acc"], ns["acc_norm"]) == (12, acc / 12, acc_norm / 12)
    assert ns["acc_stderr"] == pytest.approx(math.sqrt(ns["acc"] * (1 - ns["acc"]) / 12))
    assert ns["per_item"]["acc"] == hits and sum(ns["per_item"]["acc_norm"]) == acc_norm
    quept.set_bits(model, None)


def test_paired_difference_is_the_mean_difference_with_its_error():
    from quept.eval.harness import paired_difference

    assert paired_difference([1, 1, 0, 1], [1, 1, 0, 1]) == (0.0, 0.0)
    mean, err = paired_difference([1, 1, 1, 0], [0, 1, 1, 0])  # differences 1, 0, 0, 0
    assert mean == 0.25 and err == pytest.approx(math.sqrt(0.25 / 4))
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1, 0], [1])


def test_evaluate_tasks_follows_the_width(lm):
    model, tok = lm
    rows = quept.evaluate_tasks(model, tok, ["last-word"], [None, 2, 8], rtn=True,
                                text=synthetic_text(), limit=6)
    assert [r.bits for r in rows] == [None, 2, 8]
    ppl = {r.bits: r.scores["last-word"]["perplexity"] for r in rows}
    nll = {b: math.log(p) for b, p in ppl.items()}  # a random model: huge perplexities
    assert nll[2] != nll[None] and nll[8] == pytest.approx(nll[None], rel=0.02)
    assert rows[0].scores_rtn is None and rows[1].scores_rtn["last-word"]["items"] == 6
    assert rows[1].scores_rtn["last-word"]["perplexity"] != ppl[2]
    assert model.model.layers[0].self_attn.q_proj.bits is None  # left float


def test_runner_refuses_bad_input(lm, tmp_path):
    from quept.eval.harness import TaskRunner

    model, tok = lm
    text = synthetic_text()
    with pytest.raises(ConfigError, match="unknown task no_such_task"):
        TaskRunner(model, tok, ["no_such_task"], text=text)
    with pytest.raises(ConfigError, match="named twice"):
        TaskRunner(model, tok, ["last-word", "last-word"], text=text)
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        TaskRunner(model, tok, ["last-word"], text=text, limit=0)
    with pytest.raises(ConfigError, match="need an evaluation text"):
        TaskRunner(model, tok, ["last-word"])
    with pytest.raises(FileNotFoundError, match="task folder"):
        TaskRunner(model, tok, ["last-word"], text=text, include_path=tmp_path / "none")
    (tmp_path / "hub.yaml").write_text(  # a task over a hub dataset this machine does not hold
        "task: hub_task\ndataset_path: quept-tests/no-such-dataset\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    with pytest.raises(ConfigError, match="could not load the data of task.s. hub_task"):
        TaskRunner(model, tok, ["hub_task"], include_path=tmp_path)


def test_items_longer_than_the_models_context_are_refused_by_name():
    """lm-evaluation-harness stops on a bare assert when a continuation is longer than the
    model's context; the runner names the task, the item and both lengths first."""
    from quept.eval.harness import TaskRunner

    short = randomize(quept.prepare(tiny_model(max_position_embeddings=32), SPEC))
    tok, text = char_tokenizer(), synthetic_text()
    with pytest.raises(ConfigError, match=r"task next-sentence, item 0: a continuation of \d+ "
                                          "tokens does not fit the model's context of 32 tokens"):
        TaskRunner(short, tok, ["next-sentence"], text=text)
    runner = TaskRunner(short, tok, ["last-word"], text=text, limit=4)  # one word fits

    def harness_assert(*args, **kwargs):
        assert len("continuation") <= 3

    runner._evaluate = harness_assert
    with pytest.raises(RuntimeError, match=r"lm-evaluation-harness stopped on a failed check "
                                           r"while scoring last-word: `assert len.*context is "
                                           "32 tokens"):
        runner()


def test_a_task_yaml_of_ones_own_runs_from_its_folder(lm, tmp_path):
    from quept.eval.harness import TaskRunner

    model, tok = lm
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{w} and", "a": w}) + "\n" for w in WORDS))
    (tmp_path / "echo.yaml").write_text(
        "task: echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{\" \" + a}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    scores = TaskRunner(model, tok, ["echo"], include_path=tmp_path)()
    assert scores["echo"]["items"] == len(WORDS)
    direct = sum(loglikelihood(model, tok, f"{w} and", " " + w)[1] for w in WORDS)
    assert scores["echo"]["acc"] == pytest.approx(direct / len(WORDS))


def test_cli_eval_tasks_on_an_elastic_and_a_packed_folder(tmp_path, capsys):
    from tests.export.tiny import elastic_folder, hf_folder

    base = hf_folder(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (base / "config.json").write_text(json.dumps(cfg))
    folder = elastic_folder(tmp_path / "elastic", base)
    text = tmp_path / "text.txt"
    text.write_text(synthetic_text())
    argv = ["eval", str(folder), "--tasks", "last-word,next-sentence", "--text", str(text),
            "--limit", "4", "--bits", "2,8", "--rtn"]
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["bits"]: r for r in res["task_rows"]}
    assert sorted(rows, key=str) == [2, 8, None]
    assert rows[8]["scores"]["next-sentence"]["items"] == 4
    assert rows[2]["scores_rtn"]["last-word"]["items"] == 4
    # Each width's accuracies also against the float model's on the same items (paired): the
    # mean difference is the difference of the accuracies; per-item results are not printed.
    for scores in (rows[2]["scores"], rows[2]["scores_rtn"], rows[8]["scores"]):
        ns, ref = scores["next-sentence"], rows[None]["scores"]["next-sentence"]
        assert ns["acc_norm_vs_float"] == pytest.approx(ns["acc_norm"] - ref["acc_norm"])
        assert ns["acc_norm_vs_float_stderr"] >= 0 and "per_item" not in ns
    assert "acc_vs_float" not in rows[None]["scores"]["last-word"]
    assert "per_item" not in rows[None]["scores"]["last-word"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "last-word acc" in table and "RTN next-sentence acc_norm" in table
    assert "in brackets: points against the float model" in table
    assert "acc_vs_float" not in table

    model, _ = quept.load(folder)
    widths = {n: (2, 8)[i % 2] for i, n in enumerate(elastic_layers(model))}
    quept.plan_record(model, widths).save(tmp_path / "plan.json")
    assert main(["eval", str(folder), "--tasks", "last-word", "--text", str(text), "--limit", "4",
                 "--plan", str(tmp_path / "plan.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task_rows"] == [] and res["plan"]["scores"]["last-word"]["items"] == 4
    assert "per_item" not in res["plan"]["scores"]["last-word"]
    assert res["plan"]["bits_per_weight"] == pytest.approx(quept.stored_bits(model, widths))
    nll = math.log(res["plan"]["scores"]["last-word"]["perplexity"])
    assert nll != math.log(rows[8]["scores"]["last-word"]["perplexity"])
    all8 = {n: 8 for n in widths}
    quept.plan_record(model, all8).save(tmp_path / "all8.json")
    assert main(["eval", str(folder), "--tasks", "last-word", "--text", str(text), "--limit", "4",
                 "--plan", str(tmp_path / "plan.json"), "--plan", str(tmp_path / "all8.json"),
                 "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert [m["path"] for m in two["plans"]] == [str(tmp_path / "plan.json"),
                                                 str(tmp_path / "all8.json")]
    assert two["plans"][0]["scores"]["last-word"] == res["plan"]["scores"]["last-word"]
    assert two["plans"][1]["scores"]["last-word"]["perplexity"] == pytest.approx(
        rows[8]["scores"]["last-word"]["perplexity"])  # the plan of all 8 bits is W8

    packed = tmp_path / "packed"
    assert main(["export", str(folder), "--bits", "8", "--out", str(packed)]) == 0
    capsys.readouterr()
    assert main(["eval", str(packed), "--tasks", "last-word", "--text", str(text), "--limit",
                 "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    (row,) = res["task_rows"]
    assert row["bits"] == 8 and row["scores"]["last-word"]["perplexity"] == pytest.approx(
        rows[8]["scores"]["last-word"]["perplexity"], rel=1e-3)

    for extra in (["--bits", "4"], ["--rtn", "--tasks", "last-word"]):
        assert main(["eval", str(packed), *extra]) == 2
        assert "packed model of one configuration" in capsys.readouterr().err
    assert main(["eval", str(folder), "--limit", "4"]) == 2
    assert "--limit applies with --tasks" in capsys.readouterr().err
