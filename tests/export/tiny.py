"""Tiny elastic models, a character tokenizer and model folders for the deployment tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import quept
from quept.config import CalibConfig, ElasticSpec, QuEPTConfig
from quept.nn import elastic_layers
from tests.conftest import tiny_model

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 8


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every elastic layer non-zero adapters and distinct clips, as calibration would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.lora_u.copy_(torch.randn(m.lora_u.shape, generator=gen) * 0.02)
            for p in [*m.clip_hi.values(), *m.clip_lo.values()]:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen) * 4)
    model.quept_calibrated = True  # stands in for quept.calibrate
    return model


def elastic_tiny(spec: ElasticSpec = SPEC, **kw) -> torch.nn.Module:
    return randomize(quept.prepare(tiny_model(**kw), spec))


def char_tokenizer():
    """Printable ASCII, one token per character (ids 2..96), '</s>' = 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(i): i - 30 for i in range(32, 127)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


def hf_folder(path: Path) -> Path:
    """A tiny float HF model folder with a tokenizer, made for sequences of up to 1024 tokens
    (so the CLI's default windows of 512 tokens fit its context)."""
    tiny_model(max_position_embeddings=1024).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def elastic_folder(path: Path, base: Path) -> Path:
    """An elastic folder (random adapters and clips) over the HF folder ``base``."""
    model, _ = quept.load_model(base)
    randomize(quept.prepare(model, SPEC))
    quept.save(model, path, QuEPTConfig(spec=SPEC, calib=CalibConfig(n_samples=2,
                                                                      batch_size=2)))
    return path


def run_json(capsys, argv: list[str]) -> dict:
    """Run the CLI with ``--json`` in ``argv``; it must succeed; its printed JSON object."""
    from quept.cli import main

    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)
