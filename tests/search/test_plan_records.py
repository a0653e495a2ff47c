"""A plan, a sensitivity table or a kept cache made for one model is not taken for another's;
budgets are read exactly; plan files are checked as they are read."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import quept
from quept.api import ArtifactError
from quept.api.mixed import cached_sensitivity, plan_record
from quept.cli import main
from quept.config import ConfigError, ElasticSpec
from quept.search import Plan, SensitivityConfig
from quept.search.budget import parse_size, shape_table
from quept.search.plan_files import read_plan
from tests.conftest import tiny_model
from tests.export.tiny import TEXT, char_tokenizer, elastic_folder, elastic_tiny, hf_folder


def test_sizes_are_read_exactly_and_bits_are_not_bytes():
    assert parse_size("32.032kB") == 32032 and parse_size("1.001kB") == 1001
    assert parse_size("60mb") == parse_size("60 MB") == 60_000_000
    with pytest.raises(ConfigError, match="'Mb' reads as bits, and budgets are bytes: write MB"):
        parse_size("60Mb")
    with pytest.raises(ConfigError, match="far past any model's size"):
        parse_size("1e400")


@pytest.mark.parametrize("edit, says", [
    ({"bits_per_weight": float("nan")}, "'bits_per_weight' must be a positive finite number"),
    ({"stored_bytes": 1e999}, "'stored_bytes' must be a positive finite number"),
    ({"bits": {"*": 99}}, "layer \\*: bit-width 99 is outside 2..8"),
    ({"budget": {"avg_bits": "abc"}}, "'budget' must map avg_bits / max_bytes to numbers"),
])
def test_a_damaged_plan_record_is_refused_as_it_is_read(edit, says):
    d = plan_record(elastic_tiny(), {"*": 4}).to_dict()
    with pytest.raises(ConfigError, match=says):
        Plan.from_dict({**d, **edit})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two elastic folders with the same layer names: a tiny model and one four times its
    size; a plan of the first, saved."""
    root = tmp_path_factory.mktemp("records")
    elastic_folder(root / "small", hf_folder(root / "base"))
    big = root / "base-big"
    tiny_model(max_position_embeddings=1024, hidden_size=128, intermediate_size=256
               ).save_pretrained(big)
    char_tokenizer().save_pretrained(big)
    elastic_folder(root / "big", big)
    small, _ = quept.load(root / "small")
    plan_record(small, {"*": 4, "*.mlp.down_proj": 3}).save(root / "plan.json")
    (root / "text.txt").write_text(TEXT * 8)
    return root


def test_a_plan_made_for_another_model_is_refused_everywhere(folders, capsys):
    plan = read_plan(folders / "plan.json")
    small, _ = quept.load(folders / "small")
    quept.set_bits(small, plan)  # its own model: taken, from the object or the file
    quept.set_bits(small, folders / "plan.json")
    assert quept.stored_bits(small, str(folders / "plan.json")) == plan.bits_per_weight
    big, _ = quept.load(folders / "big")
    before = {n: m.bits for n, m in quept.nn.elastic_layers(big).items()}
    says = "records 73,728 weights but gives 294,912 on this model: it was made for another model"
    for call in (lambda: quept.set_bits(big, plan), lambda: quept.set_bits(big, plan.to_dict()),
                 lambda: quept.set_bits(big, folders / "plan.json"),
                 lambda: quept.api.export(big, plan, folders / "big-w")):
        with pytest.raises(ConfigError, match=says):
            call()
    assert {n: m.bits for n, m in quept.nn.elastic_layers(big).items()} == before
    for argv in (["eval", str(folders / "big"), "--plan", str(folders / "plan.json"), "--text",
                  str(folders / "text.txt"), "--windows", "1", "--seq-len", "64"],
                 ["export", str(folders / "big"), "--plan", str(folders / "plan.json"),
                  "--out", str(folders / "big-w")]):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err
    assert not (folders / "big-w").exists()


def test_a_table_of_another_model_is_refused_and_a_damaged_cache_measured_again(folders,
                                                                               caplog):
    small, _ = quept.load(folders / "small")
    big, _ = quept.load(folders / "big")
    spec = small.quept_spec
    table = shape_table(quept.nn.elastic_layers(big),
                        {b: spec.group_size_for(b) for b in spec.bits})
    with pytest.raises(ArtifactError, match="layer model.layers.0.self_attn.q_proj is 128 x 128 "
                                            "in the table, 64 x 64 in the model"):
        quept.plan(small, table, avg_bits=4.0, granularity="layer")
    narrow = quept.prepare(quept.load_model(folders / "base")[0], ElasticSpec(
        bit_groups=((7, 8), (5, 6), (3, 4)), ranks=(2, 2, 2), merge_weights=(1 / 3,) * 3,
        default_group_size=32))
    own = shape_table(quept.nn.elastic_layers(small),
                      {b: spec.group_size_for(b) for b in spec.bits})
    with pytest.raises(ArtifactError, match=r"it has width\(s\) \[2\], which the model's spec"):
        quept.plan(narrow, own, avg_bits=4.0, granularity="layer")
    cfg = SensitivityConfig(n_samples=2, seq_len=16, n_probes=1, batch_size=2)
    ids = torch.randint(2, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    cache = folders / "sensitivity.json"
    quept.sensitivity(small, ids, cfg, cache=cache, progress=False)
    assert cached_sensitivity(small, ids, cfg, cache) is not None
    d = json.loads(cache.read_text())  # edited, its fingerprint kept
    for layer in d["layers"].values():
        layer["out"] *= 4
    cache.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        assert cached_sensitivity(small, ids, cfg, cache) is None
    assert "does not describe the model its fingerprint names" in caplog.text


def test_plan_files_that_are_not_plans_are_named(folders, tmp_path):
    from quept.cli.common import plan_paths

    for folder, held in (("small", "an elastic model"), ("base", "a Hugging Face model")):
        with pytest.raises(ConfigError, match=f"--plan .*{folder} holds {held}, not plans"):
            plan_paths([str(folders / folder)])
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"plan": {"*": 4}, "bits": {"*": 3}}))
    with pytest.raises(ConfigError, match="holds both 'plan' and 'bits'"):
        read_plan(both)


def test_several_byte_budgets_name_their_files_without_spaces():
    from quept.cli.plan import _sizes

    assert [t for t, _ in _sizes("40kB, 50 kB")] == ["40kB", "50kB"]
