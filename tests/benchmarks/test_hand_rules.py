"""benchmarks/hand_rules.py: rules of thumb and the allocator at the same stored bits."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import hand_rules  # noqa: E402

from tests.export.tiny import TEXT, elastic_folder, hf_folder  # noqa: E402


def test_rules_cover_every_layer_of_a_llama_decoder():
    names = [f"model.layers.{i}.{ln}" for i in range(6)
             for ln in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    layers = dict.fromkeys(names)
    from quept.nn.switch import plan_widths

    for label, rule in hand_rules.rules(6, "model.layers").items():
        widths = plan_widths(layers, rule)
        assert len(set(widths.values())) == 2, label  # a base width and one other
    edges = plan_widths(layers, hand_rules.rules(6, "model.layers")[
        "first and last two blocks +1 (W3 base)"])
    assert {int(n.split(".")[2]) for n, b in edges.items() if b == 4} == {0, 1, 4, 5}


def test_rules_and_allocator_on_a_tiny_model(tmp_path, capsys):
    base = hf_folder(tmp_path / "hf")
    folder = elastic_folder(tmp_path / "el", base)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 8)
    out = tmp_path / "r.json"
    res = hand_rules.main(["--elastic", str(folder), "--text", str(text), "--calib-text",
                           str(text), "--samples", "4", "--check-samples", "2", "--windows", "2",
                           "--seq-len", "32", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert len(res["rows"]) == 5
    for row in res["rows"]:
        # the allocator is held to the rule's budget, never above it
        assert row["allocator_bits_per_weight"] <= row["rule_bits_per_weight"] + 1e-9
        assert row["rule_ppl"] > 0 and row["allocator_ppl"] > 0
        lo, hi = row["ratio_95"]
        assert lo <= hi
        assert len(row["window_nll"]["rule"]) == 2
    u = {b: res["uniform"][str(b)]["bits_per_weight"] for b in (2, 3, 4)}
    down = res["rows"][0]  # a W3 base with some layers at W4 stores between the two
    assert u[3] < down["rule_bits_per_weight"] < u[4]
    assert down["rule_widths"] == {"3": 12, "4": 2}  # 2 blocks: their down projections
    assert "| down +1 (W3 base) |" in capsys.readouterr().out
