"""Tiny elastic encoder and ViT folders, with their packed W4 exports and compact checkpoints,
shared by the command-line tests of non-LLM models."""

from __future__ import annotations

from pathlib import Path

import quept
from quept.cli import main
from quept.config import CalibConfig, QuEPTConfig
from tests.test_encoder import SPEC, TEXT, char_bert_tokenizer, tiny_bert
from tests.test_vit import fake_fashion_cache, tiny_vit


def build_folders(root: Path) -> Path:
    """Under ``root``: bert/ and vit/ (random base models), NAME-el (prepared elastic folders,
    marked calibrated), NAME-w4 (packed W4) and NAME-c (compact) for both, Fashion-MNIST-shaped
    images in cache/ and an evaluation text eval.txt."""
    fake_fashion_cache(root / "cache")
    (root / "eval.txt").write_text(TEXT)
    tiny_bert().save_pretrained(root / "bert")
    char_bert_tokenizer().save_pretrained(root / "bert")
    tiny_vit().save_pretrained(root / "vit")
    for name in ("bert", "vit"):
        model, _ = quept.load_model(root / name)
        quept.prepare(model, SPEC)
        model.quept_calibrated = True  # describes and loads as a calibrated folder would
        quept.save(model, root / f"{name}-el", QuEPTConfig(
            spec=SPEC, calib=CalibConfig(n_samples=32, batch_size=32)))
        assert main(["export", str(root / f"{name}-el"), "--bits", "4", "--out",
                     str(root / f"{name}-w4")]) == 0
        assert main(["compact", str(root / f"{name}-el"), "--out", str(root / f"{name}-c")]) == 0
    return root


def refused(capsys, argv: list[str], *messages: str) -> str:
    """Runs ``quept ARGV``, which must exit 2 with one `quept: error:` line (no traceback)
    holding every message; returns stderr."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("quept: error: ") and "Traceback" not in err
    for m in messages:
        assert m in err, (argv, err)
    return err
