"""Learned rounding on the elastic model's grid, for one width or plan at export time.

An elastic layer at width ``b`` rounds ``W + U V`` to the nearest level of a grid set by its
learned clips. Once a width (or a per-layer plan) is chosen for deployment, which level each
weight takes can be learned too: every weight gets an offset ``v`` in ``[-1/2, 1/2]`` and its
code becomes ``clamp(round((W + U V) / s + v) + z, 0, 2^b - 1)``. The offsets of a block are
trained together by signed gradient descent (straight-through rounding) on the error of the
block's output against the float model's, the idea of SignRound (Cheng et al., 2023), the
method behind AutoRound. Unlike GPTQ rounding (:mod:`quept.export.gptq`), which sees one layer
at a time and drops the adapter, the offsets start from the elastic model's own codes
(``v = 0`` is round-to-nearest of ``W + U V``) and see the whole block, so they refine what
calibration found instead of replacing it.

The grid stays the elastic model's: each group's scale and zero-point are those
:func:`quept.ops.quant.quantize` gives with the width's learned clips, so the codes pack, export
and load like any others, GGUF included. Blocks are done in order: a block's inputs come from
the blocks before it with their learned codes, its target is the float block on the float
model's inputs. A block keeps its learned codes only if they lower its loss on all the
calibration inputs below that of round-to-nearest (checked at the start and every
``check_every`` steps; the best is kept), so no block gets worse on the calibration data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quept.calib.capture import block_kwargs_on, capture_block_inputs
from quept.calib.loop import massive_mask, massive_term
from quept.config import ConfigError
from quept.export.gptq import check_rounding_request
from quept.models import family_for
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import set_bits
from quept.ops.quant import qparams, round_ste, to_groups

log = logging.getLogger(__name__)

LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class LearnedRoundingConfig:
    """Settings of :func:`round_learned`.

    iters: signed-gradient steps per block.
    lr: step size of the offsets (they live in [-1/2, 1/2]); None = ``1 / iters``, decayed
        linearly to 0 over the steps.
    batch_size: calibration sequences per step (and per forward pass of the checks).
    check_every: steps between two checks of the loss on every calibration sequence; the
        offsets with the lowest such loss are kept (round-to-nearest included).
    loss: "l1" (the calibration's default) or "l2" (squared error), mean over the block's
        outputs; as :class:`quept.config.CalibConfig`'s ``loss``.
    massive_ratio: also penalise relative error on the target's massive elements (magnitude
        over this many times its median, as calibration's ``massive_ratio``); None (default):
        off. ``quept export`` passes the folder's calibration settings.
    massive_slack: relative error allowed on them before they count.
    seed: seeds the draw of sequences per step.
    device: where each block runs while its offsets are learned (it goes back after).
    bf16: run the training steps' forward and backward under bfloat16 autocast (the offsets,
        the weights they make and the loss stay float32; only the signs of the gradients are
        used). The checks that choose which offsets are kept always run in float32.
    """

    iters: int = 200
    lr: float | None = None
    batch_size: int = 4
    check_every: int = 50
    loss: str = "l1"
    massive_ratio: float | None = None
    massive_slack: float = 0.5
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False

    def __post_init__(self) -> None:
        for k in ("iters", "batch_size", "check_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"learned rounding: {k} must be >= 1, got {getattr(self, k)}")
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr <= 0.5):
            raise ConfigError(f"learned rounding: lr must be in (0, 0.5] (a step of offsets in "
                              f"[-1/2, 1/2]) or None for 1 / iters, got {self.lr}")
        if self.loss not in LOSSES:
            raise ConfigError(f"learned rounding: loss must be one of {LOSSES}, got "
                              f"{self.loss!r}")
        if self.massive_ratio is not None and not self.massive_ratio > 1:
            raise ConfigError(f"learned rounding: massive_ratio must be > 1 or None, got "
                              f"{self.massive_ratio}")


class _Offsets:
    """One layer's grid at its width and its rounding offsets, (out, G, group size) each."""

    def __init__(self, m: ElasticLinear, bits: int, group_size: int) -> None:
        with torch.no_grad():
            w = (m.weight + m.delta(bits)).float()
            wg = to_groups(w, group_size)
            scale, zero = qparams(wg, bits, *(f.float() for f in m.clip_factors(bits)))
            self.t = wg / scale  # the weight in grid steps
        self.scale, self.zero, self.qmax = scale, zero, 2**bits - 1
        self.shape, self.dtype = m.weight.shape, m.weight.dtype
        self.v = torch.zeros_like(self.t, requires_grad=True)

    def weight(self) -> torch.Tensor:
        q = torch.clamp(round_ste(self.t + self.v) + self.zero, 0, self.qmax)
        return ((q - self.zero) * self.scale).reshape(self.shape).to(self.dtype)

    @torch.no_grad()
    def codes(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 codes (out, in), scale and zero (out, G) of offsets ``v``."""
        q = torch.clamp(torch.round(self.t + v) + self.zero, 0, self.qmax)
        return (q.reshape(self.shape).to(torch.uint8), self.scale.squeeze(-1),
                self.zero.squeeze(-1))


@contextmanager
def _learning(layers: Mapping[str, ElasticLinear], offsets: Mapping[str, _Offsets],
              block: nn.Module) -> Iterator[None]:
    """The block's layers compute their weight from the offsets, its parameters frozen."""
    flags = {p: p.requires_grad for p in block.parameters()}
    try:
        block.requires_grad_(False)
        for n, m in layers.items():
            m.current_weight = offsets[n].weight  # the instance attribute shadows the method
        yield
    finally:
        for m in layers.values():
            m.__dict__.pop("current_weight", None)
            m.clear_cache()
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _block_loss(cfg: LearnedRoundingConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = out.float() - target
        value = diff.abs().mean() if cfg.loss == "l1" else diff.pow(2).mean()
        if cfg.massive_ratio is not None:
            big = massive_mask(target, cfg.massive_ratio)
            if big is not None:
                value = value + massive_term(out.float(), target, big, cfg.massive_slack)
        return value
    return loss


def round_learned(
    model: nn.Module, widths: Mapping[str, int], inputs: torch.Tensor,
    cfg: LearnedRoundingConfig = LearnedRoundingConfig(), progress: bool = True,
) -> dict[str, Any]:
    """Learn the rounding of every elastic layer at its width in ``widths`` ({layer name:
    bits}) on calibration ``inputs`` (token ids (N, T), or pixel values), block by block, and
    install the codes on the layers (``ElasticLinear.rounded``): the model's forward at those
    widths and every export then use them. Other widths keep round-to-nearest;
    :func:`quept.export.gptq.clear_rounding` removes them. Returns {"layers": n, "seconds": s,
    "blocks_improved": k, "loss_nearest": [...], "loss_learned": [...]} (per block, on all the
    calibration inputs)."""
    spec = check_rounding_request(model, widths, "learned rounding")
    family = family_for(model)
    t0 = time.perf_counter()
    set_bits(model, None)
    home = next(model.parameters()).device
    with torch.no_grad():
        xf, kwargs = capture_block_inputs(model, family, inputs, cfg.batch_size, str(home))
    xf = xf.float().cpu()
    xq = xf.clone()
    kwargs_of = block_kwargs_on(kwargs, cfg.device)
    blocks = family.get_blocks(model)
    prefix = {id(b): n for n, b in model.named_modules()}
    loss_fn = _block_loss(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / cfg.iters
    n = xf.shape[0]
    bs = cfg.batch_size

    def run(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([family.call_block(block, x[j:j + bs].to(cfg.device), kw)
                              .float().cpu() for j in range(0, x.shape[0], bs)])

    def full_loss(block: nn.Module, kw: dict, target: torch.Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for j in range(0, n, bs):
                out = family.call_block(block, xq[j:j + bs].to(cfg.device), kw)
                total += loss_fn(out, target[j:j + bs].to(cfg.device)).item() * min(bs, n - j)
            return total / n

    report: dict[str, list[float]] = {"loss_nearest": [], "loss_learned": []}
    done = improved = 0
    bar = tqdm(total=len(blocks) * cfg.iters, disable=not progress, unit="step",
               desc="learned rounding")
    try:
        for i, block in enumerate(blocks):
            block.to(cfg.device)
            kw = kwargs_of(i)
            base = prefix[id(block)]
            layers = {nm: m for nm, m in block.named_modules() if isinstance(m, ElasticLinear)}
            set_bits(block, None)
            yf = run(block, xf, kw)  # the float target
            offsets = {nm: _Offsets(m, widths[f"{base}.{nm}"],
                                    spec.group_size_for(widths[f"{base}.{nm}"]))
                       for nm, m in layers.items()}
            vs = [o.v for o in offsets.values()]
            with _learning(layers, offsets, block):
                best = nearest = full_loss(block, kw, yf)
                best_v = [v.detach().clone() for v in vs]
                for step in range(cfg.iters):
                    idx = torch.randperm(n, generator=gen)[:bs]
                    with torch.enable_grad(), torch.autocast(
                            torch.device(cfg.device).type, torch.bfloat16, enabled=cfg.bf16):
                        out = family.call_block(block, xq[idx].to(cfg.device), kw)
                        loss = loss_fn(out, yf[idx].to(cfg.device))
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"learned rounding, block {i} ({base}): the loss became "
                                f"{loss.item()} at step {step}; the inputs or the block's "
                                "float output are not finite")
                        grads = torch.autograd.grad(loss, vs)
                    lr = lr0 * (1 - step / cfg.iters)
                    with torch.no_grad():
                        for v, g in zip(vs, grads):
                            v.sub_(lr * g.sign()).clamp_(-0.5, 0.5)
                    bar.update()
                    if (step + 1) % cfg.check_every == 0 or step + 1 == cfg.iters:
                        now = full_loss(block, kw, yf)
                        if now < best:
                            best, best_v = now, [v.detach().clone() for v in vs]
            for (nm, m), o, v in zip(layers.items(), offsets.values(), best_v):
                b = widths[f"{base}.{nm}"]
                m.rounded[b] = o.codes(v)
                m.set_bits(b)
                m.clear_cache()
                done += 1
            improved += best < nearest
            report["loss_nearest"].append(nearest)
            report["loss_learned"].append(best)
            log.info("block %d/%d (%s): loss %.5f nearest -> %.5f learned", i + 1, len(blocks),
                     base, nearest, best)
            xq = run(block, xq, kw)
            xf = yf
            exit_module = family.block_exit(model, i)
            if exit_module is not None:
                exit_module.to(cfg.device)
                with torch.no_grad():
                    xq, xf = (torch.cat([family.call_exit(exit_module, x[j:j + bs]
                                                          .to(cfg.device), kw).float().cpu()
                                         for j in range(0, x.shape[0], bs)]) for x in (xq, xf))
                exit_module.to(home)
            block.to(home)
    finally:
        bar.close()
    set_bits(model, dict(widths))
    return {"layers": done, "seconds": time.perf_counter() - t0, "blocks_improved": improved,
            **report}
