"""Default vision transformer: a small ViT the project trains on Fashion-MNIST, once, cached.

No pretrained ViT ships in any registry these machines reach, so ``vit_model_dir()`` trains
one (a few minutes on two CPU cores) and saves it as an ordinary Hugging Face
``ViTForImageClassification`` folder that ``quept.load_model`` reads like any other. The
recipe is fixed and seeded (``ViTTrainConfig``); its test accuracy is recorded in the folder.

Training tricks that make a ViT learn fast on little compute: half of the patch tokens are
dropped at random in each training step (cheaper steps, a regulariser), the attention weights
start from a mimetic initialisation (query-key products near the identity, so attention starts
local), label smoothing and random horizontal flips. (bf16 autocast was 1.5x slower per step
than float32 on the project's CPU machine, so training stays in float32.)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quept.data.fashion_mnist import CLASSES, IMAGE_SIZE, load_fashion_mnist
from quept.data.fetch import atomic_dir, resolve_cache_dir
from quept.eval.classify import top1_accuracy

logger = logging.getLogger(__name__)

VIT_NAME = "vit"  # what `--model` and load_model() accept for this model
VIT_DIRNAME = "vit-fashion-mnist"
SOURCE_FILE = "quept_source.json"
RECIPE_VERSION = 1
# Fashion-MNIST pixel statistics (training split), used to normalise every input.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


@dataclass(frozen=True)
class ViTTrainConfig:
    hidden_size: int = 128
    layers: int = 6
    heads: int = 4
    intermediate_size: int = 512
    patch_size: int = 4
    steps: int = 1800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.1
    patch_keep: float = 0.5  # share of patch tokens kept in a training step
    seed: int = 0


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> normalised float pixel values (N, 1, 28, 28)."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"expected uint8 images (N, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return ((images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


def _new_model(cfg: ViTTrainConfig) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    hf = ViTConfig(image_size=IMAGE_SIZE, patch_size=cfg.patch_size, num_channels=1,
                   hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                   num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size,
                   num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
                   label2id={c: i for i, c in enumerate(CLASSES)})
    return ViTForImageClassification(hf)


@torch.no_grad()
def _mimetic_init(model: nn.Module, cfg: ViTTrainConfig, gen: torch.Generator) -> None:
    """Per head, W_q^T W_k ~ 0.7 Z + 0.7 I and W_v^T W_o ~ 0.4 Z - 0.4 I (Z random): attention
    starts close to comparing a token with itself, which a small ViT otherwise learns slowly."""
    c, heads = cfg.hidden_size, cfg.heads
    dh = c // heads

    def factor(alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(c, c, generator=gen) / math.sqrt(c)
        u, s, vh = torch.linalg.svd(alpha * z + beta * torch.eye(c))
        root = s[:dh].sqrt()
        return u[:, :dh] * root, vh[:dh].T * root  # (c, dh) each: A @ B.T ~ M

    for layer in model.vit.layers:
        att = layer.attention
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            a, b = factor(0.7, 0.7)
            att.q_proj.weight[rows] = a.T
            att.k_proj.weight[rows] = b.T
            a, b = factor(0.4, -0.4)
            att.v_proj.weight[rows] = b.T
            att.o_proj.weight[:, rows] = a


def _train_logits(model: nn.Module, pixels: torch.Tensor, keep: float,
                  gen: torch.Generator) -> torch.Tensor:
    """The classifier's logits with a random ``keep`` share of the patch tokens (the [CLS]
    token always kept); the same computation as the model's own forward when keep is 1."""
    vit = model.vit
    emb = vit.embeddings
    x = emb.patch_embeddings(pixels) + emb.position_embeddings[:, 1:]
    if keep < 1.0:
        n = x.shape[1]
        k = max(1, round(n * keep))
        idx = torch.rand(x.shape[0], n, generator=gen).argsort(dim=1)[:, :k]
        x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (emb.cls_token + emb.position_embeddings[:, :1]).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, x], dim=1)
    for layer in vit.layers:
        h = layer(h, None)
    return model.classifier(vit.layernorm(h)[:, 0])


def train_vit(cfg: ViTTrainConfig = ViTTrainConfig(), cache_dir: Path | None = None,
              progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a ViT on the Fashion-MNIST training split; returns the model (eval mode, float32)
    and a record with the recipe, the training time and the test accuracy."""
    images, labels = load_fashion_mnist("train", cache_dir)
    test_images, test_labels = load_fashion_mnist("test", cache_dir)
    pixels = pixel_values(images)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = _new_model(cfg)
    _mimetic_init(model, cfg, gen)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start = time.perf_counter()
    order = torch.randperm(len(pixels), generator=gen)
    pos, running = 0, None
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(pixels), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x = pixels[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(_train_logits(model, x, cfg.patch_keep, gen), labels[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"ViT training diverged at step {step} (loss {loss})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if progress and (step + 1) % 100 == 0:
            logger.info("ViT training step %d/%d, loss %.3f, %.0f s", step + 1, cfg.steps,
                        running, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    test_acc = top1_accuracy(model, pixel_values(test_images), test_labels, batch_size=500)
    record = {"recipe": asdict(cfg), "recipe_version": RECIPE_VERSION,
              "train_seconds": round(seconds, 1), "test_accuracy": test_acc,
              "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 training images",
              "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD}
    return model, record


def vit_model_dir(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """A Hugging Face folder with the project's Fashion-MNIST ViT, trained on first use (a few
    minutes on a CPU) and cached; its ``quept_source.json`` records the recipe and accuracy."""
    cache = resolve_cache_dir(cache_dir)
    final = cache / VIT_DIRNAME
    source = final / SOURCE_FILE
    if source.is_file() and (final / "model.safetensors").is_file():
        try:
            if json.loads(source.read_text())["recipe_version"] == RECIPE_VERSION:
                return final
        except (ValueError, KeyError):
            pass
    if final.exists():
        logger.info("removing stale or incomplete %s", final)
        shutil.rmtree(final)
    logger.info("training the default ViT on Fashion-MNIST (once; a few minutes)")
    model, record = train_vit(cache_dir=cache_dir, progress=progress)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("ViT: %.2f%% top-1 on the test split, trained in %.0f s; cached in %s",
                100 * record["test_accuracy"], record["train_seconds"], final)
    return final
