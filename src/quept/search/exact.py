"""The slow reference protocol: the exact KL with only one layer quantized, by a forward pass
per (layer, width). Used to check the fast estimate on a subset of layers, never for planning
a whole model. For a decoder the blocks before the varied layer's block are run once and their
output is reused (this changes the cost, not the result). The same measurements serve the
in-context sweeps and the candidate checks of a plan.

Image classifiers and encoders are measured the same way on their own cost
(:mod:`quept.search.objective`: the KL of the class distribution, one minus the embedding's
cosine), each configuration by whole forward passes (their models are small, and their
blocks take arguments that are not all captured as a decoder's are)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quept.calib.capture import capture_block_inputs
from quept.config import ConfigError
from quept.models import family_for
from quept.nn import ElasticLinear, elastic_layers, set_bits
from quept.search.objective import Objective, objective_for

log = logging.getLogger(__name__)


@contextmanager
def _widths_restored(layers: Iterable[ElasticLinear]) -> Iterator[None]:
    """Give every layer back the width it had, with its cached weight dropped."""
    previous = {m: m.bits for m in layers}
    try:
        yield
    finally:
        for m, b in previous.items():
            m.set_bits(b)
            m.clear_cache()


def _head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(final norm, output projection) of a Hugging Face decoder."""
    norm = getattr(model.get_decoder(), "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise ConfigError(f"{type(model).__name__}: no final norm / output head found")
    return norm, head


class _Runner:
    """A decoder run from any block on: the block-0 inputs of ``input_ids`` are captured once,
    and log-probabilities and KLs to a float reference are taken per token.

    The protocol of every runner: :meth:`reference` keeps the current configuration's output
    as the reference, :meth:`settle` records the current configuration's block inputs, and
    :meth:`cost` gives the mean cost, to the reference, of the current configuration with
    blocks ``start`` on recomputed from the settled inputs (only layers of those blocks may
    have changed since :meth:`settle`)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor) -> None:
        self.fam = family_for(model)
        self.blocks = self.fam.get_blocks(model)
        self.block_of = {f"{self.fam.blocks}.{i}.{ln}": i for i, blk in enumerate(self.blocks)
                         for ln in self.fam.block_linears(blk)}
        self.norm, self.head = _head(model)
        device = next(model.parameters()).device
        x, self.kwargs = capture_block_inputs(model, self.fam, input_ids, input_ids.shape[0],
                                              str(device))
        self.x, self.n_tok = x.to(device), input_ids.numel()
        self.inputs = [self.x]

    def log_probs(self, h: torch.Tensor, start: int) -> torch.Tensor:
        for blk in self.blocks[start:]:
            h = self.fam.call_block(blk, h, self.kwargs)
        return self.head(self.norm(h)).float().log_softmax(-1)

    def block_inputs(self) -> list[torch.Tensor]:
        """The input of every block in the model's current configuration."""
        inputs = [self.x]
        for blk in self.blocks[:-1]:
            inputs.append(self.fam.call_block(blk, inputs[-1], self.kwargs))
        return inputs

    def kl(self, lp: torch.Tensor, lp_ref: torch.Tensor) -> float:
        return F.kl_div(lp, lp_ref, log_target=True, reduction="sum").item() / self.n_tok

    def reference(self) -> None:
        self.ref = self.log_probs(self.x, 0)

    def settle(self) -> None:
        self.inputs = self.block_inputs()

    def cost(self, start: int = 0) -> float:
        return self.kl(self.log_probs(self.inputs[start], start), self.ref)


class _WholeRunner:
    """The runner protocol of :class:`_Runner` for any task, by whole forward passes of
    ``batch_size`` samples (``start`` changes nothing but the cost)."""

    def __init__(self, model: nn.Module, inputs: Any, objective: Objective,
                 batch_size: int = 32) -> None:
        fam = family_for(model)
        self.model, self.objective = model, objective
        self.block_of = {}
        for i, (path, blk) in enumerate(zip(fam.block_paths(model), fam.get_blocks(model))):
            self.block_of.update({f"{path}.{ln}": i for ln in fam.block_linears(blk)})
        device = next(model.parameters()).device
        self.batches = list(objective.batches(inputs, batch_size, device))
        self.n_units = objective.n_units(inputs)

    def reference(self) -> None:
        self.refs = [self.objective.target(self.objective.output(self.model, b))
                     for b in self.batches]

    def settle(self) -> None:
        pass

    def cost(self, start: int = 0) -> float:
        o = self.objective
        return sum(o.cost(o.output(self.model, b), r)
                   for b, r in zip(self.batches, self.refs)) / self.n_units


def _runner(model: nn.Module, inputs: Any, batch_size: int = 32) -> _Runner | _WholeRunner:
    """A decoder's runner takes all of ``inputs`` at once; the other tasks' ``batch_size``
    samples at a time."""
    objective = objective_for(model)
    objective.check(inputs)
    if family_for(model).is_causal_lm:
        return _Runner(model, inputs)
    return _WholeRunner(model, inputs, objective, batch_size)


@torch.no_grad()
def exact_sensitivity(
    model: nn.Module, input_ids: torch.Tensor, layers: Sequence[str] | None = None,
    bits: Sequence[int] | None = None, *, reference_bits: int | None = None,
    batch_size: int = 32, progress: bool = True,
) -> dict[str, tuple[float, ...]]:
    """``{layer: (mean KL per token for each of bits)}``: KL(p_float || p) over the vocabulary
    with only ``layer`` changed to each width, the other layers at ``reference_bits``
    (None = float). For ``reference_bits`` set, the KL of the reference configuration itself is
    subtracted, so values are comparable with :func:`estimate_sensitivity`. Image classifiers
    and encoders: their own cost on their inputs (:mod:`quept.search.objective`)."""
    all_layers = elastic_layers(model)
    spec = model.quept_spec
    bits = tuple(sorted(spec.bits)) if bits is None else tuple(bits)
    names = list(all_layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ConfigError(f"unknown layers {unknown[:3]}")
    run = _runner(model, input_ids, batch_size)
    with _widths_restored(all_layers.values()):
        set_bits(model, None)
        run.reference()
        set_bits(model, reference_bits)
        run.settle()  # block inputs in the reference configuration
        base = 0.0 if reference_bits is None else run.cost()
        out = {}
        for name in tqdm(names, disable=not progress, desc="exact KL", leave=False):
            m, k = all_layers[name], run.block_of[name]
            row = []
            for b in bits:
                m.set_bits(b)
                row.append(run.cost(k) - base)
            m.set_bits(reference_bits)
            m.clear_cache()
            out[name] = tuple(row)
            log.debug("%s: %s", name, row)
    return out


@torch.no_grad()
def configuration_kl(
    model: nn.Module, input_ids: Any, configs: Sequence, *, batch_size: int = 4,
) -> list[float]:
    """Mean KL(p_float || p) per token over the vocabulary, on ``input_ids`` (N, T), of each
    configuration in ``configs`` (anything :func:`quept.set_bits` takes: a width, a plan, a
    ``{layer: bits}`` mapping). One float forward and one forward per configuration per batch
    (the float logits are not kept across batches: N x T x vocab floats); every layer's width
    is restored afterwards. Image classifiers and encoders: their own mean cost on their
    inputs (:mod:`quept.search.objective`)."""
    objective = objective_for(model)
    objective.check(input_ids)
    device = next(model.parameters()).device
    totals = [0.0] * len(configs)
    with _widths_restored(elastic_layers(model).values()):
        for batch in objective.batches(input_ids, batch_size, device):
            set_bits(model, None)
            ref = objective.target(objective.output(model, batch))
            for k, cfg in enumerate(configs):
                set_bits(model, cfg)
                totals[k] += objective.cost(objective.output(model, batch), ref)
    return [t / objective.n_units(input_ids) for t in totals]


@torch.no_grad()
def unit_swap_kl(
    model: nn.Module, input_ids: torch.Tensor, units: Mapping[str, Sequence[str]], base: int,
    alt: int, *, progress: bool = True,
) -> tuple[float, dict[str, float]]:
    """In-context costs around a uniform width: ``(kl_base, {unit: delta})`` where ``kl_base``
    is the mean KL(p_float || p) per token on ``input_ids`` (N, T) with every layer at ``base``
    bits and ``delta`` how much that KL changes when only the unit's linears (all in one block)
    go to ``alt`` bits. Unlike the table, which varies one layer of a float model, these costs
    are measured where a plan near uniform ``base`` actually sits. The blocks before a unit's
    block are run once, in the base configuration, and their outputs reused (a decoder's).
    Image classifiers and encoders: their own cost (:mod:`quept.search.objective`)."""
    moves = {unit: dict.fromkeys(names, alt) for unit, names in units.items()}
    return move_kl(model, input_ids, base, moves, progress=progress,
                   desc=f"KL of units at {alt} bits in W{base}")


@torch.no_grad()
def move_kl(
    model: nn.Module, input_ids: Any, base: Any, moves: Mapping[Any, Mapping[str, int]], *,
    progress: bool = True, desc: str = "KL of moves",
) -> tuple[float, dict[Any, float]]:
    """In-context costs around any configuration: ``(kl_base, {key: delta})`` where
    ``kl_base`` is the mean KL per token on ``input_ids`` of ``base`` (anything
    :func:`quept.set_bits` takes: a width or a plan) and ``delta`` how much it changes when
    only the linears of ``moves[key]`` (``{layer: width}``, all in one block) take those widths.
    A decoder's blocks before the move's block are run once, in ``base``, and their outputs
    reused. Every layer's width is restored afterwards."""
    all_layers = elastic_layers(model)
    run = _runner(model, input_ids)
    for key, move in moves.items():
        where = {run.block_of.get(n) for n in move}
        if not move or None in where or len(where) != 1:
            raise ConfigError(f"unit {key!r}: its linears must be elastic linears of one block, "
                              f"got {list(move)[:3]}")
    with _widths_restored(all_layers.values()):
        set_bits(model, None)
        run.reference()
        set_bits(model, base)
        run.settle()
        kl_base = run.cost()
        deltas = {}
        for key, move in tqdm(moves.items(), disable=not progress, leave=False, desc=desc):
            before = {n: all_layers[n].bits for n in move}
            for n, b in move.items():
                all_layers[n].set_bits(b)
            deltas[key] = run.cost(run.block_of[next(iter(move))]) - kl_base
            for n, b in before.items():
                all_layers[n].set_bits(b)
                all_layers[n].clear_cache()
    return kl_base, deltas
