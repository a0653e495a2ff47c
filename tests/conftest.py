import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_config(kind: str = "llama", **kw):
    """A tiny random decoder config of the named architecture."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    base = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.1,
    )
    base.update(kw)
    return cls(**base)


def tiny_model(kind: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **kw))
    model.eval().requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")
