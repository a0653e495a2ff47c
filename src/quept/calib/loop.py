"""Block-wise reconstruction with three-tier bit sampling and MB-ToMe (DESIGN 2.3, 2.4)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quept.calib.act_init import channel_ranges, input_samples
from quept.calib.capture import mean_sq_inputs, move_kwargs
from quept.calib.checkpoint import CalibCheckpoint
from quept.config import CalibConfig, ConfigError, ElasticSpec
from quept.models import Family, reparam
from quept.nn import ElasticLinear, set_bits
from quept.nn.state import elastic_state_dict, load_elastic_state
from quept.ops import multibit_merge

log = logging.getLogger(__name__)


class CalibrationError(RuntimeError):
    """Calibration cannot go on (for example a loss became NaN); the message gives context."""


@dataclass
class BlockReport:
    """Reconstruction loss of one block per bit group, on the first (>= 4) samples at the group's
    lowest width, before and after training; plus wall-clock seconds."""

    block: int
    bits: list[int]
    loss_before: list[float]
    loss_after: list[float]
    seconds: float


def _loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "l1":
        return lambda a, b: (a - b).abs().mean()
    return lambda a, b: (a - b).pow(2).mean()


def massive_mask(target: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """The target's massive elements (magnitude over ``ratio`` times its median); None if none."""
    mag = target.abs()
    big = mag > ratio * mag.median()
    return big if big.any() else None


def massive_term(out: torch.Tensor, target: torch.Tensor, big: torch.Tensor,
                 slack: float = 0.0) -> torch.Tensor:
    """The mean relative error of ``out`` over the massive elements ``big``, beyond ``slack``:
    with slack, a width that keeps its massive values adds exactly 0 (its training is the plain
    one), only one losing them is pulled back."""
    rel = (out - target).abs()[big] / target.abs()[big]
    return (rel - slack).clamp(min=0).mean()


def train_schedule(
    cfg: CalibConfig, spec: ElasticSpec, n: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """One block's training steps: per step the sample indices and, per training group, its
    index and the width drawn, from ``gen`` (the only random draws of a block's training, so
    consuming this alone advances ``gen`` exactly as training does)."""
    trains = [spec.group_trains(gi) for gi in range(len(spec.bit_groups))]
    if not any(trains):
        return
    queue: list[list[int]] = [[] for _ in spec.bit_groups]  # "balanced": widths left this round
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for k in range(0, n, cfg.batch_size):
            draws = []
            for gi, g in enumerate(spec.bit_groups):
                if not trains[gi]:
                    continue
                if cfg.draw == "balanced":
                    if not queue[gi]:
                        queue[gi] = torch.randperm(len(g), generator=gen).tolist()
                    draws.append((gi, g[queue[gi].pop()]))
                else:
                    draws.append((gi, g[_draw(g, gen).item()]))
            yield perm[k : k + cfg.batch_size], draws


def _draw(group: tuple[int, ...], gen: torch.Generator, n: int | None = None) -> torch.Tensor:
    return torch.randint(len(group), (n or 1,), generator=gen)


class BlockCalibrator:
    """Runs 2.3/2.4 over every block of a prepared model, checkpointing after each block."""

    def __init__(
        self, model: nn.Module, family: Family, spec: ElasticSpec, cfg: CalibConfig,
        block_kwargs: dict | list[dict], checkpoint: CalibCheckpoint | None = None,
        progress: bool = True,
    ) -> None:
        self.blocks = family.get_blocks(model)
        self.family, self.spec, self.cfg = family, spec, cfg
        # one dict shared by every block, or each block's own (family.per_block_kwargs)
        per_block = block_kwargs if isinstance(block_kwargs, list) else [block_kwargs]
        if len(per_block) not in (1, len(self.blocks)):
            raise ConfigError(f"{len(per_block)} sets of block arguments for "
                              f"{len(self.blocks)} blocks")
        self.block_kwargs = [move_kwargs(k, cfg.device, torch.float32) for k in per_block]
        self.kwargs = self.block_kwargs[0]  # the arguments of the block being calibrated
        self.exits = [family.block_exit(model, i) for i in range(len(self.blocks))]
        self.checkpoint = checkpoint
        self.progress = progress
        self.loss = _loss_fn(cfg.loss)  # the logged block loss
        rates = cfg.lr_adapter_groups
        if rates is not None and len(rates) != len(spec.bit_groups):
            raise ConfigError(
                f"lr_adapter_groups has {len(rates)} rates but the spec has "
                f"{len(spec.bit_groups)} bit groups {spec.bit_groups}; give one rate per group"
            )

    # -- helpers ---------------------------------------------------------------------------
    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Block forward over a CPU cache in mini-batches, no gradient; result on CPU."""
        out = torch.empty_like(x)
        bs = self.cfg.batch_size
        with torch.no_grad():
            for i in range(0, x.shape[0], bs):
                xb = x[i : i + bs].to(self.cfg.device)
                out[i : i + bs] = self.family.call_block(block, xb, self.kwargs).float().cpu()
        return out

    def _stage_exit(
        self, module: nn.Module, x_fp: torch.Tensor, x_q: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Both streams through the float module that ends a stage (``Family.stage_exit``, e.g.
        Swin's patch merging), after its last block; a shared quantized stream stays shared."""
        module.to(self.cfg.device)
        bs, done = self.cfg.batch_size, {}

        def apply(x: torch.Tensor) -> torch.Tensor:
            if id(x) not in done:
                with torch.no_grad():
                    done[id(x)] = torch.cat([
                        self.family.call_exit(module, x[i : i + bs].to(self.cfg.device),
                                              self.kwargs).float().cpu()
                        for i in range(0, x.shape[0], bs)])
            return done[id(x)]

        out = apply(x_fp), [apply(x) for x in x_q]
        module.to("cpu")
        return out

    def _float_pass(self, block: nn.Module, x_fp: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The float target ``Y_fp = Block_fp(X_fp)``; on the way, the mean squared float input
        per channel of every linear, which weights the per-group clip search that initialises
        the clips of ``spec.search_bits`` (activation-aware init); with
        ``spec.protect_outliers`` also the largest input per channel, which finds the block's
        super weights, whose clips are then held at 1. With static activation quantizers
        (spec.activations "per-tensor") the block's post-norm inputs are reparameterised first
        and every linear's quantizers are set by a percentile search on its float inputs."""
        layers = {n: m for n, m in block.named_modules() if isinstance(m, ElasticLinear)}
        amax: dict[str, torch.Tensor] = {}
        static = self.spec.activations == "per-tensor"
        if static:
            self._reparameterise(block, x_fp, index)
        tokens = x_fp.shape[0] * (x_fp.shape[1] if x_fp.dim() > 2 else 1)
        with (mean_sq_inputs(layers, amax if self.spec.protect_outliers else None) as sq,
              input_samples(layers if static else {}, tokens) as samples):
            set_bits(block, None)
            y_fp = self._run(block, x_fp)
        for n, m in layers.items():
            if static:
                m.init_act_by_search(torch.cat(samples[n]))
            for b in self.spec.search_bits:
                m.init_clip_by_search(b, sq[n])
            if self.spec.protect_outliers:
                m.protected = m.find_super_weights(amax[n], self.spec.protect_outliers)
                for r, j in m.protected:
                    log.info("block %d, %s: super weight W[%d, %d] = %.3f (input up to %.1f); "
                             "its group's clip is held at 1", index + 1, n, r, j,
                             m.weight[r, j].item(), amax[n][j].item())
                m.hold_protected_clips()
        return y_fp

    def _reparameterise(self, block: nn.Module, x_fp: torch.Tensor, index: int) -> None:
        """Fold a per-channel scale and shift into each norm of the block that feeds linears
        (:mod:`quept.models.reparam`), from the ranges of its outputs on the float stream."""
        pairs = reparam.block_pairs(self.family)
        firsts = {names[0]: block.get_submodule(names[0]) for _, names in pairs}
        if not firsts or all(m.reparam_folded for m in firsts.values()):
            return
        with channel_ranges(firsts) as ranges:
            set_bits(block, None)
            self._run(block, x_fp)
        for norm, names in pairs:
            scale, shift = reparam.channel_transform(*ranges[names[0]])
            reparam.fold(block.get_submodule(norm), [block.get_submodule(n) for n in names],
                         scale, shift)
            log.debug("block %d, %s: channel ranges equalised (scale %.3g..%.3g)", index + 1,
                      norm, scale.min().item(), scale.max().item())

    def _probe(self, block: nn.Module, xq: list[torch.Tensor], yfp: torch.Tensor) -> list[float]:
        losses = []
        first = slice(0, max(self.cfg.batch_size, 4))
        with torch.no_grad():
            for g, x in zip(self.spec.bit_groups, xq):
                set_bits(block, min(g))
                out = self.family.call_block(block, x[first].to(self.cfg.device), self.kwargs)
                losses.append(self.loss(out, yfp[first].to(self.cfg.device)).item())
        return losses

    def _propagate(
        self, block: nn.Module, xq: list[torch.Tensor], gen: torch.Generator
    ) -> list[torch.Tensor]:
        """Next quantized stream(s): one drawn bit per group *per sample* (samples that drew
        the same bit run together). "merged": MB-ToMe of the groups' outputs, shared by all
        groups; "per-group": each group's output becomes its own next input."""
        n = xq[0].shape[0]
        outs = []
        for g, x in zip(self.spec.bit_groups, xq):
            d = _draw(g, gen, n)
            out = torch.empty_like(x)
            for j, b in enumerate(g):
                idx = (d == j).nonzero().squeeze(1)
                if idx.numel():
                    set_bits(block, b)
                    out[idx] = self._run(block, x[idx])
            outs.append(out)
        if self.spec.stream == "per-group":
            return outs
        merged = multibit_merge(outs, self.spec.merge_weights, self.spec.merge_top_p)
        return [merged] * len(outs)

    def _train(self, i: int, block: nn.Module, xq: list[torch.Tensor], yfp: torch.Tensor,
               gen: torch.Generator, bar: tqdm) -> None:
        cfg, groups = self.cfg, self.spec.bit_groups
        trains = [self.spec.group_trains(gi) for gi in range(len(groups))]
        steps = cfg.epochs * cfg.steps_per_epoch
        if not any(trains):  # fixed clips and no adapter anywhere: the search is the model
            bar.update(steps)
            return
        layers = [m for m in block.modules() if isinstance(m, ElasticLinear)]
        adapters = [p for m in layers for p in m.trainable_parameters()[0]]
        clips = [p for m in layers for p in m.trainable_parameters()[1]]
        acts = [p for m in layers for p in m.act_parameters()]  # static activation steps
        for p in adapters + clips + acts:
            p.requires_grad_(True)
        lr_adapter, scales = _adapter_rates(layers, cfg)
        opt = torch.optim.AdamW(
            [{"params": adapters, "lr": lr_adapter}, {"params": clips, "lr": cfg.lr_clip},
             {"params": acts, "lr": cfg.lr_act}],
            weight_decay=0.0,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )
        n, step = yfp.shape[0], 0
        running = [0.0] * len(groups)
        for idx, draws in train_schedule(cfg, self.spec, n, gen):
            yb = yfp[idx].to(cfg.device)
            big = massive_mask(yb, cfg.massive_ratio) if cfg.massive_ratio else None
            opt.zero_grad(set_to_none=True)
            total_loss = 0.0
            for gi, b in draws:
                set_bits(block, b)
                xb = xq[gi][idx].to(cfg.device)
                with torch.autocast(torch.device(cfg.device).type, torch.bfloat16,
                                    enabled=cfg.bf16):
                    out = self.family.call_block(block, xb, self.kwargs)
                out = out.float()
                loss = self.loss(out, yb)
                if big is not None:  # once per step: every group's target is yb
                    loss = loss + massive_term(out, yb, big, cfg.massive_slack)
                if not torch.isfinite(loss):
                    raise CalibrationError(
                        f"block {i}, bit {b}: loss became {loss.item()} at step {step} "
                        "(try lower learning rates or check the calibration data)"
                    )
                total_loss = total_loss + loss
                running[gi] = 0.8 * running[gi] + 0.2 * loss.item() if step else loss.item()
            total_loss.backward()
            before = [p.detach().clone() for p in scales]
            opt.step()
            with torch.no_grad():  # per-slice rates: Adam's step scaled element-wise
                for p0, (p, s) in zip(before, scales.items()):
                    p.copy_(p0 + (p - p0) * s)
            sched.step()
            step += 1
            bar.set_postfix_str(" ".join(
                f"{'/'.join(map(str, g))}b=" + (f"{v:.4f}" if t else "fixed")
                for g, v, t in zip(groups, running, trains)
            ))
            bar.update(1)
        for p in adapters + clips + acts:
            p.requires_grad_(False)
            p.grad = None

    # -- main loop -------------------------------------------------------------------------
    def run(self, x0: torch.Tensor) -> list[BlockReport]:
        """Calibrate every block from block-0 inputs ``x0`` (N, T, C) on CPU. Where a stage
        ends (``Family.stage_exit``) both streams go through its float exit module, so the next
        block's inputs may have another token count and width."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        n_blocks, start = len(self.blocks), 0
        x_fp, x_q = x0, [x0] * len(self.spec.bit_groups)
        reports: list[BlockReport] = []
        resumed = self.checkpoint.load() if self.checkpoint else None
        if resumed is not None:
            for j, state in resumed.block_states.items():
                load_elastic_state(self.blocks[j], state)
                reparam.refold_block(self.blocks[j], self.family)
            start, x_fp, x_q = resumed.next_block, resumed.x_fp, resumed.x_q
            gen.set_state(resumed.rng_state)
            reports = [BlockReport(**r) for r in resumed.reports]
        elif self.checkpoint:
            self.checkpoint.save_inputs(x_fp, x_q, gen.get_state())
        steps = self.cfg.epochs * self.cfg.steps_per_epoch
        bar = tqdm(total=n_blocks * steps, initial=start * steps, disable=not self.progress,
                   unit="step", dynamic_ncols=True)
        try:
            for i in range(start, n_blocks):
                t0 = time.perf_counter()
                bar.set_description(f"({i + 1}/{n_blocks}) Calibrating block")
                block = self.blocks[i].to(self.cfg.device)
                self.kwargs = self.block_kwargs[i if len(self.block_kwargs) > 1 else 0]
                y_fp = self._float_pass(block, x_fp, i)
                before = self._probe(block, x_q, y_fp)
                self._train(i, block, x_q, y_fp, gen, bar)
                after = self._probe(block, x_q, y_fp)
                x_q = self._propagate(block, x_q, gen)
                x_fp = y_fp
                if self.exits[i] is not None:
                    x_fp, x_q = self._stage_exit(self.exits[i], x_fp, x_q)
                set_bits(block, None)
                self.blocks[i] = block.to("cpu")
                rep = BlockReport(i, [min(g) for g in self.spec.bit_groups], before, after,
                                  time.perf_counter() - t0)
                reports.append(rep)
                log.info(
                    "block %d/%d done in %.1fs; loss at %s bits: %s -> %s", i + 1, n_blocks,
                    rep.seconds, rep.bits, _fmt(before), _fmt(after),
                )
                if self.checkpoint:
                    self.checkpoint.save(i, elastic_state_dict(block), x_fp, x_q, gen.get_state(),
                                         [asdict(r) for r in reports])
        finally:
            bar.close()
        return reports


def _adapter_rates(
    layers: list[ElasticLinear], cfg: CalibConfig
) -> tuple[float, dict[nn.Parameter, torch.Tensor]]:
    """The optimizer's adapter rate and, with ``cfg.lr_adapter_groups``, a multiplier per
    element of every U and V (the group's rate over the largest): with AdamW and no weight
    decay, scaling a step element-wise is the same as a rate per element."""
    rates = cfg.lr_adapter_groups
    if rates is None:
        return cfg.lr_adapter, {}
    top = max(rates)
    scales: dict[nn.Parameter, torch.Tensor] = {}
    for m in layers:
        per_rank = torch.zeros(m.lora_u.shape[1], dtype=m.lora_u.dtype, device=m.lora_u.device)
        lo = 0
        for rate, hi in zip(rates, m.rank_prefix):
            per_rank[lo:hi] = rate / top if top > 0 else 0.0
            lo = hi
        scales[m.lora_u] = per_rank[None, :]
        scales[m.lora_v] = per_rank[:, None]
    return top, scales


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"
