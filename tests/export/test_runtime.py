import pytest
import torch

from quept.export.runtime import generate
from tests.conftest import tiny_model

from .tiny import char_tokenizer


def test_greedy_with_cache_equals_greedy_without():
    model, tok = tiny_model(vocab_size=97), char_tokenizer()
    gen = generate(model, tok, "It is a truth", 12, stop_at_eos=False)
    ids = tok("It is a truth", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert gen.text == tok.decode(ids[0, 13:])
    assert (gen.prompt_tokens, gen.new_tokens) == (13, 12)
    assert gen.prefill_tokens_per_second > 0 and gen.decode_tokens_per_second > 0
    assert set(gen.to_dict()) >= {"text", "prefill_tokens_per_second", "decode_tokens_per_second"}


def test_stops_at_eos_and_checks_arguments():
    model, tok = tiny_model(vocab_size=97), char_tokenizer()
    model.lm_head = torch.nn.Linear(64, 97)  # untied head that always predicts </s>
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()[tok.eos_token_id] = 1.0
    gen = generate(model, tok, "abc", 10)
    assert gen.new_tokens == 1 and gen.decode_tokens_per_second is None  # nothing decoded
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, "abc", 0)
    with pytest.raises(ValueError, match="one non-empty sequence"):
        generate(model, tok, torch.zeros(2, 3, dtype=torch.long), 3)
