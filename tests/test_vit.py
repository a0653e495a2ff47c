"""Vision transformers: the ViT family, calibration on pixel values, top-1 per width, save/load,
packed export, and what the command line refuses, on a tiny random ViT."""

from __future__ import annotations

import pytest
import torch

import quept
from quept.cli import main
from quept.config import CalibConfig, ElasticSpec
from quept.eval import top1_accuracy
from quept.models import family_for
from quept.nn import ElasticLinear, elastic_layers

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)


def tiny_vit(seed: int = 0, image_size: int = 28, channels: int = 1):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=7, num_channels=channels, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    num_labels=10, initializer_range=0.1)
    return ViTForImageClassification(cfg).eval().requires_grad_(False)


def test_family_wraps_the_block_linears_only():
    model = quept.prepare(tiny_vit(), SPEC)
    fam = family_for(model)
    assert fam.name == "vit" and fam.task == "image-classification" and not fam.is_text
    assert len(elastic_layers(model)) == 2 * 6
    assert isinstance(model.vit.layers[1].mlp.fc2, ElasticLinear)
    assert not isinstance(model.classifier, ElasticLinear)


def test_calibrate_on_pixels_then_accuracy_per_width():
    model = quept.prepare(tiny_vit(), SPEC)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 28, 28, generator=gen)
    quept.set_bits(model, None)
    labels = model(pixel_values=x).logits.argmax(-1)  # the float model is right by definition
    cfg = CalibConfig(n_samples=16, seq_len=17, batch_size=4, epochs=2)
    reports = quept.calibrate(model, x[:16], cfg, progress=False)
    low = reports[0].bits.index(min(reports[0].bits))
    assert all(r.loss_after[low] < r.loss_before[low] for r in reports)
    rows = quept.evaluate_accuracy(model, x, labels, [None, 2, 8], rtn=True, progress=False)
    acc = {r.bits: r for r in rows}
    assert acc[None].accuracy == 1.0 and acc[None].accuracy_rtn is None
    assert acc[8].accuracy >= acc[2].accuracy and acc[8].accuracy_rtn is not None
    assert acc[2].bits_per_weight == pytest.approx(2 + 18 / 32)
    with pytest.raises(ValueError, match="24 images but 3 labels"):
        top1_accuracy(model, x, labels[:3])


def test_save_load_and_packed_export_keep_the_logits(tmp_path):
    base = tmp_path / "vit"
    tiny_vit().save_pretrained(base)
    model, tok = quept.load_model(base)
    assert tok is None
    quept.prepare(model, SPEC)
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.lora_u.normal_(0, 0.02)
    x = torch.randn(4, 1, 28, 28)
    quept.set_bits(model, 4)
    want = model(pixel_values=x).logits
    quept.save(model, tmp_path / "el", quept.QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")
    quept.set_bits(loaded, 4)
    assert torch.equal(loaded(pixel_values=x).logits, want)
    quept.api.export(loaded, 4, tmp_path / "w4")
    packed, _ = quept.api.load_packed(tmp_path / "w4")
    torch.testing.assert_close(packed(pixel_values=x).logits, want, atol=2e-3, rtol=1e-3)


def test_exports_carry_the_image_processor(tmp_path):
    """A ViT folder's image processor goes with every export, as the tokenizer does with a
    text model's, so other runtimes can feed the export images."""
    import json

    base = tmp_path / "vit"
    tiny_vit().save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps({  # as ViTImageProcessor writes
        "image_processor_type": "ViTImageProcessor", "size": {"height": 28, "width": 28},
        "image_mean": [0.5], "image_std": [0.5], "do_resize": True, "do_normalize": True}))
    model, _ = quept.load_model(base)
    quept.prepare(model, SPEC)
    quept.save(model, tmp_path / "el", quept.QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")  # the processor is read from its base model
    outs = {"quept": tmp_path / "w4", "compact": tmp_path / "compact"}
    quept.api.export(loaded, 4, outs["quept"])
    quept.api.save_compact(loaded, outs["compact"])
    if _has("compressed_tensors"):
        outs["compressed-tensors"] = tmp_path / "ct"
        quept.api.export(loaded, 4, outs["compressed-tensors"], "compressed-tensors")
    if _has("onnxscript") and _has("onnxruntime"):
        outs["onnx"] = tmp_path / "onnx"
        quept.api.export(loaded, 4, outs["onnx"], "onnx")
    for kind, out in outs.items():
        assert (out / "preprocessor_config.json").read_bytes() == (
            base / "preprocessor_config.json").read_bytes(), kind
    packed, _ = quept.api.load_packed(outs["quept"])  # and what was exported from an export
    quept.api.export(quept.api.load_compact(outs["compact"])[0], 4, tmp_path / "again")
    assert (tmp_path / "again" / "preprocessor_config.json").is_file()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def fake_fashion_cache(cache, n_train: int = 96, n_test: int = 40) -> None:
    """Fashion-MNIST-shaped splits written where quept caches the real ones."""
    from safetensors.torch import save_file

    from quept.data.fashion_mnist import FASHION_DIRNAME

    gen = torch.Generator().manual_seed(0)
    (cache / FASHION_DIRNAME).mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        save_file({"images": torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8),
                   "labels": torch.randint(0, 10, (n,), generator=gen)},
                  str(cache / FASHION_DIRNAME / f"{split}.safetensors"))


def test_cli_quantize_eval_and_export_on_fashion_mnist_images(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUEPT_CACHE", str(tmp_path / "cache"))
    fake_fashion_cache(tmp_path / "cache")
    base, out = tmp_path / "vit", tmp_path / "el"
    tiny_vit().save_pretrained(base)
    assert main(["quantize", "--model", str(base), "--out", str(out), "--samples", "32",
                 "--group-size", "32", "--ranks", "2,2,2,2", "--eval-bits", "2,8",
                 "--eval-images", "40"]) == 0
    shown = capsys.readouterr().out
    assert "Top-1 accuracy on the Fashion-MNIST test split (40 images)" in shown
    assert "RTN top-1" in shown and "W2" in shown and "W8" in shown
    meta = quept.api.read_meta(out)
    calib = meta["config"]["calib"]
    assert calib["n_samples"] == 32 and calib["batch_size"] == 32
    capsys.readouterr()
    assert main(["eval", str(out), "--bits", "4", "--images", "40", "--rtn", "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    rows = {r["bits"]: r for r in result["accuracy_rows"]}
    assert result["images"] == 40 and set(rows) == {None, 4}
    assert 0 <= rows[4]["accuracy"] <= 1 and rows[4]["accuracy_rtn"] is not None
    assert main(["export", str(out), "--bits", "4", "--out", str(tmp_path / "w4")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "w4"), "--images", "40", "--json"]) == 0
    packed = __import__("json").loads(capsys.readouterr().out)["accuracy_rows"][0]
    assert packed["bits"] == 4 and packed["accuracy"] == pytest.approx(rows[4]["accuracy"],
                                                                       abs=1 / 40)
    # biases are not quantized weights: the packed count is the elastic table's
    assert packed["bits_per_weight"] == pytest.approx(rows[4]["bits_per_weight"]) == 4 + 20 / 32
    (tmp_path / "x.txt").write_text("a text file that exists, for a model that reads none")
    assert main(["eval", str(out), "--text", str(tmp_path / "x.txt")]) == 2
    assert "--text: text options, but the model is an image classifier" in capsys.readouterr().err

    # mixed precision: the cost is the KL of each image's class distribution
    plan_path = tmp_path / "p.json"
    assert main(["plan", str(out), "--avg-bits", "3.5", "--out", str(plan_path), "--samples",
                 "32", "--check-samples", "16", "--json"]) == 0
    plan = __import__("json").loads(capsys.readouterr().out)
    assert plan["objective"] == "class-kl" and plan["bits_per_weight"] <= 3.5
    assert main(["plan", str(out), "--avg-bits", "3.5", "--dry-run", "--samples", "32",
                 "--check-samples", "16"]) == 0
    shown = capsys.readouterr().out
    assert "sensitivity table: cached" in shown and "on 16 images each" in shown
    assert main(["eval", str(out), "--plan", str(plan_path), "--plan", "*=4", "--images", "40",
                 "--json"]) == 0
    plans = {p["path"]: p for p in __import__("json").loads(capsys.readouterr().out)["plans"]}
    assert plans["*=4"]["accuracy"] == pytest.approx(rows[4]["accuracy"])
    assert plans["*=4"]["kl_to_float"] > 0 and plans[str(plan_path)]["kl_to_float"] > 0
    assert main(["info", str(out)]) == 0
    assert "in-context sweeps cached on 16 check images" in capsys.readouterr().out
    assert main(["plan", str(out), "--avg-bits", "3", "--out", str(tmp_path / "q.json"),
                 "--calib-text", str(tmp_path / "x.txt")]) == 2
    assert "--calib-text: text options" in capsys.readouterr().err


def test_cli_refuses_what_an_image_classifier_cannot_do(tmp_path, capsys):
    base = tmp_path / "vit32"
    tiny_vit(image_size=32, channels=3).save_pretrained(base)
    assert main(["quantize", "--model", str(base), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "images are Fashion-MNIST (28 x 28, 1 channel, 10 classes)" in err
    assert "takes 32 x 3-channel images" in err
    model, _ = quept.load_model(base)
    quept.prepare(model, SPEC)
    quept.save(model, tmp_path / "el", quept.QuEPTConfig(spec=SPEC))
    assert main(["plan", str(tmp_path / "el"), "--avg-bits", "3", "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "images are Fashion-MNIST (28 x 28, 1 channel, 10 classes)" in capsys.readouterr().err
