"""Training-free mixed precision (DESIGN 2.6): sensitivity tables, budgets and plans."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quept.api.elastic import realised, spec_of
from quept.api.folders import ArtifactError
from quept.checks import ConfigError, check_config, check_count
from quept.nn import ElasticLinear, elastic_layers
from quept.search import (
    Plan,
    SensitivityCacheError,
    SensitivityConfig,
    SensitivityTable,
    estimate_sensitivity,
    plan_from_table,
)
from quept.search.budget import Constraints, feasible_range, shape_table
from quept.search.budget import check_budget as _check_budget
from quept.search.candidates import (
    bracketing_widths,
    in_context_sweeps,
    neighbour_moves,
    plan_from_moves,
    plan_from_neighbours,
    plan_from_swaps,
    swap_means,
)
from quept.search.exact import configuration_kl, move_kl, unit_swap_kl
from quept.search.objective import checked_objective, cost_number, cost_words, objective_for
from quept.search.plan import GRANULARITIES, plan_uniform, plan_within, unit_of
from quept.search.refinement import Refinement, RefineRound
from quept.search.sensitivity import CACHE_NAMES
from quept.search.sweeps import SweepCache
from quept.search.table import fingerprint as _table_fingerprint

log = logging.getLogger(__name__)


SENSITIVITY_JSON, SENSITIVITY_EXACT_JSON = CACHE_NAMES["fast"], CACHE_NAMES["exact"]


SENSITIVITY_CACHES = tuple(CACHE_NAMES.values())
"""The files a folder's sensitivity tables are cached in, one per SensitivityConfig.method."""




def sensitivity(
    model: nn.Module, input_ids: torch.Tensor, config: SensitivityConfig | None = None, *,
    cache: str | os.PathLike | None = None, recompute: bool = False, progress: bool = True,
) -> SensitivityTable:
    """KL sensitivity of every elastic layer at every width on ``input_ids`` (N, T); for an
    image classifier pixel values (N, C, H, W) and the KL of its class distribution, for an
    encoder :class:`quept.eval.Sentences` and one minus its embedding's cosine
    (:mod:`quept.search.objective`).

    With ``cache`` (e.g. ``FOLDER/`` + ``config.cache_name``: sensitivity.json, or
    sensitivity-exact.json for ``method="exact"``) a table whose fingerprint (elastic state,
    base weights, tokens, settings) matches is reused; otherwise it is measured and written.
    """
    given = config
    config = _as_measured(check_config(SensitivityConfig() if config is None else config,
                                       SensitivityConfig, "sensitivity"), input_ids)
    if given is not None and config != given:
        log.info("the sensitivity inputs are %d x %d, not the %d x %d the config names; the "
                 "table records what it is measured on", config.n_samples, config.seq_len,
                 given.n_samples, given.seq_len)
    if cache is not None and Path(cache).is_dir():
        raise ConfigError(f"cache names the folder {cache}; name the table's file in it, e.g. "
                          f"{Path(cache) / config.cache_name}")
    if cache is not None and not recompute:
        table = cached_sensitivity(model, input_ids, config, cache)
        if table is not None:
            log.info("reusing the sensitivity table in %s", cache)
            return table
    table = estimate_sensitivity(model, input_ids, config, progress=progress)
    if cache is not None:
        table.save(cache)
    return table


def _as_measured(config: SensitivityConfig, inputs: Any) -> SensitivityConfig:
    """``config`` with the sample count and sequence length of ``inputs`` (token ids (N, T),
    :class:`quept.eval.Sentences` padded to T, or images (N, C, H, W): N only), so that the
    table records what it was measured on, not what the config guessed."""
    ids = getattr(inputs, "input_ids", inputs)
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 4) or 0 in ids.shape:
        return config  # refused by name when the table is measured
    n, t = int(ids.shape[0]), (int(ids.shape[1]) if ids.dim() == 2 else config.seq_len)
    return dataclasses.replace(config, n_samples=n, seq_len=t)


def cached_sensitivity(model: nn.Module, input_ids: torch.Tensor, config: SensitivityConfig,
                       cache: str | os.PathLike) -> SensitivityTable | None:
    """The table in the file ``cache`` if it was measured on this elastic state, base weights,
    tokens and settings; None (and why, logged) otherwise."""
    config = _as_measured(config, input_ids)
    path = Path(cache)
    if not path.is_file():
        return None
    try:
        table = SensitivityTable.load(path)
    except SensitivityCacheError as e:
        log.warning("%s; it will be measured again", e)
        return None
    if table.fingerprint != _table_fingerprint(model, input_ids,
                                               config.to_dict(objective_for(model))):
        log.info("%s was measured on another model, text or setting", path)
        return None
    why = _table_mismatch(model, table)
    if why is not None:  # the fingerprint matches, the contents do not: edited or damaged
        log.warning("%s does not describe the model its fingerprint names (%s); it will be "
                    "measured again", path, why)
        return None
    return table


def plan_preview(model: nn.Module, *, avg_bits: float | None = None,
                 max_bytes: int | None = None, constraints: Constraints = None,
                 granularity: str = "auto", in_context: bool = True, both_ways: bool = True
                 ) -> dict[str, Any]:
    """What :func:`plan` would meet at one budget, from the layer shapes alone (nothing is
    measured): the range of stored bits per weight its plans can have (under
    ``constraints``), the uniform widths just below and above the budget, and the in-context
    sweeps ``(base, alt)`` the auto granularity uses there. Raises as :func:`check_budget`."""
    spec = spec_of(model)
    table = shape_table(elastic_layers(model), {b: spec.group_size_for(b) for b in spec.bits})
    budget = {"avg_bits": avg_bits, "max_bytes": max_bytes, "constraints": constraints}
    lo, hi = feasible_range(table, constraints)
    below, above = bracketing_widths(table, **budget)
    sweeps = (in_context_sweeps(table, **budget, both_ways=both_ways)
              if granularity == "auto" and in_context else [])
    return {"bits_per_weight_range": [lo, hi], "uniform_below": below, "uniform_above": above,
            "in_context_sweeps": sweeps}


def _check_table(model: nn.Module, table: SensitivityTable) -> dict[str, ElasticLinear]:
    """The model's elastic layers, once ``table`` is known to describe them."""
    if not isinstance(table, SensitivityTable):
        raise ConfigError(f"expected a SensitivityTable (from quept.sensitivity), got "
                          f"{type(table).__name__}; calibration tokens go to check_ids=")
    why = _table_mismatch(model, table)
    if why is not None:
        raise ArtifactError(f"the sensitivity table was measured on another model or spec: "
                            f"{why}; measure it on this model (quept.sensitivity)")
    return elastic_layers(model)


def _table_mismatch(model: nn.Module, table: SensitivityTable) -> str | None:
    """How ``table`` fails to describe ``model``'s elastic layers (their names, shapes, the
    widths the spec has and their group sizes); None where it does."""
    layers, spec = elastic_layers(model), spec_of(model)
    if list(layers) != list(table.shapes):
        names = set(layers) ^ set(table.shapes)
        return (f"its layers differ from the model's (e.g. {sorted(names)[0]})" if names
                else "its layers are in another order than the model's")
    for name, m in layers.items():
        shape = table.shapes[name]
        if (shape.out_features, shape.in_features) != (m.out_features, m.in_features):
            return (f"layer {name} is {shape.out_features} x {shape.in_features} in the table, "
                    f"{m.out_features} x {m.in_features} in the model")
    extra = sorted(set(table.bits) - set(spec.bits))
    if extra:
        return f"it has width(s) {extra}, which the model's spec does not ({sorted(spec.bits)})"
    gs = [b for b in table.bits if table.group_size.get(b) != spec.group_size_for(b)]
    if gs:
        return (f"its group size at {gs[0]} bits is {table.group_size.get(gs[0])}, the model's "
                f"{spec.group_size_for(gs[0])}")
    return None


def sweep_cache(model: nn.Module, check_ids: torch.Tensor, path: str | os.PathLike, *,
                recompute: bool = False) -> SweepCache:
    """The in-context sweeps of :func:`plan` for ``model`` and ``check_ids`` (N, T), kept in
    the JSON file ``path`` (e.g. ``FOLDER/sweeps.json``): sweeps found there for the same
    elastic state, base weights and check tokens are reused, new ones are written as soon as
    they are measured. Pass it as ``plan(..., cache=...)``."""
    fp = _table_fingerprint(model, check_ids, {"in_context_sweeps": "block"})
    return SweepCache(path, fp, objective_for(model).shape(check_ids), recompute=recompute)


def check_budget(model: nn.Module, *, avg_bits: float | None = None,
                 max_bytes: int | None = None, constraints: Constraints = None) -> None:
    """Refuse, before anything is measured, a budget no plan of ``model`` can meet (below the
    narrowest width's stored size, under ``constraints`` when given):
    :class:`quept.search.InfeasibleBudgetError` gives the range of bits per weight and bytes
    its plans can have; ConfigError, constraints that match no layer or leave one no width."""
    spec = spec_of(model)
    _check_budget(elastic_layers(model), {b: spec.group_size_for(b) for b in spec.bits},
                  avg_bits=avg_bits, max_bytes=max_bytes, constraints=constraints)


def plan(model: nn.Module, table: SensitivityTable, *, avg_bits: float | None = None,
         max_bytes: int | None = None, granularity: str = "auto",
         check_ids: torch.Tensor | None = None, in_context: bool = True,
         both_ways: bool = True, cache: MutableMapping | None = None,
         constraints: Constraints = None, refine: int = 0, earlier: Iterable[Plan] = (),
         progress: bool = False) -> Plan:
    """The width per layer minimising the summed sensitivity within one budget: ``avg_bits``
    (stored bits per quantized weight, scales and zero-points included) or ``max_bytes``
    (bytes of the quantized linears: codes + scales + zero-points). Solved exactly.

    ``granularity``: "layer", "sublayer" or "block" (see :mod:`quept.search.plan`), or "auto"
    (default): the exact plan at each of them, then the one whose measured KL to the float
    model on ``check_ids`` (N, T calibration tokens, e.g. 16 x 128; pixel values or
    :class:`quept.eval.Sentences` for an image classifier or an encoder, whose cost is then the
    KL of the class distribution or one minus the embedding's cosine) is lowest. The summed
    costs assume layers act independently; the measured KL does not, and on the default model
    coarser units often give lower perplexity at the same budget (docs/mixed-precision.md).

    ``in_context`` (auto only): three more candidates, made from the uniform widths just below
    and above the budget: each block's cost measured *in* one uniform model when it alone
    moves to the other width (:func:`quept.search.exact.unit_swap_kl`, two sweeps of one
    forward per block on ``check_ids``), then the best set of blocks to move, exactly (one
    candidate per sweep); the third moves blocks by the mean of both sweeps' costs
    (:func:`quept.search.candidates.swap_means`). ``both_ways`` adds one more: inside the upper
    uniform model, each block may go down to the lower width or up to the next width above
    (one more sweep; :func:`quept.search.candidates.plan_from_moves`). ``cache`` (a dict, for
    one model and one ``check_ids``, or a :func:`sweep_cache` that keeps them on disk) keeps
    those sweeps for later budgets between the same two widths. ``progress`` shows each sweep.

    ``constraints`` pin or bound the widths of the layers they name, by name or shell-style
    pattern: ``["model.layers.0.*=8", "*.mlp.down_proj>=4"]`` (:mod:`quept.search.constraints`);
    every candidate keeps them, and the budget counts the pinned layers too.

    ``refine`` (auto only): up to this many rounds of local search from the plan kept: each
    block's cost of moving one width down and one up is measured *in* that plan (two forwards
    per block on ``check_ids``, :func:`quept.search.exact.move_kl`), the best set of moves
    within the budget is chosen exactly (:func:`quept.search.candidates.plan_from_neighbours`),
    and the result replaces the plan if its measured KL is lower. The moves' costs are each
    measured alone, so where the whole choice does not lower the KL, choices of at most half
    as many moves, a quarter, ... one are measured in turn; the rounds stop at the first where
    none lowers it. Every try's KL is recorded in ``checked_kl``, and what each round did
    (moves predicted, plans tried, moves kept, or none that helped) in ``refinement``.

    ``earlier`` (auto only): plans made for smaller budgets of this model, e.g. by a sweep over
    budgets in ascending order. Each that fits this budget and keeps the constraints is one
    more candidate (:func:`quept.search.plan.plan_within`), so that a larger budget never keeps
    a plan whose measured KL is above a smaller budget's."""
    _check_table(model, table)
    earlier = list(earlier)
    if any(not isinstance(p, Plan) for p in earlier):
        raise ConfigError("earlier must hold Plan objects (plans made for smaller budgets), got "
                          f"{sorted({type(p).__name__ for p in earlier if not isinstance(p, Plan)})}")
    if granularity != "auto" and granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be 'auto' (the best of candidates measured on "
                          f"check_ids) or one of {GRANULARITIES}, got {granularity!r}")
    check_count(refine, "refine", 0)  # rounds of local search
    if refine and granularity != "auto":
        raise ConfigError(f"refine starts from the plan granularity='auto' keeps, by measured "
                          f"KL; granularity={granularity!r} measures none")
    if earlier and granularity != "auto":
        raise ConfigError(f"earlier plans are candidates the auto granularity measures; "
                          f"granularity={granularity!r} measures none")
    if granularity != "auto":
        return plan_from_table(table, avg_bits=avg_bits, max_bytes=max_bytes,
                               granularity=granularity, constraints=constraints)
    if check_ids is None:
        raise ConfigError("granularity='auto' measures each candidate plan: pass check_ids "
                          "(calibration tokens, e.g. 16 x 128), or a fixed granularity "
                          f"{GRANULARITIES}")
    candidates = plan_candidates(model, table, avg_bits=avg_bits, max_bytes=max_bytes,
                                 check_ids=check_ids, in_context=in_context,
                                 both_ways=both_ways, cache=cache, constraints=constraints,
                                 progress=progress)
    for p in earlier:
        kept_here = plan_within(table, p, avg_bits=avg_bits, max_bytes=max_bytes,
                                constraints=constraints)
        if kept_here is not None and all(kept_here.widths != c.widths
                                         for c in candidates.values()):
            base, k = kept_here, 1
            while kept_here.label in candidates:  # given plans made alike for one budget
                k += 1
                kept_here = dataclasses.replace(base, search=f"{base.search} #{k}")
            candidates[kept_here.label] = kept_here
    kls = configuration_kl(model, check_ids, list(candidates.values()))
    checked = dict(zip(candidates, kls))
    best = min(checked, key=checked.get)
    objective = candidates[best].objective
    log.info("plan candidates, measured %s: %s; keeping %s", cost_words(objective),
             ", ".join(f"{g} {cost_number(objective, v)}" for g, v in checked.items()), best)
    kept = candidates[best]
    if not refine:
        return dataclasses.replace(kept, checked_kl=checked)
    budget = {"avg_bits": avg_bits, "max_bytes": max_bytes, "constraints": constraints}
    kept, rounds = _refine(model, table, kept, checked, check_ids, budget, refine, progress)
    return dataclasses.replace(kept, checked_kl=checked,
                               refinement=Refinement(refine, tuple(rounds)))


def _refine(model: nn.Module, table: SensitivityTable, kept: Plan, checked: dict[str, float],
            check_ids: Any, budget: dict[str, Any], refine: int, progress: bool
            ) -> tuple[Plan, list[RefineRound]]:
    """Up to ``refine`` rounds of :func:`plan`'s local search from ``kept``: the plan they end
    with and what each round did. Every try's measured cost is added to ``checked``."""
    objective = kept.objective
    prefix = kept.search if kept.granularity == "block" else f"{kept.granularity} {kept.search}"
    rounds: list[RefineRound] = []
    for r in range(1, refine + 1):
        moves = neighbour_moves(table, kept.widths, constraints=budget["constraints"])
        kl_here, deltas = move_kl(model, check_ids, kept.widths, moves, progress=progress,
                                  desc=f"refining, round {r}")
        tried, better = [], None
        for step in _refine_steps(table, kept, moves, deltas, kl_here, budget,
                                  f"{prefix}, refined x{r}"):
            tried.append(step)
            kl = configuration_kl(model, check_ids, [step])[0]
            checked[step.label] = kl  # recorded, kept or not
            log.info("refining, round %d: %s, measured %s %s against %s", r, step.label,
                     cost_words(objective), cost_number(objective, kl),
                     cost_number(objective, checked[kept.label]))
            if kl < checked[kept.label]:
                better = step
                break
        rounds.append(RefineRound(
            r, _moved_blocks(kept, tried[0]) if tried else 0, len(tried),
            None if better is None else _moved_blocks(kept, better)))
        if better is None:
            log.info("refining, round %d: %s; stopping", r, rounds[-1].words())
            break
        kept = better
    return kept, rounds


def _moved_blocks(kept: Plan, other: Plan) -> int:
    """How many blocks ``other`` gives other widths than ``kept``."""
    return len({unit_of(n, "block") for n, b in other.widths.items() if kept.widths[n] != b})


def _refine_steps(table: SensitivityTable, kept: Plan, moves: Mapping, deltas: Mapping,
                  kl_here: float, budget: dict[str, Any], search: str) -> Iterator[Plan]:
    """The plans one round of :func:`plan`'s refinement tries, best predicted first: the
    exact choice among ``moves`` (:func:`quept.search.candidates.plan_from_neighbours`), then,
    as its moves can interact, choices of at most half as many moves, then a quarter, ... down
    to one (a penalty per move, found by bisection, trims them). Plans equal to ``kept`` or to one
    already given are skipped."""
    def step(penalty: float) -> tuple[int, Plan]:
        p = plan_from_neighbours(table, kept.widths, moves, deltas, kl_here, **budget,
                                 search=search, penalty=penalty)
        m = _moved_blocks(kept, p)
        return m, dataclasses.replace(p, search=f"{search} ({m} move{'' if m == 1 else 's'})")

    n_full, full = step(0.0)
    if not n_full:
        return
    yield full
    seen = [kept.widths, full.widths]
    top = max(abs(v) for v in deltas.values()) * 2 + 1e-9  # no move is worth that penalty
    target = n_full // 2
    while target >= 1:
        lo, hi, best = 0.0, top, None  # the least penalty leaving at most `target` moves
        for _ in range(40):
            mid = (lo + hi) / 2
            m, p = step(mid)
            if m <= target:
                hi, best = mid, (m, p)
            else:
                lo = mid
        if best is not None and best[0] and best[1].widths not in seen:
            seen.append(best[1].widths)
            yield best[1]
        target //= 2


def plan_candidates(
    model: nn.Module, table: SensitivityTable, *, avg_bits: float | None = None,
    max_bytes: int | None = None, check_ids: torch.Tensor | None = None,
    in_context: bool = True, both_ways: bool = True, cache: MutableMapping | None = None,
    constraints: Constraints = None, progress: bool = False,
) -> dict[str, Plan]:
    """The candidates :func:`plan` chooses among with ``granularity="auto"``, by label
    (``Plan.label``), distinct widths only, not yet checked: the table's plan at each
    granularity, the uniform width below the budget (so the plan kept is never worse than it
    on the check data), then (``in_context``, with ``check_ids``) those made from the
    in-context sweeps. For studying how the choice is made; :func:`plan` is the one to use."""
    layers = _check_table(model, table)
    if in_context and check_ids is None:
        raise ConfigError("the in-context candidates are measured on check_ids: pass them, "
                          "or in_context=False")
    if check_ids is not None:
        checked_objective(model, check_ids, "check_ids")
    candidates: dict[str, Plan] = {}

    def add(p: Plan) -> None:
        if all(p.widths != c.widths for c in candidates.values()):
            candidates[p.label] = p

    budget = {"avg_bits": avg_bits, "max_bytes": max_bytes, "constraints": constraints}
    for g in GRANULARITIES:
        add(plan_from_table(table, **budget, granularity=g))
    add(plan_uniform(table, bracketing_widths(table, **budget)[0], **budget))
    sweeps = in_context_sweeps(table, **budget, both_ways=both_ways) if in_context else []
    if sweeps:
        units: dict[str, list[str]] = {}
        for name in layers:
            units.setdefault(unit_of(name, "block"), []).append(name)
        cache = {} if cache is None else cache
        for base, alt in sweeps:
            if (base, alt) in cache and set(cache[base, alt][1]) != set(units):
                log.warning("the kept W%d -> W%d sweep%s names other units than the model's "
                            "blocks (e.g. %s); it is measured again", base, alt,
                            f" in {cache.path}" if isinstance(cache, SweepCache) else "",
                            sorted(set(cache[base, alt][1]) ^ set(units))[0])
                del cache[base, alt]
            if (base, alt) not in cache:
                cache[base, alt] = unit_swap_kl(model, check_ids, units, base, alt,
                                                progress=progress)
        lo, hi = sweeps[0]
        for base, alt in sweeps[:2]:
            kl_base, deltas = cache[base, alt]
            add(plan_from_swaps(table, base, alt, deltas, kl_base, **budget))
        (kl_lo, up), (kl_hi, down) = cache[lo, hi], cache[hi, lo]
        add(plan_from_swaps(table, lo, hi, swap_means(up, down), kl_lo, **budget,
                            search=f"from W{lo}+W{hi}"))
        if len(sweeps) == 3:
            above = sweeps[2][1]
            add(plan_from_moves(table, hi, {lo: down, above: cache[hi, above][1]}, kl_hi,
                                **budget, search=f"from W{hi} to W{lo} or W{above}"))
    return candidates


def plan_record(model: nn.Module, widths: Mapping[str, int]) -> Plan:
    """A width per layer chosen by hand (``{layer: bits}``, naming every quantized linear) as
    a :class:`Plan`: the stored bits per weight and bytes it realises on ``model``, scales and
    zero-points included, with no budget and no predicted KL (``search`` "by hand")."""
    switch = getattr(model, "quept_switch", None)
    chosen, n, size = realised(elastic_layers(model) if switch is None else switch.skeletons(),
                               widths)
    return Plan(dict(chosen), size / n, size / 8, n, search="by hand")
