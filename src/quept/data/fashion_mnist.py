"""Images: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

The package holds the four idx files (gzip) of the dataset: 60,000 training and 10,000 test
images of 28 x 28 grey pixels, ten clothing classes. We read them in Python and cache each split
once as safetensors (``images`` uint8 (N, 28, 28), ``labels`` int64 (N,)).
"""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
from pathlib import Path

import torch

from quept.data.fetch import (
    DataUnavailableError,
    atomic_dir,
    read_deb_folder,
    resolve_cache_dir,
)

logger = logging.getLogger(__name__)

DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_DIRNAME = "fashion-mnist"
_DATA_DIR = Path("usr/share/datasets/fashion-mnist")
_SYSTEM_ROOT = Path("/")  # where an installed package's files are
SPLITS = ("train", "test")
_FILES = {"train": "train", "test": "t10k"}  # the idx files' prefixes
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIZE = 28

_HINT = (
    f"Install it with `apt-get install {DEB_PACKAGE}` (or put its .deb into <cache>/debs/)."
)

_IDX_DTYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
               0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}


def read_idx(raw: bytes) -> torch.Tensor:
    """Parse one idx file (already decompressed): two zero bytes, a type code, the number of
    dimensions, each dimension as a big-endian uint32, then the values (big-endian)."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError("not an idx file: it must start with two zero bytes")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"idx type code 0x{code:02x} is unknown; known: "
                         f"{sorted(hex(c) for c in _IDX_DTYPES)}")
    dtype, size = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file truncated in its header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in shape:
        count *= d
    if len(raw) - header != count * size:
        raise ValueError(f"idx file holds {len(raw) - header} data bytes; shape {shape} "
                         f"needs {count * size}")
    body = bytearray(raw[header:])
    if size > 1:  # big-endian on disk
        values = torch.frombuffer(body, dtype=torch.uint8).view(-1, size).flip(1).contiguous()
        return values.view(dtype).reshape(shape)
    return torch.frombuffer(body, dtype=dtype).reshape(shape).clone()


def _read_split(folder: Path, split: str) -> dict[str, torch.Tensor]:
    prefix = _FILES[split]
    try:
        images = read_idx(gzip.decompress((folder / f"{prefix}-images-idx3-ubyte.gz").read_bytes()))
        labels = read_idx(gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()))
    except (OSError, ValueError, EOFError) as exc:
        raise DataUnavailableError(f"Could not read the {split} split in {folder}: {exc}.\n"
                                   f"{_HINT}") from exc
    if images.dim() != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) \
            or labels.shape != images.shape[:1]:
        raise DataUnavailableError(f"{folder}: the {split} split has images {tuple(images.shape)} "
                                   f"and labels {tuple(labels.shape)}; expected (N, 28, 28) and "
                                   f"(N,).\n{_HINT}")
    return {"images": images.contiguous(), "labels": labels.long()}


def load_fashion_mnist(split: str = "train",
                       cache_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of one Fashion-MNIST split ("train": 60,000, "test": 10,000):
    uint8 (N, 28, 28) and int64 (N,) with classes 0..9 (names in ``CLASSES``)."""
    from safetensors.torch import load_file, save_file

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache = resolve_cache_dir(cache_dir)
    final = cache / FASHION_DIRNAME
    if not all((final / f"{s}.safetensors").is_file() for s in SPLITS):
        if final.exists():
            shutil.rmtree(final)
        splits = read_deb_folder(DEB_PACKAGE, _DATA_DIR, "t10k-labels-idx1-ubyte.gz", cache,
                                 lambda d: {s: _read_split(d, s) for s in SPLITS}, hint=_HINT,
                                 root=_SYSTEM_ROOT)
        with atomic_dir(final) as tmp:
            for name, tensors in splits.items():
                save_file(tensors, str(tmp / f"{name}.safetensors"))
        logger.info("cached Fashion-MNIST in %s", final)
    try:
        tensors = load_file(str(final / f"{split}.safetensors"))
        return tensors["images"], tensors["labels"]
    except (OSError, KeyError, RuntimeError) as exc:
        raise DataUnavailableError(f"{final / split}.safetensors is unreadable ({exc}); delete "
                                   f"{final} to rebuild it.") from exc
