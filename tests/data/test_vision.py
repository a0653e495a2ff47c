"""Fashion-MNIST (idx parsing, the Debian package, the cache) and the built-in ViT's trainer."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from quept.data import fashion_mnist as fm
from quept.data import vit as vit_data
from quept.data.fetch import DataUnavailableError


def idx_bytes(t: torch.Tensor) -> bytes:
    """An idx file of ``t`` (uint8 or int32), as the dataset's own files are written."""
    code = {torch.uint8: 0x08, torch.int32: 0x0C}[t.dtype]
    head = bytes([0, 0, code, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    body = t.numpy().astype(">i4").tobytes() if t.dtype == torch.int32 else t.numpy().tobytes()
    return head + body


def fake_split_files(folder: Path, n_train: int = 64, n_test: int = 32) -> None:
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


def test_read_idx_round_trips_and_names_what_is_wrong():
    u8 = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    assert torch.equal(fm.read_idx(idx_bytes(u8)), u8)
    i32 = torch.tensor([[1, -2], [70000, 3]], dtype=torch.int32)
    assert torch.equal(fm.read_idx(idx_bytes(i32)), i32)  # big-endian on disk
    with pytest.raises(ValueError, match="two zero bytes"):
        fm.read_idx(b"\x01\x00\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="type code 0x07"):
        fm.read_idx(b"\x00\x00\x07\x01" + bytes(8))
    with pytest.raises(ValueError, match="needs 24"):
        fm.read_idx(idx_bytes(u8)[:-1])


def test_splits_are_read_from_the_package_folder_then_cached(tmp_path, monkeypatch):
    fake_split_files(tmp_path / "system" / fm._DATA_DIR)
    monkeypatch.setattr(fm, "_SYSTEM_ROOT", tmp_path / "system")
    images, labels = fm.load_fashion_mnist("train", tmp_path / "cache")
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.shape == (64,)
    cached = tmp_path / "cache" / fm.FASHION_DIRNAME
    assert sorted(p.name for p in cached.iterdir()) == ["test.safetensors", "train.safetensors"]
    monkeypatch.setattr(fm, "_SYSTEM_ROOT", tmp_path / "gone")  # the cache alone suffices now
    test_images, _ = fm.load_fashion_mnist("test", tmp_path / "cache")
    assert test_images.shape == (32, 28, 28)
    again, _ = fm.load_fashion_mnist("train", tmp_path / "cache")
    assert torch.equal(again, images)
    with pytest.raises(ValueError, match="split must be one of"):
        fm.load_fashion_mnist("validation", tmp_path / "cache")


def test_a_damaged_package_file_is_a_clear_error(tmp_path, monkeypatch):
    system = tmp_path / "system" / fm._DATA_DIR
    fake_split_files(system)
    (system / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    monkeypatch.setattr(fm, "_SYSTEM_ROOT", tmp_path / "system")
    with pytest.raises(DataUnavailableError, match="Could not read the test split"):
        fm.load_fashion_mnist("train", tmp_path / "cache")
    assert not (tmp_path / "cache" / fm.FASHION_DIRNAME).exists()


def test_the_real_dataset_from_the_debian_package():
    """Downloads the package once (31 MB) where it is not installed or cached."""
    try:
        images, labels = fm.load_fashion_mnist("test")
    except DataUnavailableError as e:
        pytest.skip(f"Fashion-MNIST unavailable here: {e}")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # the test split's published first labels


def test_pixel_values_normalise_and_refuse_wrong_input():
    px = vit_data.pixel_values(torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert px.shape == (3, 1, 28, 28)
    assert px.flatten()[0].item() == pytest.approx(-vit_data.PIXEL_MEAN / vit_data.PIXEL_STD)
    with pytest.raises(ValueError, match="expected uint8 images"):
        vit_data.pixel_values(torch.zeros(3, 28, 28))


TINY = vit_data.ViTTrainConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64,
                               patch_size=7, steps=60, batch_size=32, warmup_steps=10, lr=3e-3)


def separable_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the brightest of ten horizontal bands: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = torch.randint(0, 60, (n, 28, 28), generator=gen, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 2 + 2 * c: 4 + 2 * c] = 250
    return images, labels


@pytest.fixture
def fake_fashion(monkeypatch):
    data = {"train": separable_data(512, 0), "test": separable_data(200, 1)}
    monkeypatch.setattr(vit_data, "load_fashion_mnist", lambda split, cache_dir=None: data[split])
    return data


def test_training_step_forward_matches_the_model_forward_with_every_patch_kept():
    model = vit_data._new_model(TINY).eval()
    px = vit_data.pixel_values(separable_data(4, 0)[0])
    mine = vit_data._train_logits(model, px, 1.0, torch.Generator())
    torch.testing.assert_close(mine, model(pixel_values=px).logits, atol=1e-5, rtol=1e-5)


def test_mimetic_init_makes_query_key_products_near_the_identity():
    model = vit_data._new_model(TINY)
    vit_data._mimetic_init(model, TINY, torch.Generator().manual_seed(0))
    att = model.vit.layers[0].attention
    dh = TINY.hidden_size // TINY.heads
    qk = att.q_proj.weight[:dh].T @ att.k_proj.weight[:dh]
    assert qk.diagonal().mean() > 3 * qk.fill_diagonal_(0).abs().mean()


def test_train_vit_learns_and_records_its_recipe(fake_fashion):
    model, record = vit_data.train_vit(TINY, progress=False)
    assert record["test_accuracy"] > 0.5  # chance is 0.1
    assert record["recipe"]["steps"] == 60 and record["recipe_version"] == vit_data.RECIPE_VERSION
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_vit_model_dir_trains_once_and_retrains_a_stale_recipe(tmp_path, fake_fashion,
                                                               monkeypatch):
    calls, real = [], vit_data.train_vit

    def fast(cfg=None, cache_dir=None, progress=True):
        calls.append(cfg)
        return real(replace(TINY, steps=5), cache_dir, progress=False)

    monkeypatch.setattr(vit_data, "train_vit", fast)
    folder = vit_data.vit_model_dir(tmp_path)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert vit_data.vit_model_dir(tmp_path) == folder and len(calls) == 1
    source = folder / vit_data.SOURCE_FILE
    source.write_text(json.dumps({**json.loads(source.read_text()), "recipe_version": 0}))
    vit_data.vit_model_dir(tmp_path)
    assert len(calls) == 2
    from transformers import ViTForImageClassification

    loaded = ViTForImageClassification.from_pretrained(folder)
    assert loaded.config.id2label[9] == "Ankle boot"
