"""The public verbs: load_model, prepare, calibrate, set_bits, save, load, evaluate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quept import __version__
from quept.calib import (
    CHECKPOINT_DIR,
    BlockCalibrator,
    BlockReport,
    CalibCheckpoint,
    capture_block_inputs,
)
from quept.calib.capture import check_model_inputs
from quept.calib.checkpoint import PROGRESS_JSON
from quept.config import (
    CalibConfig,
    ConfigError,
    ElasticSpec,
    QuEPTConfig,
    check_bits,
    check_count,
    check_device,
    check_json_fields,
    read_json_object,
)
from quept.data.hub import hub_model_dir, is_repo_id
from quept.data.tokens import calibration_samples, eval_windows, tokenize
from quept.eval import Sentences, fidelity, perplexity, sentence_embeddings, top1_accuracy
from quept.export import compact as _compact
from quept.export.compact import CompactConfig
from quept.export.ct_format import is_compressed_tensors, load_compressed_tensors
from quept.export.gptq import GPTQConfig
from quept.export.gptq import round_gptq as _round_gptq
from quept.export.learned import LearnedRoundingConfig
from quept.export.learned import round_learned as _round_learned
from quept.export.load import load_packed as _load_packed
from quept.export.onnx_format import is_onnx_folder
from quept.export.packed import PACKED_JSON, write_packed
from quept.models import (
    Family,
    UnsupportedModelError,
    family_for,
    family_for_type,
    reparam,
    rotate,
)
from quept.models.kv import head_dim as kv_head_dim
from quept.models.kv import install_kv_attention, kv_linears
from quept.nn import BitsPlan, ElasticLinear, elastic_layers
from quept.nn import set_bits as _set_bits
from quept.nn.state import load_elastic_state
from quept.nn.switch import plan_widths
from quept.ops import GroupSizeError, stored_bits_per_weight
from quept.ops.quant import is_power_of_two
from quept.outputs import marked, unfinished
from quept.search import (
    LayerShape,
    Plan,
    SensitivityCacheError,
    SensitivityConfig,
    SensitivityTable,
    as_layer_widths,
    estimate_sensitivity,
    plan_from_table,
)
from quept.search.exact import configuration_kl, move_kl, unit_swap_kl
from quept.search.objective import checked_objective, cost_number, cost_words, objective_for
from quept.search.plan import (
    GRANULARITIES,
    Constraints,
    bracketing_widths,
    feasible_range,
    in_context_sweeps,
    layer_bits,
    neighbour_moves,
    plan_from_moves,
    plan_from_neighbours,
    plan_from_swaps,
    plan_uniform,
    shape_table,
    swap_means,
    unit_of,
)
from quept.search.plan import check_budget as _check_budget
from quept.search.sensitivity import CACHE_NAMES
from quept.search.sweeps import SweepCache
from quept.search.table import fingerprint as _table_fingerprint

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
ELASTIC_JSON = "quept.json"
ELASTIC_WEIGHTS = "elastic.safetensors"
FORMAT = "quept-elastic"


class ArtifactError(ValueError):
    """A folder is not a valid quept artifact, or does not match the model."""


# --- models ---------------------------------------------------------------------------------
def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """``None``/"default" -> the built-in SmolLM2-135M-Instruct (fetched once); "minilm" -> the
    built-in all-MiniLM-L6-v2 encoder (fetched once); "vit" -> the built-in Fashion-MNIST ViT
    (trained once); else a folder, or a hub model id (OWNER/NAME, fetched once into the
    Hugging Face cache: configs, tokenizer and safetensors weights only)."""
    if model is None or str(model) == DEFAULT_MODEL:
        from quept.data import default_model_dir

        return default_model_dir()
    if str(model) == "minilm":
        from quept.data import encoder_model_dir

        return encoder_model_dir()
    if str(model) == "vit":
        from quept.data import vit_model_dir

        return vit_model_dir()
    path = Path(model)
    if not path.exists() and is_repo_id(str(model)):
        return hub_model_dir(str(model))
    if path.is_dir():
        readable_kind(path)
    if (path / CHECKPOINT_DIR / PROGRESS_JSON).is_file() and not (path / ELASTIC_JSON).is_file():
        raise ArtifactError(
            f"{path} holds an unfinished calibration (its {CHECKPOINT_DIR}), not a model yet: "
            "run the same `quept quantize` command again to resume it (`quept info "
            f"{path}` shows how far it got)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); pass a folder saved "
            "with save_pretrained or a hub model id (OWNER/NAME), omit --model for the built-in "
            "default, or pass 'minilm' for the built-in encoder or 'vit' for the built-in image "
            "classifier"
        )
    return path


def load_model(model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Load a supported model (float32, eval mode) and its tokenizer from a local folder: a causal
    LM, the bare encoder of a BERT-style model, a ViT image classifier (tokenizer None), or a
    LLaVA-OneVision vision-language model (whole model; only its language model is quantized).
    A compressed-tensors folder (``quept export --format compressed-tensors``) is dequantized;
    an ONNX export (``--format onnx``) runs in ONNX Runtime (decoders with their KV cache)."""
    path = resolve_model_dir(model)
    config = read_json_object(path / "config.json", ArtifactError)
    from transformers import AutoConfig

    fam = family_for_type(config.get("model_type"))  # fail before reading weights
    tok = _tokenizer(path) if fam.is_text else None
    if is_onnx_folder(path):
        from quept.export.onnx_format import OrtModel

        net = OrtModel(path)
    elif is_compressed_tensors(path):
        net = load_compressed_tensors(path, fam.model_class())
    else:
        from safetensors import SafetensorError

        quantized = config.get("quantization_config")
        if quantized is not None:
            method = quantized.get("quant_method") if isinstance(quantized, dict) else None
            raise ArtifactError(f"{path} holds a model quantized by {method!r}, which quept does "
                                "not read; quept calibrates float models: pass the float "
                                "model's folder")
        cfg = AutoConfig.from_pretrained(path)
        try:
            net, loading = fam.model_class().from_pretrained(
                path, config=cfg, dtype=torch.float32, use_safetensors=True,
                output_loading_info=True)
        except SafetensorError as e:
            raise ArtifactError(f"the weights in {path} cannot be read: {e}") from None
        # a BERT checkpoint trained without the pooler lacks it; quept's embeddings pool the
        # last hidden states, so that is the one part allowed to be missing
        missing = sorted(k for k in loading["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise ArtifactError(f"{path}: {len(missing)} weights of the model its config.json "
                                f"describes are not in its safetensors files (e.g. "
                                f"{missing[:3]}); the folder is incomplete or mixed up")
    net.eval()
    net.requires_grad_(False)
    net.quept_source = str(model) if model is not None else DEFAULT_MODEL
    return net, tok


# --- prepare / calibrate ----------------------------------------------------------------------
def prepare(model: nn.Module, spec: ElasticSpec | None = None, seed: int = 0) -> nn.Module:
    """Swap every quantizable linear for an :class:`ElasticLinear` (in place); returns model."""
    spec = spec or ElasticSpec()
    if not isinstance(spec, ElasticSpec):
        hint = " (pass its .spec)" if isinstance(spec, QuEPTConfig) else ""
        raise ConfigError(f"prepare takes an ElasticSpec{hint}, got {type(spec).__name__}")
    fam = family_for(model)
    gen = torch.Generator().manual_seed(seed)
    if any(isinstance(m, ElasticLinear) for m in model.modules()):
        raise ConfigError("model is already prepared")
    kv = {}
    if spec.kv_bits is not None:
        dim = kv_head_dim(model)
        kv = dict.fromkeys(kv_linears(fam), (spec.kv_bits, dim, is_power_of_two(dim)))
    if spec.activations == "per-tensor" and not next(model.parameters()).is_meta:
        # calibration folds a reparameterisation into the weights: record them as they are
        model.quept_base_fingerprint = _weights_fingerprint(model, _family_linears(model, fam))
    if spec.rotation != "none":
        _rotate(model, fam, seed)
    for i, block in enumerate(fam.get_blocks(model)):
        for name, lin in fam.block_linears(block).items():
            try:
                new = ElasticLinear(lin, spec, generator=gen)
            except GroupSizeError as e:
                raise GroupSizeError(f"block {i} {name}: {e}") from None
            new.in_rotation = spec.rotation != "none" and name == rotate.ONLINE
            new.kv_quant = kv.get(name)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, new)
    install_kv_attention(model)
    model.quept_spec = spec
    return model


def calibrate(
    model: nn.Module, input_ids: torch.Tensor, config: CalibConfig, *,
    checkpoint_dir: str | os.PathLike | None = None, keep_streams: bool = False,
    progress: bool = True,
) -> list[BlockReport]:
    """Block-wise elastic calibration of a prepared model on ``input_ids`` (N, T).

    With ``checkpoint_dir`` every finished block is saved there and a rerun resumes;
    ``keep_streams`` also keeps the activations that entered every block (not only the next
    one's), so one block's calibration can be studied later from its own inputs.
    A vision-language model is calibrated on text tokens only (no images): image-conditioned
    calibration of its language model is not done.
    """
    fam, spec = family_for(model), _spec_of(model)
    check_device(config.device, "CalibConfig.device")
    if any(m.rounded for m in elastic_layers(model).values()):
        raise ConfigError("the model holds export-time codes (quept.round_gptq or "
                          "quept.round_learned), which calibration would not train; call "
                          "quept.export.gptq.clear_rounding first, or calibrate before rounding")
    x0, kwargs = capture_block_inputs(model, fam, input_ids, config.batch_size)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = CalibCheckpoint(checkpoint_dir, _fingerprint(model, spec, config, input_ids),
                               keep_streams=keep_streams)
    return BlockCalibrator(model, fam, spec, config, kwargs, ckpt, progress).run(x0)


def _rounding_widths(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
                     what: str) -> dict[str, int]:
    """``{layer: bits}`` of the width or plan an export-time rounding is made for, checked."""
    layers = elastic_layers(model)
    if not layers:
        raise ConfigError(f"the model has no elastic layers; {what} needs an elastic "
                          "model (quept.prepare / quept.load)")
    widths = plan_widths(layers, as_layer_widths(bits_or_plan))
    spec = _spec_of(model)
    for name, b in widths.items():
        if b is None:
            raise ConfigError(f"{what} takes a width for every layer, not float ({name})")
        check_bits(b, spec.bits)
    return widths


def round_gptq(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
               inputs: torch.Tensor, config: GPTQConfig | None = None, *,
               progress: bool = True) -> dict[str, float | int]:
    """Choose the codes of one width or plan by GPTQ on the elastic model's learned grid
    (:mod:`quept.export.gptq`), on calibration ``inputs`` (token ids (N, T) or pixel values),
    and switch the model to it. The codes replace round-to-nearest at those widths in the
    model's forward and in every :func:`export` until
    :func:`quept.export.gptq.clear_rounding`; they are not saved with :func:`save`."""
    check_device((config or GPTQConfig()).device, "GPTQConfig.device")
    widths = _rounding_widths(model, bits_or_plan, "GPTQ rounding")
    result = _round_gptq(model, widths, inputs, config or GPTQConfig(), progress=progress)
    model.quept_rounding = "gptq"
    return result


def round_learned(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
                  inputs: torch.Tensor, config: LearnedRoundingConfig | None = None, *,
                  progress: bool = True) -> dict[str, Any]:
    """Learn the codes of one width or plan on the elastic model's learned grid: per-weight
    rounding offsets trained block by block on the error of each block's output against the
    float model's (:mod:`quept.export.learned`), on calibration ``inputs`` (token ids (N, T) or
    pixel values), starting from the model's own round-to-nearest codes; then switch the model
    to it. Like :func:`round_gptq`, the codes replace round-to-nearest at those widths in the
    forward and in every :func:`export` until :func:`quept.export.gptq.clear_rounding`; they
    are not saved with :func:`save`."""
    config = config or LearnedRoundingConfig()
    check_device(config.device, "LearnedRoundingConfig.device")
    widths = _rounding_widths(model, bits_or_plan, "learned rounding")
    result = _round_learned(model, widths, inputs, config, progress=progress)
    model.quept_rounding = "learned"
    return result


def set_bits(model: nn.Module, bits: BitsPlan | Plan, *, rtn: bool = False) -> nn.Module:
    """Switch the elastic model to one width (int), float (None) or a plan: {layer: bits}
    (keys may be shell-style patterns applied in order, ``{"*": 3, "*.mlp.down_proj": 4}``),
    a :class:`quept.search.Plan`, or a plan JSON loaded as a dict. A switchable packed model
    (:func:`load_switchable`) re-packs its layers instead (no float, no RTN there)."""
    switch = getattr(model, "quept_switch", None)
    if switch is not None:
        if rtn:
            raise ConfigError("a switchable packed model has no round-to-nearest mode; "
                              "use the elastic model (quept.load) for RTN")
        switch.set_bits(as_layer_widths(bits))
        return model
    return _set_bits(model, as_layer_widths(bits), rtn=rtn)


# --- mixed precision (DESIGN 2.6) ------------------------------------------------------------
SENSITIVITY_JSON, SENSITIVITY_EXACT_JSON = CACHE_NAMES["fast"], CACHE_NAMES["exact"]
SENSITIVITY_CACHES = tuple(CACHE_NAMES.values())
"""The files a folder's sensitivity tables are cached in, one per SensitivityConfig.method."""
SWEEPS_JSON = "sweeps.json"


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
    config = config or SensitivityConfig()
    if cache is not None and not recompute:
        table = cached_sensitivity(model, input_ids, config, cache)
        if table is not None:
            log.info("reusing the sensitivity table in %s", cache)
            return table
    table = estimate_sensitivity(model, input_ids, config, progress=progress)
    if cache is not None:
        table.save(cache)
    return table


def cached_sensitivity(model: nn.Module, input_ids: torch.Tensor, config: SensitivityConfig,
                       cache: str | os.PathLike) -> SensitivityTable | None:
    """The table in the file ``cache`` if it was measured on this elastic state, base weights,
    tokens and settings; None (and why, logged) otherwise."""
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
    return table


def plan_preview(model: nn.Module, *, avg_bits: float | None = None,
                 max_bytes: int | None = None, constraints: Constraints = None,
                 granularity: str = "auto", in_context: bool = True, both_ways: bool = True
                 ) -> dict[str, Any]:
    """What :func:`plan` would meet at one budget, from the layer shapes alone (nothing is
    measured): the range of stored bits per weight its plans can have (under
    ``constraints``), the uniform widths just below and above the budget, and the in-context
    sweeps ``(base, alt)`` the auto granularity uses there. Raises as :func:`check_budget`."""
    spec = _spec_of(model)
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
    layers = elastic_layers(model)
    spec = _spec_of(model)
    if list(layers) != list(table.shapes) or any(
        table.group_size.get(b) != spec.group_size_for(b) for b in spec.bits
    ):
        raise ArtifactError("the sensitivity table was measured on another model or spec")
    return layers


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
    spec = _spec_of(model)
    _check_budget(elastic_layers(model), {b: spec.group_size_for(b) for b in spec.bits},
                  avg_bits=avg_bits, max_bytes=max_bytes, constraints=constraints)


def plan(model: nn.Module, table: SensitivityTable, *, avg_bits: float | None = None,
         max_bytes: int | None = None, granularity: str = "auto",
         check_ids: torch.Tensor | None = None, in_context: bool = True,
         both_ways: bool = True, cache: MutableMapping | None = None,
         constraints: Constraints = None, refine: int = 0, progress: bool = False) -> Plan:
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
    (:func:`quept.search.plan.swap_means`). ``both_ways`` adds one more: inside the upper
    uniform model, each block may go down to the lower width or up to the next width above
    (one more sweep; :func:`quept.search.plan.plan_from_moves`). ``cache`` (a dict, for one
    model and one ``check_ids``, or a :func:`sweep_cache` that keeps them on disk) keeps those
    sweeps for later budgets between the same two widths. ``progress`` shows each sweep.

    ``constraints`` pin or bound the widths of the layers they name, by name or shell-style
    pattern: ``["model.layers.0.*=8", "*.mlp.down_proj>=4"]`` (:mod:`quept.search.constraints`);
    every candidate keeps them, and the budget counts the pinned layers too.

    ``refine`` (auto only): up to this many rounds of local search from the plan kept: each
    block's cost of moving one width down and one up is measured *in* that plan (two forwards
    per block on ``check_ids``, :func:`quept.search.exact.move_kl`), the best set of moves
    within the budget is chosen exactly (:func:`quept.search.plan.plan_from_neighbours`), and
    the result replaces the plan if its measured KL is lower. The moves' costs are each
    measured alone, so where the whole choice does not lower the KL, choices of at most half
    as many moves, a quarter, ... one are measured in turn; the rounds stop at the first where
    none lowers it. Every try's KL is recorded in ``checked_kl``."""
    _check_table(model, table)
    if granularity != "auto" and granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be 'auto' (the best of candidates measured on "
                          f"check_ids) or one of {GRANULARITIES}, got {granularity!r}")
    check_count(refine, "refine", 0)  # rounds of local search
    if refine and granularity != "auto":
        raise ConfigError(f"refine starts from the plan granularity='auto' keeps, by measured "
                          f"KL; granularity={granularity!r} measures none")
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
    kls = configuration_kl(model, check_ids, list(candidates.values()))
    checked = dict(zip(candidates, kls))
    best = min(checked, key=checked.get)
    objective = candidates[best].objective
    log.info("plan candidates, measured %s: %s; keeping %s", cost_words(objective),
             ", ".join(f"{g} {cost_number(objective, v)}" for g, v in checked.items()), best)
    kept = origin = candidates[best]
    budget = {"avg_bits": avg_bits, "max_bytes": max_bytes, "constraints": constraints}
    prefix = origin.search if origin.granularity == "block" else (
        f"{origin.granularity} {origin.search}")
    for r in range(1, refine + 1):
        moves = neighbour_moves(table, kept.widths, constraints=constraints)
        kl_here, deltas = move_kl(model, check_ids, kept.widths, moves, progress=progress,
                                  desc=f"refining, round {r}")
        better = None
        for step in _refine_steps(table, kept, moves, deltas, kl_here, budget,
                                  f"{prefix}, refined x{r}"):
            kl = configuration_kl(model, check_ids, [step])[0]
            checked[step.label] = kl  # recorded, kept or not
            log.info("refining, round %d: %s, measured %s %s against %s", r, step.label,
                     cost_words(objective), cost_number(objective, kl),
                     cost_number(objective, checked[kept.label]))
            if kl < checked[kept.label]:
                better = step
                break
        if better is None:
            log.info("refining, round %d: no set of moves lowered the measured %s; stopping",
                     r, cost_words(objective))
            break
        kept = better
    return dataclasses.replace(kept, checked_kl=checked)


def _refine_steps(table: SensitivityTable, kept: Plan, moves: Mapping, deltas: Mapping,
                  kl_here: float, budget: dict[str, Any], search: str) -> Iterator[Plan]:
    """The plans one round of :func:`plan`'s refinement tries, best predicted first: the
    exact choice among ``moves`` (:func:`quept.search.plan.plan_from_neighbours`), then, as its
    moves can interact, choices of at most half as many moves, then a quarter, ... down to one
    (a penalty per move, found by bisection, trims them). Plans equal to ``kept`` or to one
    already given are skipped."""
    def step(penalty: float) -> tuple[int, Plan]:
        p = plan_from_neighbours(table, kept.widths, moves, deltas, kl_here, **budget,
                                 search=search, penalty=penalty)
        m = len({unit_of(n, "block") for n, b in p.widths.items() if kept.widths[n] != b})
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


# --- save / load ----------------------------------------------------------------------------
def folder_kind(folder: str | os.PathLike) -> str:
    """"packed", "compact", "elastic", "compressed-tensors", "onnx" or "hf" (a plain Hugging
    Face model folder, or a folder holding none of these); "unfinished" for a folder whose
    writing was stopped before it ended (:func:`quept.outputs.marked`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if unfinished(folder) is not None:
        return "unfinished"
    for name, kind in ((PACKED_JSON, "packed"), (_compact.COMPACT_JSON, "compact"),
                       (ELASTIC_JSON, "elastic")):
        if (folder / name).is_file():
            return kind
    if is_onnx_folder(folder):
        return "onnx"
    return "compressed-tensors" if is_compressed_tensors(folder) else "hf"


KIND_NAMES = {"elastic": "an elastic model", "compact": "a compact checkpoint",
              "packed": "a packed model", "compressed-tensors": "a compressed-tensors export",
              "onnx": "an ONNX export", "hf": "a Hugging Face model",
              "unfinished": "an unfinished write"}
"""Each :func:`folder_kind` in words, as messages name what a folder holds."""


def readable_kind(folder: str | os.PathLike) -> str:
    """The :func:`folder_kind` of a folder about to be read; one whose writing was stopped is
    refused by name."""
    kind = folder_kind(folder)
    if kind == "unfinished":
        raise ArtifactError(f"{folder} holds {unfinished(folder)} whose writing was stopped "
                            "before it ended; run the command that wrote it again (same "
                            "--out), or delete the folder")
    return kind


def check_out_folder(out: str | os.PathLike, writes: str, flag: str = "") -> None:
    """Refuse to write ``writes`` (a :func:`folder_kind` name) into ``out`` when it holds a
    model of another kind, which writing there would spoil; a folder of the same kind is
    replaced, and a folder holding no model (only a calibration checkpoint, say) is used."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}{out} is a file; {KIND_NAMES[writes]} is written as a "
                          "folder: give a folder's path")
    if not out.is_dir():
        return
    held = folder_kind(out)
    if held not in (writes, "unfinished") and (held != "hf" or (out / "config.json").is_file()):
        raise ConfigError(f"{flag}{out} holds {KIND_NAMES[held]}; writing "
                          f"{KIND_NAMES[writes]} there would mix the two and spoil it; give "
                          "another folder")


def save(model: nn.Module, folder: str | os.PathLike, config: QuEPTConfig,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write the elastic state (adapters + clip logits) and a versioned JSON to ``folder``."""
    from quept.nn.state import elastic_state_dict

    folder = Path(folder)
    if not elastic_layers(model):
        raise ConfigError("the model has no elastic layers to save; quept.prepare and "
                          "quept.calibrate it first")
    check_out_folder(folder, "elastic")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "quept_version": __version__,
        "config": config.to_dict(),
        "base_model": getattr(model, "quept_source", DEFAULT_MODEL),
        "model_type": model.config.model_type,
        "base_fingerprint": _weights_fingerprint(model),
        "layers": list(elastic_layers(model)),
        **(dict(extra) if extra else {}),
    }
    tmp = folder / (ELASTIC_WEIGHTS + ".tmp")
    save_file(elastic_state_dict(model), str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, folder / ELASTIC_WEIGHTS)
    _write_meta(folder, meta)
    return folder


def _write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    """The elastic folder's JSON, replaced whole or not at all."""
    tmp = folder / (ELASTIC_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / ELASTIC_JSON)


def record_evaluation(folder: str | os.PathLike, evaluation: Mapping[str, Any]) -> None:
    """Keep what was measured after calibration (metric, data, a row per width) in the elastic
    folder's JSON, where ``quept info`` shows it."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta["evaluation"] = dict(evaluation)
    _write_meta(folder, meta)


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON of the elastic folder ``folder``, checked: its format, and a config, base model,
    model type, base fingerprint and layers of the right kinds (else :class:`ArtifactError`
    naming the file and field)."""
    folder = Path(folder)
    path = folder / ELASTIC_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not a quept elastic folder (no {ELASTIC_JSON}); "
            "make one with `quept quantize --out FOLDER`"
        )
    meta = read_json_object(path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    check_json_fields(meta, _META_FIELDS, path, ArtifactError)
    if not all(isinstance(n, str) for n in meta["layers"]):
        raise ArtifactError(f"{path} is damaged: its 'layers' should all be layer names")
    return meta


_META_FIELDS = {"config": dict, "base_model": str, "model_type": str, "base_fingerprint": str,
                "layers": list}
"""What every elastic folder's JSON holds besides its format, and of which kind."""


def load(folder: str | os.PathLike, model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Rebuild an elastic model from ``folder``; ``model`` overrides the recorded base model."""
    meta = read_meta(folder)
    cfg = QuEPTConfig.from_dict(meta["config"])
    net, tok = load_model(model if model is not None else meta["base_model"])
    if net.config.model_type != meta["model_type"]:
        raise ArtifactError(
            f"{folder} was calibrated on a {meta['model_type']} model, not {net.config.model_type}"
        )
    prepare(net, cfg.spec, seed=cfg.calib.seed)
    if _weights_fingerprint(net) != meta["base_fingerprint"]:
        raise ArtifactError(
            f"the base model weights differ from those {folder} was calibrated on "
            f"(recorded base model: {meta['base_model']!r}); pass the matching --model"
        )
    try:
        state = load_file(str(Path(folder) / ELASTIC_WEIGHTS))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ArtifactError(f"{Path(folder) / ELASTIC_WEIGHTS} cannot be read: {e}") from None
    bad = [k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ArtifactError(f"{Path(folder) / ELASTIC_WEIGHTS} is damaged: {len(bad)} tensor(s) "
                            f"hold non-finite values (e.g. {bad[0]})")
    load_elastic_state(net, state)
    reparam.refold(net, family_for(net))
    return net, tok


# --- deployment: packed models, the compact checkpoint, external formats ----------------------
EXPORT_FORMATS = ("quept", "gguf", "compressed-tensors", "onnx")
EXPORT_KINDS = {"quept": "packed", "compressed-tensors": "compressed-tensors", "onnx": "onnx"}
"""The :func:`folder_kind` each folder format writes (GGUF writes a file)."""


def export(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
           out: str | os.PathLike, format: str = "quept", *, tokenizer: Any = None,
           scale_dtype: str = "float16", head_bits: int | None = None,
           accuracy_level: int = 0) -> dict[str, Any]:
    """Write one configuration of an elastic model: ``"quept"`` = a packed folder ``out``
    (codes at their true width, loadable with :func:`load_packed`; ``head_bits`` also packs
    the output head and a tied embedding); ``"gguf"`` = a llama.cpp GGUF file ``out``;
    ``"compressed-tensors"`` = a Hugging Face folder ``out`` in the format of vLLM and
    transformers' compressed-tensors quantizer; ``"onnx"`` = a folder ``out`` with
    ``model.onnx`` for ONNX Runtime (MatMulNBits layers; ``accuracy_level`` 4 lets its CPU
    kernels compute with int8 activations). Returns a summary (the packed folder's JSON)."""
    widths = as_layer_widths(bits_or_plan)
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {EXPORT_FORMATS}")
    if format == "gguf":
        from quept.export.gguf import write_gguf

        result = write_gguf(model, tokenizer, out, widths)
        return {"format": "gguf", "path": str(out),
                **(result if isinstance(result, Mapping) else {})}
    check_out_folder(out, EXPORT_KINDS[format])
    with marked(out, KIND_NAMES[EXPORT_KINDS[format]]):
        return _export_folder(model, widths, out, format, tokenizer=tokenizer,
                              scale_dtype=scale_dtype, head_bits=head_bits,
                              accuracy_level=accuracy_level)


def _export_folder(model: nn.Module, widths: Any, out: str | os.PathLike, format: str, *,
                   tokenizer: Any, scale_dtype: str, head_bits: int | None,
                   accuracy_level: int) -> dict[str, Any]:
    """:func:`export` of a folder format, once its folder is checked and marked."""
    if format == "quept":
        source = {"base_model": getattr(model, "quept_source", DEFAULT_MODEL)}
        layers = elastic_layers(model)
        chosen = plan_widths(layers, widths)
        if any(chosen[n] in m.rounded for n, m in layers.items()):
            source["rounding"] = getattr(model, "quept_rounding", "gptq")
        return write_packed(model, widths, out, tokenizer, scale_dtype=scale_dtype,
                            head_bits=head_bits, provenance=source)
    if format == "compressed-tensors":
        from quept.export.ct_format import write_compressed_tensors

        return write_compressed_tensors(model, tokenizer, out, widths, scale_dtype=scale_dtype)
    from quept.export.onnx_format import write_onnx

    return write_onnx(model, tokenizer, out, widths, accuracy_level=accuracy_level)


def load_packed(folder: str | os.PathLike, backend: str = "auto") -> tuple[nn.Module, Any]:
    """A packed folder's model (inference modules only, built on meta then filled) and
    tokenizer."""
    readable_kind(folder)
    net = _load_packed(folder, backend=backend)
    net.quept_source = str(folder)
    return net, _folder_tokenizer(folder)


def save_compact(model: nn.Module, folder: str | os.PathLike, config: QuEPTConfig | None = None,
                 tokenizer: Any = None, compact: CompactConfig | None = None) -> dict[str, Any]:
    """Write the compact elastic checkpoint of a calibrated model (every width, ~10 bits per
    weight); ``config`` defaults to the model's spec with default calibration settings."""
    config = config or QuEPTConfig(spec=_spec_of(model))
    if not isinstance(config, QuEPTConfig):
        raise ConfigError(f"save_compact's config is a QuEPTConfig (or None: the model's "
                          f"spec), got {type(config).__name__}")
    check_out_folder(folder, "compact")
    source = {"base_model": getattr(model, "quept_source", DEFAULT_MODEL)}
    with marked(folder, KIND_NAMES["compact"]):
        return _compact.save_compact(model, folder, tokenizer, config, compact, source)


def load_compact(folder: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The elastic model of a compact checkpoint (its weights are the dequantized master) and
    its tokenizer; it switches widths and exports like a calibrated model."""
    readable_kind(folder)
    net, meta = _compact_shell(folder)
    net.quept_compact = _compact.restore_compact(net, folder)
    net.eval().requires_grad_(False)
    return net, _folder_tokenizer(folder)


def _compact_shell(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The compact checkpoint's model built on the meta device and prepared with its spec."""
    from transformers import AutoConfig

    meta = _compact.read_compact_meta(folder)
    cfg = QuEPTConfig.from_dict(meta["config"])
    hf_cfg = AutoConfig.from_pretrained(folder)
    fam = family_for_type(hf_cfg.model_type)
    with torch.device("meta"):
        net = fam.model_class().from_config(hf_cfg)
    prepare(net, cfg.spec, seed=cfg.calib.seed)
    net.quept_source = str(folder)
    return net, meta


def load_switchable(folder: str | os.PathLike, bits: int | Mapping[str, int] | Plan, *,
                    backend: str = "auto", scale_dtype: str = "float16",
                    head_bits: int | None = None, keep_bytes: int = 0,
                    model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """A packed model that switches width at run time: the elastic or compact folder's layers
    packed at ``bits`` (a width or a plan), running on the integer codes like a packed folder;
    :func:`set_bits` re-packs them for another width or plan. From a compact checkpoint only
    its tensors (~10 bits per weight) stay in memory besides the packed codes; from an elastic
    folder the float layers stay. ``head_bits`` (e.g. 8) also packs the output head and a tied
    embedding, as ``quept export --head-bits`` does. ``keep_bytes`` keeps the packed layers of
    widths switched away from, up to that many bytes (least recently used dropped first), so
    that switching back to them packs nothing. ``model.quept_switch`` reports sizes and the
    current widths."""
    from quept.export.switchable import make_switchable, switchable_from_compact

    widths = as_layer_widths(bits)
    if (Path(folder) / PACKED_JSON).is_file():
        raise ArtifactError(f"{folder} is a packed folder of one configuration, which does not "
                            "switch: load it with quept.api.load_packed, or switch from the "
                            "elastic folder or compact checkpoint it was exported from")
    if (Path(folder) / _compact.COMPACT_JSON).is_file():
        net, meta = _compact_shell(folder)
        switchable_from_compact(net, folder, meta, widths, backend=backend,
                                scale_dtype=scale_dtype, head_bits=head_bits,
                                keep_bytes=keep_bytes)
        net.quept_compact = meta
        tok = _folder_tokenizer(folder)
    else:
        net, tok = load(folder, model)
        make_switchable(net, widths, backend=backend, scale_dtype=scale_dtype,
                        head_bits=head_bits, keep_bytes=keep_bytes)
    net.eval().requires_grad_(False)
    return net, tok


def _folder_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer saved in ``folder``, or None when it holds none (e.g. a test model)."""
    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return _tokenizer(folder)


def _tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer of a model folder; a damaged one is refused with the folder named."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers and tokenizers raise many types for a damaged file
        raise ArtifactError(f"the tokenizer in {folder} cannot be loaded ({type(e).__name__}: "
                            f"{e}); its tokenizer files are damaged or of another kind") from None


# --- evaluation -----------------------------------------------------------------------------
@dataclass
class EvalRow:
    bits: int | None
    bits_per_weight: float
    ppl: float
    ppl_rtn: float | None = None


def stored_bits(model: nn.Module, plan: BitsPlan | None = None) -> float:
    """Parameter-weighted bits per quantized weight at ``plan`` (a width, or a plan as
    :func:`set_bits` takes it; a float layer counts 32), scales and zero-points included;
    None = the layers' current widths (of a switchable packed model: the bytes its packed
    layers hold)."""
    switch = getattr(model, "quept_switch", None)
    if switch is not None and plan is None:
        return switch.bits_per_weight()
    layers = elastic_layers(model) if switch is None else switch.skeletons()
    if not layers:
        raise ConfigError("the model has no elastic layers; quept.prepare or quept.load it")
    widths = ({n: m.bits for n, m in layers.items()} if plan is None
              else _checked_widths(layers, plan))
    total, n = 0.0, 0
    for name, m in layers.items():
        b = widths[name]
        numel = m.in_features * m.out_features
        bpw = 32.0 if b is None else stored_bits_per_weight(b, m.spec.group_size_for(b), m.in_features)
        total += bpw * numel
        n += numel
    return total / n


def plan_record(model: nn.Module, widths: Mapping[str, int]) -> Plan:
    """A width per layer chosen by hand (``{layer: bits}``, naming every quantized linear) as
    a :class:`Plan`: the stored bits per weight and bytes it realises on ``model``, scales and
    zero-points included, with no budget and no predicted KL (``search`` "by hand")."""
    switch = getattr(model, "quept_switch", None)
    layers = elastic_layers(model) if switch is None else switch.skeletons()
    chosen = _checked_widths(layers, widths, floats=False)
    n = sum(m.in_features * m.out_features for m in layers.values())
    size = sum(layer_bits(LayerShape(m.out_features, m.in_features), chosen[name],
                          m.spec.group_size_for(chosen[name])) for name, m in layers.items())
    return Plan(dict(chosen), size / n, size / 8, n, search="by hand")


def _checked_widths(layers: Mapping[str, Any], plan: BitsPlan | Plan, floats: bool = True
                    ) -> dict[str, int | None]:
    """``{layer: bits}`` of one width or a plan over ``layers``, each width checked against
    its layer's widths; ``floats``: None (float) is allowed."""
    chosen = plan_widths(layers, as_layer_widths(plan))
    for name, b in chosen.items():
        if b is None and floats:
            continue
        try:
            check_bits(b, layers[name].spec.bits)
        except ConfigError as e:
            raise ConfigError(f"layer {name}: {e}") from None
    return chosen


def _brief(value: Any) -> Any:
    """``value`` for the log: task scores without their per-item results."""
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items() if k != "per_item"}
    return value


def _per_width(model: nn.Module, bits: Sequence[int | None], rtn: bool,
               measure: Callable[[str], Any]) -> list[tuple[int | None, float, Any, Any]]:
    """``measure(label)`` at each width in ``bits`` (None = float) and, with ``rtn``, under RTN
    too: [(bits, stored bits per weight, value, RTN value or None)]. Leaves the model float;
    a switchable packed model (:func:`load_switchable`), which has neither float layers nor
    RTN, goes back to the widths it had. One width (an int, or None) is taken as a list of one."""
    spec = _spec_of(model)
    if bits is None or isinstance(bits, int):
        bits = [bits]
    for b in bits:
        if b is not None:
            check_bits(b, spec.bits)
    switch = getattr(model, "quept_switch", None)
    if switch is not None:
        if rtn or None in bits:
            raise ConfigError("a switchable packed model has no float layers and no RTN; "
                              "evaluate the elastic model (quept.load) for those")
        before = switch.widths
        out = []
        for b in bits:
            switch.set_bits(b)
            out.append((b, switch.bits_per_weight(), measure(f"packed {b}"), None))
        switch.set_bits(before)
        return out
    out = []
    for b in bits:
        set_bits(model, b)
        bpw, value = stored_bits(model), measure(str(b or "float"))
        value_rtn = None
        if rtn and b is not None:
            set_bits(model, b, rtn=True)
            value_rtn = measure(f"rtn {b}")
        out.append((b, bpw, value, value_rtn))
        log.info("bits=%s %s rtn=%s", b, _brief(value), _brief(value_rtn))
    set_bits(model, None)
    for m in elastic_layers(model).values():
        m.clear_cache()
    return out


def evaluate(
    model: nn.Module, windows: torch.Tensor, bits: Sequence[int | None], *, rtn: bool = False,
    batch_size: int = 2, progress: bool = True,
) -> list[EvalRow]:
    """Perplexity of the elastic model (and optionally RTN) at each width in ``bits`` (a list
    of widths, None = float, or one width)."""
    _check_evaluated(model, "causal-lm", windows, "evaluation windows")
    rows = _per_width(model, bits, rtn, lambda label: perplexity(
        model, windows, batch_size, progress, f"eval {label}"))
    return [EvalRow(*row) for row in rows]


@dataclass
class AccuracyRow:
    """One width of :func:`evaluate_accuracy`: top-1 of the elastic model (and of RTN)."""

    bits: int | None
    bits_per_weight: float
    accuracy: float
    accuracy_rtn: float | None = None


def evaluate_accuracy(
    model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
    bits: Sequence[int | None], *, rtn: bool = False, batch_size: int = 256,
    progress: bool = True,
) -> list[AccuracyRow]:
    """Top-1 accuracy of an elastic image classifier (and optionally RTN) at each width."""
    _check_evaluated(model, "image-classification", pixel_values, "pixel values")
    rows = _per_width(model, bits, rtn, lambda label: top1_accuracy(
        model, pixel_values, labels, batch_size, progress, f"accuracy {label}"))
    return [AccuracyRow(*row) for row in rows]


# --- helpers --------------------------------------------------------------------------------
_EVALUATORS = {"causal-lm": "quept.evaluate (perplexity)",
               "image-classification": "quept.evaluate_accuracy (top-1)",
               "encoder": "quept.evaluate_embeddings (embedding fidelity)"}


def _check_evaluated(model: nn.Module, task: str, inputs: Any, what: str) -> None:
    """The model is of ``task`` (else the evaluator that fits it is named) and ``inputs`` are
    what it runs on (:func:`quept.calib.capture.check_model_inputs`)."""
    fam = family_for(model)
    if fam.task != task:
        raise ConfigError(f"a {fam.name} model is evaluated by {_EVALUATORS[fam.task]}, not by "
                          f"{_EVALUATORS[task]}")
    check_model_inputs(model, fam, inputs, what)


def _spec_of(model: nn.Module) -> ElasticSpec:
    spec = getattr(model, "quept_spec", None)
    if spec is None:
        raise ConfigError("the model is not prepared; call quept.prepare(model, spec) first")
    return spec


def _rotate(model: nn.Module, fam: Family, seed: int) -> None:
    """Rotate a decoder for ElasticSpec.rotation, first recording the fingerprint of its
    unrotated weights (what a loaded folder is checked against). A model built on the meta
    device (a compact checkpoint about to be filled with its stored, rotated tensors) is
    left as it is."""
    if fam.final_norm is None:
        raise ConfigError(f"rotation is implemented for LLaMA-family decoders; a {fam.name} "
                          "model cannot be rotated (use rotation 'none')")
    if model.get_input_embeddings().weight.is_meta:
        return
    if getattr(model, "quept_base_fingerprint", None) is None:
        model.quept_base_fingerprint = _weights_fingerprint(model, _family_linears(model, fam))
    rotate.rotate_decoder(model, fam.get_blocks(model), model.get_submodule(fam.final_norm),
                          seed)


def _family_linears(model: nn.Module, fam: Family) -> dict[str, nn.Module]:
    """The linears ``prepare`` wraps, by qualified name, before it wraps them."""
    names = {f"{path}.{n}" for path in fam.block_paths(model) for n in fam.linears}
    return {n: m for n, m in model.named_modules() if n in names}


def _weights_fingerprint(model: nn.Module, layers: Mapping[str, nn.Module] | None = None) -> str:
    """A hash of a sample of the quantized linears' float weights (of the unrotated model)."""
    if layers is None:
        recorded = getattr(model, "quept_base_fingerprint", None)
        if recorded is not None:
            return recorded
        layers = elastic_layers(model)
    h = hashlib.sha256()
    for name, m in layers.items():
        w = m.weight.detach().float().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(m.weight.shape)).encode())
        h.update(w[:: max(1, w.numel() // 4096)].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(model: nn.Module, spec: ElasticSpec, cfg: CalibConfig,
                 ids: torch.Tensor) -> dict[str, Any]:
    return {
        "spec": spec.to_dict(),
        "calib": cfg.to_dict(),
        "model": _weights_fingerprint(model),
        "data": hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16],
    }


def samples_from_text(tokenizer: Any, text: str, cfg: CalibConfig | None = None
                      ) -> torch.Tensor:
    """Calibration token windows (n_samples, seq_len) drawn from ``text`` with cfg.seed
    (``cfg`` None: the default :class:`CalibConfig`). With a
    BERT-style tokenizer (a [CLS] and a [SEP] token) each window is [CLS] + seq_len - 2 tokens
    + [SEP], the shape an encoder saw in training."""
    cfg = cfg or CalibConfig()
    ids = tokenize(tokenizer, text)
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        return calibration_samples(ids, cfg.n_samples, cfg.seq_len, cfg.seed)
    body = calibration_samples(ids, cfg.n_samples, cfg.seq_len - 2, cfg.seed)
    col = lambda t: torch.full((body.shape[0], 1), t, dtype=body.dtype)  # noqa: E731
    return torch.cat([col(cls), body, col(sep)], dim=1)


@dataclass
class EmbeddingRow:
    """One width of :func:`evaluate_embeddings`: fidelity to the float encoder's embeddings."""

    bits: int | None
    bits_per_weight: float
    cosine_mean: float
    cosine_min: float
    neighbour_agreement: float
    rtn: dict[str, float] | None = None


def evaluate_embeddings(
    model: nn.Module, sentences: Sentences, bits: Sequence[int | None], *, rtn: bool = False,
    batch_size: int = 16, progress: bool = True,
) -> list[EmbeddingRow]:
    """Embedding fidelity of an elastic encoder (and optionally RTN) at each width in ``bits``
    against its own float embeddings of ``sentences`` (:func:`quept.eval.sentences_from_text`)."""
    if not isinstance(sentences, Sentences):
        raise ConfigError("evaluate_embeddings takes quept.eval.Sentences (token ids and their "
                          f"attention mask; quept.eval.sentences_from_text makes them), got "
                          f"{type(sentences).__name__}")
    _check_evaluated(model, "encoder", sentences, "sentences")
    set_bits(model, None)
    ref = sentence_embeddings(model, sentences, batch_size, progress, "embed float")
    rows = _per_width(model, bits, rtn, lambda label: fidelity(
        sentence_embeddings(model, sentences, batch_size, progress, f"embed {label}"), ref))
    return [EmbeddingRow(b, bpw, **f, rtn=f_rtn) for b, bpw, f, f_rtn in rows]


@dataclass
class TaskRow:
    """One width of :func:`evaluate_tasks`: {task: {metric: value}} (and under RTN)."""

    bits: int | None
    bits_per_weight: float
    scores: dict[str, dict[str, float]]
    scores_rtn: dict[str, dict[str, float]] | None = None


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], bits: Sequence[int | None], *,
    rtn: bool = False, text: str | None = None, limit: int | None = None, batch_size: int = 16,
    include_path: str | os.PathLike | None = None, runner: Callable[[], Any] | None = None,
) -> list[TaskRow]:
    """Zero-shot task scores of an elastic causal LM (and optionally RTN) at each width in
    ``bits``, through lm-evaluation-harness (:class:`quept.eval.harness.TaskRunner`: built-in
    tasks "last-word" and "next-sentence" made from ``text``, or lm-evaluation-harness task
    names). Needs the ``lmeval`` extra. ``runner``: a :class:`~quept.eval.harness.TaskRunner`
    already made for this model (then the task options are its own)."""
    from quept.eval.harness import TaskRunner

    if runner is None:
        runner = TaskRunner(model, tokenizer, tasks, text=text, limit=limit,
                            batch_size=batch_size, include_path=include_path)
    return [TaskRow(*row) for row in _per_width(model, bits, rtn, lambda label: runner())]


def windows_from_text(tokenizer: Any, text: str, seq_len: int = 512,
                      n_windows: int | None = 32) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens of ``text``
    ((n_windows, seq_len) token ids, for :func:`evaluate`); ``n_windows=None``: every full
    window."""
    return eval_windows(tokenize(tokenizer, text), seq_len, n_windows)


__all__ = [
    "AccuracyRow", "ArtifactError", "CompactConfig", "EmbeddingRow", "EvalRow", "Family", "Plan", "SensitivityConfig", "TaskRow",
    "UnsupportedModelError", "calibrate", "evaluate", "evaluate_accuracy", "evaluate_embeddings", "evaluate_tasks", "export", "load", "load_compact",
    "load_model", "load_packed", "plan", "plan_candidates", "prepare", "read_meta", "resolve_model_dir", "round_gptq", "round_learned",
    "samples_from_text", "save", "save_compact", "sensitivity", "set_bits", "stored_bits",
    "sweep_cache", "windows_from_text",
]
