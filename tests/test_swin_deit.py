"""DeiT and Swin image classifiers: the families' blocks and linears, calibration on pixel values
(Swin: per-stage block arguments and the float patch merging between stages), width switching,
elastic save/load and packed export, on tiny random models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import quept
from quept.calib import capture_block_inputs
from quept.config import CalibConfig, ElasticSpec
from quept.models import UnsupportedModelError, family_for
from quept.nn import ElasticLinear, elastic_layers
from quept.search.budget import layer_bits
from quept.search.table import LayerShape

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)
KINDS = ("deit", "deit-teacher", "swin")
N_BLOCKS = {"deit": 2, "deit-teacher": 2, "swin": 4}


def tiny(kind: str, seed: int = 0):
    """A tiny random image classifier: 32 x 32 x 3 pixels, 10 classes."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "swin":
        cfg = tf.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=32,
                            depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=10,
                            initializer_range=0.1)
        net = tf.SwinForImageClassification(cfg)
    else:
        cfg = tf.DeiTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            num_labels=10, initializer_range=0.1)
        cls = tf.DeiTForImageClassificationWithTeacher if kind == "deit-teacher" else (
            tf.DeiTForImageClassification)
        net = cls(cfg)
    return net.eval().requires_grad_(False)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_wraps_the_block_linears_and_keeps_the_float_logits(kind):
    x = images(3)
    want = logits(tiny(kind), x)
    model = quept.prepare(tiny(kind), SPEC)
    fam = family_for(model)
    assert fam.name == kind.split("-")[0] and fam.task == "image-classification"
    layers = elastic_layers(model)
    assert len(layers) == N_BLOCKS[kind] * 6
    paths = fam.block_paths(model)
    assert set(layers) == {f"{p}.{n}" for p in paths for n in fam.linears}
    assert all(isinstance(model.get_submodule(n), ElasticLinear) for n in layers)
    floats = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert floats and not any(n.startswith(tuple(paths)) for n in floats)  # heads, merging
    if kind == "swin":
        assert paths[2] == "swin.encoder.layers.1.blocks.0"
        assert "swin.encoder.layers.0.downsample.reduction" in floats
        assert [fam.block_exit(model, i) is not None for i in range(4)] == [0, 1, 0, 0]
    quept.set_bits(model, None)
    assert torch.equal(logits(model, x), want)
    quept.set_bits(model, 3)
    assert {m.bits for m in layers.values()} == {3}
    assert not torch.equal(logits(model, x), want)


def test_swin_blocks_get_their_own_stage_arguments():
    model = quept.prepare(tiny("swin"), SPEC)
    x0, kwargs = capture_block_inputs(model, family_for(model), images(5), batch_size=2)
    assert x0.shape == (5, 64, 32)  # 8 x 8 patches of width 32
    assert [k["input_dimensions"] for k in kwargs] == [(8, 8), (8, 8), (4, 4), (4, 4)]


# The teacher variant has DeiT's blocks: one stream mode is enough for it.
@pytest.mark.parametrize(("kind", "stream"), [(k, s) for k in KINDS for s in ("merged", "per-group")
                                              if (k, s) != ("deit-teacher", "merged")])
def test_calibration_orders_the_widths(kind, stream):
    model = quept.prepare(tiny(kind), replace(SPEC, stream=stream))
    x = images(12)
    cfg = CalibConfig(n_samples=8, seq_len=1, batch_size=4, epochs=2)
    reports = quept.calibrate(model, x[:8], cfg, progress=False)
    assert [r.block for r in reports] == list(range(N_BLOCKS[kind]))
    low = reports[0].bits.index(min(reports[0].bits))
    assert sum(r.loss_after[low] for r in reports) < sum(r.loss_before[low] for r in reports)
    quept.set_bits(model, None)
    ref = logits(model, x[8:])
    err = {}
    for b in (2, 4):
        quept.set_bits(model, b)
        err[b] = (logits(model, x[8:]) - ref).pow(2).mean().item()
    assert err[4] < err[2]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_packed_export_keep_the_logits(tmp_path, kind):
    base = tmp_path / kind
    tiny(kind).save_pretrained(base)
    model, tok = quept.load_model(base)
    assert tok is None
    quept.prepare(model, SPEC)
    with torch.no_grad():
        for m in elastic_layers(model).values():
            m.lora_u.normal_(0, 0.02)
    x = images(4, seed=1)
    quept.set_bits(model, 4)
    want = logits(model, x)
    quept.save(model, tmp_path / "el", quept.QuEPTConfig(spec=SPEC))
    loaded, _ = quept.load(tmp_path / "el")
    assert list(elastic_layers(loaded)) == list(elastic_layers(model))
    quept.set_bits(loaded, 4)
    assert torch.equal(logits(loaded, x), want)
    quept.set_bits(loaded, 2)
    assert not torch.equal(logits(loaded, x), want)
    summary = quept.api.export(loaded, 4, tmp_path / "w4")
    packed, _ = quept.api.load_packed(tmp_path / "w4")
    torch.testing.assert_close(logits(packed, x), want, atol=2e-3, rtol=1e-3)
    # what budgets count is what export writes, the padding of rows of 32 weights included
    assert quept.stored_bits(loaded, 4) == pytest.approx(summary["sizes"]["bits_per_weight"])
    table_bits = sum(layer_bits(LayerShape(m.out_features, m.in_features), 4, 32)
                     for m in elastic_layers(loaded).values())
    assert table_bits == 8 * summary["sizes"]["quantized_bytes"]


def test_swin_resume_after_a_stage_change_gives_the_same_model(tmp_path, monkeypatch):
    from quept.calib import loop
    from quept.nn.state import elastic_state_dict

    cfg = CalibConfig(n_samples=4, seq_len=1, batch_size=4, epochs=1)
    x = images(4)
    ref = quept.prepare(tiny("swin"), SPEC)
    quept.calibrate(ref, x, cfg, progress=False)
    real = loop.BlockCalibrator._train

    def dies_in_the_second_stage(self, i, *a, **k):
        if i == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i, *a, **k)

    monkeypatch.setattr(loop.BlockCalibrator, "_train", dies_in_the_second_stage)
    with pytest.raises(KeyboardInterrupt):
        quept.calibrate(quept.prepare(tiny("swin"), SPEC), x, cfg, checkpoint_dir=tmp_path,
                        progress=False)
    monkeypatch.setattr(loop.BlockCalibrator, "_train", real)
    resumed = quept.prepare(tiny("swin"), SPEC)
    reports = quept.calibrate(resumed, x, cfg, checkpoint_dir=tmp_path, progress=False)
    assert [r.block for r in reports] == [0, 1, 2, 3]
    sr, sx = elastic_state_dict(ref), elastic_state_dict(resumed)
    assert sr.keys() == sx.keys() and all(torch.equal(sr[k], sx[k]) for k in sr)


def test_an_unsupported_model_type_is_refused_by_name():
    from transformers import Swinv2Config, Swinv2ForImageClassification

    cfg = Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                       num_heads=[1, 1], window_size=4, num_labels=10)
    with pytest.raises(UnsupportedModelError, match=r"'swinv2' is not supported.*'deit'.*'swin'"):
        quept.prepare(Swinv2ForImageClassification(cfg), SPEC)


def test_packed_export_of_a_model_built_in_memory_loads(tmp_path):
    """A DeiT classifier's auto class has two candidates; the packed folder's config names
    the model's own class even when the model never went through save_pretrained."""
    model = quept.prepare(tiny("deit-teacher"), SPEC)
    assert not model.config.architectures
    quept.set_bits(model, 4)
    x = images(2)
    quept.api.export(model, 4, tmp_path / "w4", scale_dtype="float32")
    packed, _ = quept.api.load_packed(tmp_path / "w4")
    assert type(packed).__name__ == "DeiTForImageClassificationWithTeacher"
    torch.testing.assert_close(logits(packed, x), logits(model, x), atol=2e-3, rtol=1e-3)
