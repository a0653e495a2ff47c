"""``quept plan``: a mixed-precision plan for a bit budget, with no training."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from quept import api
from quept.api import KIND_NAMES
from quept.api.folders import check_plan_out, check_plans_folder
from quept.checks import ConfigError, check_device
from quept.cli.common import (
    _images,
    _refuse_text_options,
    _sample_len,
    _text,
    _text_name,
    calibration_refusal,
    check_context,
    check_texts,
    check_widths,
    folder_meta,
    positive,
    seed_value,
)
from quept.config import QuEPTConfig
from quept.nn import elastic_layers
from quept.search import Constraint, Plan, SensitivityConfig, feasible_range, parse_size
from quept.search.constraints import constraint_texts
from quept.search.objective import BY_NAME, Objective, cost_number, cost_text, objective_for
from quept.search.plan import GRANULARITIES
from quept.search.sensitivity import BATCH_SIZES


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="mixed-precision plan for a bit budget (no training)",
                       description="Measure (or reuse FOLDER/sensitivity.json) the KL "
                       "sensitivity of every layer at every width, then choose each layer's "
                       "width minimising the summed sensitivity within the budget (exact "
                       "knapsack). Budgets count only the quantized linears, weighted by size: "
                       "codes + fp16 scales + zero-points; norms, embeddings and the head are "
                       "not counted. The cost is the KL of the next-token distribution for a "
                       "causal LM, of the class distribution for an image classifier (on "
                       "Fashion-MNIST training images) and one minus the cosine of the "
                       "sentence embedding for an encoder.")
    p.add_argument("folder", help="elastic folder written by `quept quantize`")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--avg-bits", type=_floats, help="stored bits per quantized weight, "
                   "scales and zero-points included (e.g. 3.25; uniform W4 at group 64 is "
                   "4.3125); several, comma-separated (2.5,3,3.5), make one plan each")
    b.add_argument("--max-bytes", type=_sizes, help="bytes of the quantized linears' codes "
                   "+ scales + zero-points, e.g. 60MB, 1.5GiB, 500kB (kB/MB/GB = 1000^n, "
                   "KiB/MiB/GiB = 1024^n); several, comma-separated, make one plan each")
    p.add_argument("--out", metavar="PLAN.json", help="where to write the plan; with several "
                   "budgets a folder, which gets plan-<budget>.json for each (required unless "
                   "--dry-run)")
    p.add_argument("--dry-run", action="store_true", help="measure and write nothing: show "
                   "each budget's feasible range (under the constraints), the uniform widths "
                   "around it, and whether the sensitivity table and the in-context sweeps it "
                   "needs are cached or would be measured")
    p.add_argument("--granularity", choices=("auto", *GRANULARITIES), default="auto",
                   help="allocation unit: every linear ('layer'), attention / MLP of a block "
                   "('sublayer'), whole blocks ('block'), or 'auto' (default): the exact plan "
                   "at each, keeping the one with the lowest KL measured on --check-samples "
                   "calibration sequences")
    p.add_argument("--check-samples", type=int, default=None,
                   help="calibration samples the auto granularity measures each candidate "
                   "plan on, the first of --samples (default 16 sequences of --seq-len "
                   "tokens; 1024 images for an image classifier, 64 paragraphs for an "
                   "encoder; at most --samples)")
    p.add_argument("--in-context", action=argparse.BooleanOptionalAction, default=True,
                   help="with auto: also measure each block's cost inside the uniform models "
                   "just below and above the budget and add the two plans made from those "
                   "costs to the candidates (default on; two more sweeps of one forward "
                   "per block, kept in FOLDER/sweeps.json for later budgets)")
    p.add_argument("--both-ways", action=argparse.BooleanOptionalAction, default=True,
                   help="with --in-context: one more candidate, inside the uniform model just "
                   "above the budget each block may go down to the width below or up to the "
                   "next width (default on; one more sweep)")
    p.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                   help="with auto: up to this many rounds of local search from the plan "
                   "kept: each block's cost of one width down and one up is measured inside "
                   "that plan, the best moves within the budget are made, and the result is "
                   "kept if its measured KL is lower (default 0; each round costs about two "
                   "in-context sweeps, and is not cached)")
    p.add_argument("--constraint", action="append", type=_constraint, default=[],
                   metavar="PATTERN=BITS", help="pin or bound the widths of the layers a name "
                   "or shell-style pattern matches: PATTERN=BITS, PATTERN>=BITS or "
                   "PATTERN<=BITS (quote it: 'model.layers.0.*=8', '*.mlp.down_proj>=4'); "
                   "repeat for several: they apply in order, each narrowing what the earlier "
                   "ones left a layer, a later one winning a conflict; the budget counts the "
                   "pinned layers too")
    s = p.add_argument_group("sensitivity (cached in FOLDER/sensitivity.json, or "
                             "sensitivity-exact.json for --sensitivity exact)")
    s.add_argument("--sensitivity", choices=("fast", "exact"), default="fast",
                   help="fast (default): one Gauss-Newton estimate of the whole table, a "
                   "forward and --probes backwards per batch (about 2 minutes for the default "
                   "model on a 2-core CPU); exact: the measured cost with one layer changed, a "
                   "forward per layer and width (about 11 minutes there for the built-in ViT, "
                   "whose plans then had up to 10%% less KL; hours for an LLM)")
    s.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help="calibration text: .txt/.jsonl files or a hub text (wikitext2, c4, "
                   "hf:REPO[:CONFIG][@SPLIT]) (default: the Austen novels other than P&P)")
    d = SensitivityConfig()
    s.add_argument("--samples", type=positive, default=None,
                   help=f"calibration sequences (default {d.n_samples}); an image classifier "
                   "measures Fashion-MNIST training images (default 2048), an encoder "
                   "paragraphs of the calibration text (default 128)")
    s.add_argument("--seq-len", type=_sample_len, default=None,
                   help=f"tokens per sequence (default {d.seq_len}, or the model's positions "
                   "where it has fewer; at least 2); an encoder's longest paragraph")
    s.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per forward (default {BATCH_SIZES['fast']}; "
                   f"{BATCH_SIZES['exact']} for --sensitivity exact, whose forwards take no "
                   "gradient; a decoder's exact table runs all --samples at once). Memory "
                   "grows with it: the built-in model's table peaked at 6.3 GiB at 8, 4.0 GiB "
                   "at 2, in the same time (another batch draws other probes, so the table "
                   "differs a little and is measured anew)")
    s.add_argument("--probes", type=int, default=d.n_probes,
                   help="random probes per sequence (more = less noise, linear in time)")
    s.add_argument("--reference-bits", type=int, default=d.reference_bits,
                   help="width of the other layers while one is measured (default: float)")
    s.add_argument("--seed", type=seed_value, default=d.seed, help="seed of samples and probes")
    s.add_argument("--recompute", action="store_true", help="ignore a cached table and cached "
                   "in-context sweeps (FOLDER/sweeps.json)")
    p.add_argument("--model", default=None,
                   help="base model folder, if not the one recorded in the elastic folder")
    p.add_argument("--device", default="cpu",
                   help="device the sensitivity and the KL checks run on (cpu, cuda, ...; "
                   "default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_plan)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _constraint(text: str) -> Constraint:
    try:
        return Constraint.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _floats(text: str) -> list[tuple[str, float]]:
    """'2.5,3' -> [('2.5', 2.5), ('3', 3.0)]: each budget with the text that names its file."""
    out = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        try:
            out.append((part, float(part)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot read bits per weight from {part!r}; use numbers such as 3.25 or "
                "2.5,3,3.5") from None
    if not out:
        raise argparse.ArgumentTypeError("no budget given; use numbers such as 3.25")
    return out


def _sizes(text: str) -> list[tuple[str, int]]:
    """'50MB,60MB' -> [('50MB', 50_000_000), ('60MB', 60_000_000)]."""
    out = [(part.replace(" ", ""), _size(part))  # '50 kB' names its plan file plan-50kB.json
           for part in filter(None, (x.strip() for x in text.split(",")))]
    if not out:
        raise argparse.ArgumentTypeError("no budget given; use sizes such as 60MB")
    return out


def _budget_paths(a: argparse.Namespace) -> list[tuple[dict[str, Any], Path | None]]:
    """Each budget of ``--avg-bits`` / ``--max-bytes`` with the file its plan goes to: --out
    itself for one budget, FOLDER/plan-<budget>.json for several (repeats refused); None
    without --out (--dry-run). A file that is not a plan, a name a model folder keeps for its
    own files and a model folder for several plans are refused
    (:func:`quept.api.folders.check_plan_out`)."""
    key, unit = ("avg_bits", "bits") if a.avg_bits is not None else ("max_bytes", "")
    given = a.avg_bits if a.avg_bits is not None else a.max_bytes
    values = [v for _, v in given]
    if len(set(values)) < len(values):
        raise ConfigError(f"--{key.replace('_', '-')} names a budget twice: "
                          f"{', '.join(t for t, _ in given)}")
    if a.out is None:
        return [({key: v}, None) for v in values]  # --dry-run: nothing is written
    if not a.out.strip():
        raise ConfigError("--out is empty; give the plan file to write, e.g. plan.json (or a "
                          "folder for several budgets)")
    out = Path(a.out)
    if len(given) == 1:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; with one budget --out names the plan "
                              "file (PLAN.json)")
        check_plan_out(out, "--out ")  # no model file, cache or other file overwritten
        return [({key: given[0][1]}, out)]
    if out.suffix == ".json" or out.is_file():
        raise ConfigError(f"{len(given)} budgets make {len(given)} plans: --out must name a "
                          f"folder for them, got {out}")
    paths = [out / f"plan-{t}{unit}.json" for t, _ in given]
    check_plans_folder(out, paths, "--out ")
    return [({key: v}, path) for (_, v), path in zip(given, paths)]


def _print_plan(plan: Plan, title: str) -> None:
    hist = "  ".join(f"W{b}: {n}" for b, n in plan.histogram().items())
    cons = f"; constraints: {', '.join(plan.constraints)}" if plan.constraints else ""
    print(f"\n{title}\n{plan.bits_per_weight:.4f} bits per weight stored, "
          f"{plan.stored_bytes / 1e6:.2f} MB of quantized linears; layers per width: {hist}"
          f"{cons}")


PLAN_SAMPLES = {"causal-lm": (32, 16), "image-classification": (2048, 1024), "encoder": (128, 64)}
"""Default (--samples, --check-samples) of `quept plan` by task: sequences, images, paragraphs."""


def cmd_plan(a: argparse.Namespace) -> dict[str, Any]:
    from quept.models import family_for_type

    for name in ("check_samples", "batch_size"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if a.refine < 0:
        raise ConfigError(f"--refine must be >= 0 (rounds of local search), got {a.refine}")
    if a.refine and (a.granularity != "auto"):
        raise ConfigError(f"--refine starts from the plan --granularity auto keeps; with "
                          f"--granularity {a.granularity} no KL is measured to refine against")
    if a.out is None and not a.dry_run:
        raise ConfigError("--out is required: the plan file (PLAN.json), or a folder for several "
                          "budgets; --dry-run shows what a plan would need and writes nothing")
    budgets = _budget_paths(a)
    check_device(a.device, "--device")
    folder = Path(a.folder)
    _refuse_non_elastic(folder, api.model_kind(folder))  # a folder named by what it holds
    meta = folder_meta(folder, "elastic")  # a damaged or mixed-up folder named before options
    spec = QuEPTConfig.from_dict(meta["config"]).spec
    task = family_for_type(meta["model_type"]).task
    if task == "image-classification":
        _refuse_text_options(a, "calib_text", "seq_len")
    samples, check_samples = PLAN_SAMPLES[task]
    d = SensitivityConfig()
    cfg = SensitivityConfig(n_samples=samples if a.samples is None else a.samples,
                            seq_len=d.seq_len if a.seq_len is None else a.seq_len,
                            batch_size=a.batch_size,
                            n_probes=a.probes, reference_bits=a.reference_bits, seed=a.seed,
                            method=a.sensitivity)
    check_samples = _check_count(a.check_samples, check_samples, cfg.n_samples)
    if a.reference_bits is not None:
        check_widths(a.reference_bits, spec, "--reference-bits")
    if task != "image-classification":
        check_texts(a, calib_text="calib")
    model, tok = api.load(folder, model=a.model)
    model.to(a.device)
    if task != "image-classification" and a.seq_len is None:
        cfg = _default_seq_len(cfg, model, a.json)
    for budget, _ in budgets:  # every budget's feasibility first, from the layer shapes alone
        api.check_budget(model, **budget, constraints=a.constraint)
    ids = _plan_inputs(a, model, tok, task, cfg)
    objective = objective_for(model)
    check = objective.take(ids, 0, check_samples)
    if a.dry_run:
        return _plan_dry_run(a, model, folder, ids, check, cfg, [b for b, _ in budgets])
    t0 = time.perf_counter()
    table = api.sensitivity(model, ids, cfg, cache=folder / cfg.cache_name,
                            recompute=a.recompute, progress=not a.json)
    sens_s: float | None = time.perf_counter() - t0
    results = []
    # auto: each budget's plan is a candidate at the next; as that one kept the plan before
    # it as a candidate, measured KL never rises with the budget
    made: list[Plan] = []
    for budget, out in sorted(budgets, key=lambda b: next(iter(b[0].values()))):  # smallest first
        t1 = time.perf_counter()
        sweeps = (api.sweep_cache(model, check, folder / api.SWEEPS_JSON,
                                  recompute=a.recompute and not made)
                  if a.granularity == "auto" and a.in_context else None)
        plan = api.plan(model, table, **budget, granularity=a.granularity, check_ids=check,
                        in_context=a.in_context, both_ways=a.both_ways, cache=sweeps,
                        constraints=a.constraint, refine=a.refine,
                        earlier=made[-1:] if a.granularity == "auto" else (),
                        progress=not a.json)
        made.append(plan)
        alloc_s = time.perf_counter() - t1
        plan.save(out)
        used = {} if sweeps is None else {"measured": sweeps.measured, "reused": sweeps.reused}
        widest = _widest_note(table, plan, budget, a.constraint)
        if not a.json:
            _report_plan(plan, out, sens_s, alloc_s, used, cfg.method)
            if widest:
                print(f"note: {widest}")
        results.append({"out": str(out), **plan.to_dict(), "chosen": plan.label,
                        "sensitivity": cfg.method, "sensitivity_seconds": sens_s,
                        "allocation_seconds": alloc_s,
                        "in_context_sweeps": used or None, "note": widest})
        sens_s = None  # measured (or read) once, for the first plan
    if not a.json:
        first, it = results[0]["out"], "it" if len(results) == 1 else "one"
        run = (f"`quept run {a.folder} --plan {first} --prompt TEXT` generates with {it} on "
               "packed layers, " if task == "causal-lm" else "")
        print(f"next: `quept eval {a.folder} --plan {a.out}` measures "
              f"{'it' if len(results) == 1 else 'them all'}, {run}`quept export "
              f"{a.folder} --plan {first} --out DIR` packs {it}")
    return results[0] if len(results) == 1 else {"plans": results}


PLAN_FROM = {"compact": "a compact checkpoint is planned from the elastic folder it came "
                         "from: give that folder (plans apply to both)",
             "packed": "a packed model holds one configuration: give the elastic folder it "
                       "was exported from",
             "hf": "make an elastic folder of it first: `quept quantize --model FOLDER --out "
                   "ELASTIC`, then `quept plan ELASTIC`"}
"""What `quept plan` needs instead, by the :func:`~quept.api.folder_kind` of a folder it
refuses."""


def _check_count(given: int | None, default: int, n_samples: int) -> int:
    """How many of the ``n_samples`` sensitivity inputs the auto granularity checks its plans
    on: the first ``given`` (--check-samples), which must not be more than there are, or the
    task's ``default`` (at most ``n_samples``)."""
    if given is None:
        return min(default, n_samples)
    if given > n_samples:
        raise ConfigError(f"--check-samples {given} is more than the {n_samples} inputs the "
                          "sensitivity is measured on (--samples), whose first ones the plans "
                          f"are checked on: give --check-samples {n_samples} or less, or "
                          f"--samples {given} or more")
    return given


def _default_seq_len(cfg: SensitivityConfig, model: torch.nn.Module, quiet: bool
                     ) -> SensitivityConfig:
    """``cfg`` with the default --seq-len cut to the model's positions where it has fewer (a
    tiny encoder's 64), which a note says unless ``quiet``; only a --seq-len the user gave is
    refused for being longer (:func:`_plan_inputs`)."""
    from quept.calib.capture import context_length

    positions = context_length(model)
    if positions is None or cfg.seq_len <= positions:
        return cfg
    if not quiet:
        print(f"note: --seq-len not given: sequences of {positions} tokens, the model's "
              f"positions (the default, {cfg.seq_len}, is longer)")
    return dataclasses.replace(cfg, seq_len=positions)


def _refuse_non_elastic(folder: Path, kind: str) -> None:
    """`quept plan` measures an elastic folder; another folder is refused by what it holds,
    with what to give instead."""
    if kind != "elastic":
        instead = PLAN_FROM.get(kind, "give an elastic folder from `quept quantize`")
        raise ConfigError(f"{folder} holds {KIND_NAMES[kind]}; `quept plan` measures an "
                          f"elastic folder (from `quept quantize`): {instead}")


def _plan_inputs(a: argparse.Namespace, model: torch.nn.Module, tok: Any, task: str,
                 cfg: SensitivityConfig) -> Any:
    """The inputs `quept plan` measures on: ``cfg.n_samples`` windows of ``cfg.seq_len``
    calibration tokens (causal LMs), Fashion-MNIST training images (image classifiers) or
    calibration paragraphs of at most ``cfg.seq_len`` tokens (encoders), drawn with
    ``cfg.seed``."""
    from quept.data.tokens import NotEnoughTextError, calibration_samples, tokenize

    if task == "image-classification":
        return _images(model, "train", cfg.n_samples, cfg.seed)[0]
    text = _text(a.calib_text, "calib")
    if task == "encoder":
        from quept.eval import sentences_from_text

        limit = getattr(model.config, "max_position_embeddings", cfg.seq_len)
        if cfg.seq_len > limit:
            raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the encoder's {limit} "
                              f"positions: give {limit} or less")
        return sentences_from_text(tok, text, cfg.n_samples, max_len=cfg.seq_len, seed=cfg.seed)
    check_context(model, cfg.seq_len, "--seq-len")
    try:
        return calibration_samples(tokenize(tok, text), cfg.n_samples, cfg.seq_len, cfg.seed)
    except NotEnoughTextError as e:
        raise calibration_refusal(e, cfg.n_samples, cfg.seq_len,
                                  _text_name(a.calib_text, "calib")) from None


def _inputs_text(objective: Objective, inputs: Any) -> str:
    """``inputs`` in words: "32 x 128 tokens", "512 images", "128 paragraphs of at most 128
    tokens"."""
    shape = objective.shape(inputs)
    if objective.unit == "token":
        return f"{shape[0]} x {shape[1]} tokens"
    if objective.unit == "image":
        return f"{shape[0]} images"
    return f"{shape[0]} paragraphs of at most {shape[1]} tokens"


def _plan_dry_run(a: argparse.Namespace, model: torch.nn.Module, folder: Path,
                  ids: Any, check: Any, cfg: SensitivityConfig, budgets: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    """What `quept plan` would measure and meet at each budget; nothing is measured or
    written."""
    table = None if a.recompute else api.cached_sensitivity(
        model, ids, cfg, folder / cfg.cache_name)
    objective = objective_for(model)
    sweeps = (None if a.recompute or a.granularity != "auto" or not a.in_context
              else api.sweep_cache(model, check, folder / api.SWEEPS_JSON))
    rows = []
    for budget in budgets:
        pre = api.plan_preview(model, **budget, constraints=a.constraint,
                               granularity=a.granularity, in_context=a.in_context,
                               both_ways=a.both_ways)
        pre["in_context_sweeps"] = [{"base": b, "alt": w, "cached": sweeps is not None
                                     and (b, w) in sweeps} for b, w in pre["in_context_sweeps"]]
        rows.append({"budget": budget, **pre})
    result = {"dry_run": True, "sensitivity_cached": table is not None,
              "sensitivity_method": cfg.method,
              "sensitivity_shape": list(objective.shape(ids)),
              "check_shape": list(objective.shape(check)),
              "constraints": list(constraint_texts(a.constraint)), "refine": a.refine,
              "plans": rows}
    if not a.json:
        cons = f" under the constraints {', '.join(result['constraints'])}" if a.constraint else ""
        n_layers, n_bits = len(elastic_layers(model)), len(model.quept_spec.bits)
        how = (f"{cfg.n_probes} probes per "
               f"{'sequence' if objective.unit == 'token' else objective.unit}"
               if cfg.method == "fast" else
               f"exact: {n_layers} layers x {n_bits} widths = {n_layers * n_bits} forwards")
        print("dry run, nothing measured or written; sensitivity table: "
              + (f"cached in {cfg.cache_name}" if table is not None else
                 f"to measure ({_inputs_text(objective, ids)}, {how})"))
        n_weights = sum(m.in_features * m.out_features
                        for m in elastic_layers(model).values())
        for row in rows:
            (key, value), = row["budget"].items()
            asked = f"--avg-bits {value:g}" if key == "avg_bits" else f"{value:,.0f} bytes"
            lo, hi = row["bits_per_weight_range"]
            above = row["uniform_above"]
            if above is not None:
                widest = f", W{above} does not"
            elif a.constraint:  # no uniform width above it that the constraints allow
                over = (value if key == "avg_bits" else value * 8 / n_weights) > hi
                widest = (", the widest the constraints allow"
                          + ("; the budget is above every plan they allow" if over else ""))
            else:
                widest = ""
            print(f"{asked}: plans{cons} range from {lo:.4f} to "
                  f"{hi:.4f} stored bits per weight; uniform W{row['uniform_below']} fits"
                  + widest)
            if row["in_context_sweeps"]:
                print("  in-context sweeps (one forward per block on "
                      f"{_inputs_text(objective, check)} each): " + ", ".join(
                          f"W{s['base']}->W{s['alt']} "
                          + ("cached" if s["cached"] else "to measure")
                          for s in row["in_context_sweeps"]))
            if a.refine:
                print(f"  then up to {a.refine} round(s) of refinement around the plan kept "
                      f"(two forwards per block each on {_inputs_text(objective, check)}; "
                      "not cached)")
    return result


def _widest_note(table: Any, plan: Plan, budget: dict[str, Any], constraints: list
                 ) -> str | None:
    """A note when the budget is above the widest plan the model (under the constraints) can
    have, so that what it leaves unused is said, not silent; in the budget's own unit: bits
    per weight for --avg-bits, bytes for --max-bytes."""
    hi = feasible_range(table, constraints)[1]
    if budget.get("avg_bits") is not None:
        if budget["avg_bits"] <= hi:
            return None
        what = "the constraints allow" if constraints else "this model can have"
        return (f"the budget ({budget['avg_bits']:.4f} bits per weight) is above the widest "
                f"plan {what} ({hi:.4f}); this plan stores {plan.bits_per_weight:.4f}")
    need = hi * plan.n_weights / 8  # bytes of the widest plan's quantized linears
    if budget["max_bytes"] <= need:
        return None
    widest = ("under the constraints needs: every layer at the widest width they allow" if
              constraints else f"of this model needs: every layer at {max(table.bits)} bits")
    return (f"the budget of {budget['max_bytes']:,.0f} bytes is more than the widest plan "
            f"{widest}, {need:,.0f} bytes of quantized linears; this plan stores "
            f"{plan.stored_bytes:,.0f}")


def _report_plan(plan: Plan, out: Path, sens_s: float | None, alloc_s: float,
                 used: dict[str, int], table_method: str = "fast") -> None:
    checked = "" if plan.checked_kl is None else (
        f"; measured {BY_NAME[plan.objective].cost_name} " + ", ".join(
            f"{g} {cost_number(plan.objective, v)}" for g, v in plan.checked_kl.items()))
    what = "allocation" if plan.checked_kl is None else "allocations and KL checks"
    if used:
        what += (f" with {used['measured']} in-context sweep(s) measured and "
                 f"{used['reused']} reused from {api.SWEEPS_JSON}")
    sens = "table of the first plan" if sens_s is None else f"{sens_s:.1f}s"
    if sens_s is not None and table_method == "exact":
        sens = f"exact table {sens}"
    _print_plan(plan, f"plan written to {out} (sensitivity {sens}, {what} "
                f"{alloc_s:.1f}s); kept: {plan.label}, predicted "
                f"{cost_text(plan.objective, plan.predicted_kl)}{checked}")
    if plan.refinement is not None:
        print(plan.refinement.words())
