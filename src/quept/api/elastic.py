"""Making and switching the elastic model: prepare, calibrate, export-time rounding, set_bits."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quept.calib import BlockCalibrator, BlockReport, CalibCheckpoint, capture_block_inputs
from quept.checks import ConfigError, check_bits, check_config, check_device
from quept.config import CalibConfig, ElasticSpec, check_seed
from quept.data.tokens import NotEnoughTextError, calibration_samples, tokenize
from quept.export.gptq import GPTQConfig
from quept.export.gptq import round_gptq as _round_gptq
from quept.export.learned import LearnedRoundingConfig
from quept.export.learned import round_learned as _round_learned
from quept.export.packed import PackedArgumentError
from quept.models import Family, family_for, rotate
from quept.models.kv import head_dim as kv_head_dim
from quept.models.kv import install_kv_attention, kv_linears
from quept.nn import BitsPlan, ElasticLinear, elastic_layers
from quept.nn import set_bits as _set_bits
from quept.nn.switch import plan_widths
from quept.ops import GroupSizeError, n_groups
from quept.ops.quant import is_power_of_two
from quept.search import Plan, as_layer_widths
from quept.search.budget import layer_bits
from quept.search.plan import INLINE_EXAMPLE, PLAN_FORMAT
from quept.search.plan_files import read_plan, unwrap_plan
from quept.search.table import LayerShape

log = logging.getLogger(__name__)


def prepare(model: nn.Module, spec: ElasticSpec | None = None, seed: int = 0) -> nn.Module:
    """Swap every quantizable linear for an :class:`ElasticLinear` (in place); returns model."""
    spec = check_config(ElasticSpec() if spec is None else spec, ElasticSpec, "prepare")
    fam = family_for(model)
    gen = torch.Generator().manual_seed(check_seed(seed, "prepare's seed"))
    if any(isinstance(m, ElasticLinear) for m in model.modules()):
        raise ConfigError("model is already prepared")
    _check_group_sizes(fam, model, spec)  # before anything is rotated or swapped
    if getattr(model, "quept_rest_fingerprint", None) is None and not _is_meta(model):
        model.quept_rest_fingerprint = rest_fingerprint(model, _family_linears(model, fam))
    model.quept_seed = int(seed)
    kv = {}
    if spec.kv_bits is not None:
        dim = kv_head_dim(model)
        kv = dict.fromkeys(kv_linears(fam), (spec.kv_bits, dim, is_power_of_two(dim)))
    if spec.activations == "per-tensor" and not next(model.parameters()).is_meta:
        # calibration folds a reparameterisation into the weights: record them as they are
        model.quept_base_fingerprint = weights_fingerprint(model, _family_linears(model, fam))
    if spec.rotation != "none":
        _rotate(model, fam, seed)
    for block in fam.get_blocks(model):
        for name, lin in fam.block_linears(block).items():
            new = ElasticLinear(lin, spec, generator=gen)
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
    fam, spec = family_for(model), spec_of(model)
    check_device(check_config(config, CalibConfig, "calibrate").device, "CalibConfig.device")
    if any(m.rounded for m in elastic_layers(model).values()):
        raise ConfigError("the model holds export-time codes (quept.round_gptq or "
                          "quept.round_learned), which calibration would not train; call "
                          "quept.export.gptq.clear_rounding first, or calibrate before rounding")
    x0, kwargs = capture_block_inputs(model, fam, input_ids, config.batch_size)
    _check_inputs(input_ids, config)  # after capture's checks of what the inputs are
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = CalibCheckpoint(checkpoint_dir, _fingerprint(model, spec, config, input_ids),
                               keep_streams=keep_streams)
    if getattr(model, "quept_calibrated", False):
        log.warning("the model is already calibrated: calibrating again searches its clips "
                    "afresh and trains its adapters on from where they are; prepare the base "
                    "model again to start from scratch")
    reports = BlockCalibrator(model, fam, spec, config, kwargs, ckpt, progress).run(x0)
    model.quept_calibrated = True
    return reports


def _check_inputs(input_ids: Any, config: CalibConfig) -> None:
    """Refuse calibration inputs that are not the ``config.n_samples`` samples (of
    ``config.seq_len`` tokens) the config records: its schedule counts its steps from them."""
    tokens = not input_ids.is_floating_point() and input_ids.dim() == 2  # else pixel values
    given, want = (tuple(input_ids.shape[:2]), (config.n_samples, config.seq_len)) if tokens \
        else ((input_ids.shape[0],), (config.n_samples,))
    if given != want:
        say = lambda s: f"{s[0]} samples" + (f" of {s[1]} tokens" if tokens else "")  # noqa: E731
        raise ConfigError(
            f"calibrate was given {say(given)}, but its config says {say(want)}: the learning-rate "
            "schedule counts its steps from the config, and the config is what an elastic "
            "folder records; draw the samples with the same config (quept.samples_from_text("
            "tok, text, config)) or give a config that describes them (dataclasses.replace("
            "config, n_samples=..., seq_len=...))")


def _rounding_widths(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
                     what: str) -> dict[str, int]:
    """``{layer: bits}`` of the width or plan an export-time rounding is made for, checked."""
    layers = elastic_layers(model)
    if not layers:
        raise ConfigError(f"the model has no elastic layers; {what} needs an elastic "
                          "model (quept.prepare / quept.load)")
    widths = plan_widths(layers, as_layer_widths(bits_or_plan))
    spec = spec_of(model)
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
    config = check_config(GPTQConfig() if config is None else config, GPTQConfig, "round_gptq")
    check_device(config.device, "GPTQConfig.device")
    widths = _rounding_widths(model, bits_or_plan, "GPTQ rounding")
    result = _round_gptq(model, widths, inputs, config, progress=progress)
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
    config = check_config(LearnedRoundingConfig() if config is None else config,
                          LearnedRoundingConfig, "round_learned")
    check_device(config.device, "LearnedRoundingConfig.device")
    widths = _rounding_widths(model, bits_or_plan, "learned rounding")
    result = _round_learned(model, widths, inputs, config, progress=progress)
    model.quept_rounding = "learned"
    return result


def set_bits(model: nn.Module, bits: BitsPlan | Plan, *, rtn: bool = False) -> nn.Module:
    """Switch the elastic model to one width (int), float (None) or a plan: {layer: bits}
    (keys may be shell-style patterns applied in order, ``{"*": 3, "*.mlp.down_proj": 4}``),
    a :class:`quept.search.Plan` (refused where its record says it was made for another
    model), a plan JSON loaded as a dict, or a plan file's path. A switchable packed model
    (:func:`load_switchable`) re-packs its layers instead (no float, no RTN there)."""
    switch = getattr(model, "quept_switch", None)
    bits = as_plan(bits)
    if isinstance(bits, Plan):  # made for this model? (checked before any layer switches)
        check_plan_record(elastic_layers(model) if switch is None else switch.skeletons(), bits)
    if switch is not None:
        if rtn or bits is None:
            lacks, use = ("round-to-nearest mode", "RTN") if rtn else ("float layers", "float")
            raise PackedArgumentError(f"a switchable packed model has no {lacks}; use the "
                                      f"elastic model (quept.load) for {use}")
        switch.set_bits(as_layer_widths(bits))
        return model
    return _set_bits(model, as_layer_widths(bits), rtn=rtn)


def as_plan(bits: Any) -> Any:
    """A plan file's path or an inline plan text (``'*=3,model.layers.0.*=8'``) read, and a
    plan JSON loaded as a dict made a :class:`Plan`; a width or a mapping as given."""
    if isinstance(bits, str) and not os.path.exists(bits):
        text = bits.strip()
        if text.isdigit() or text.startswith("{"):
            what = (f"the width {int(text)}" if text.isdigit()
                    else "the dict json.loads gives")
            raise ConfigError(f"{bits!r} is text, read as a plan file's path or an inline plan "
                              f"(e.g. {INLINE_EXAMPLE}), and names neither; pass {what}")
    if isinstance(bits, (str, os.PathLike)):
        return read_plan(bits)
    if isinstance(bits, Mapping) and bits.get("format") == PLAN_FORMAT:
        return Plan.from_dict(bits)
    return unwrap_plan(bits, "the plan") if isinstance(bits, Mapping) else bits


def realised(layers: Mapping[str, Any], widths: Any) -> tuple[dict[str, int], int, int]:
    """What a plan (anything :func:`checked_widths` takes, no float layer) realises on
    ``layers``: the width per layer, the quantized weights and their stored bits (codes,
    scales and zero-points, :func:`quept.search.budget.layer_bits`)."""
    chosen = checked_widths(layers, widths, floats=False)
    n = sum(m.in_features * m.out_features for m in layers.values())
    size = sum(layer_bits(LayerShape(m.out_features, m.in_features), chosen[name],
                          m.spec.group_size_for(chosen[name])) for name, m in layers.items())
    return chosen, n, size


def check_plan_record(layers: Mapping[str, Any], plan: Plan, where: str = "the plan") -> float:
    """Refuse a :class:`Plan` whose record (weights, stored bytes, bits per weight) is not what
    its widths give on ``layers``: it was made for another model or spec, and its budget would
    be reported wrong. Returns the bits per weight it realises."""
    _, n, size = realised(layers, plan)
    for key, real, recorded in (("weights", n, plan.n_weights),
                                ("stored bytes", size / 8, plan.stored_bytes),
                                ("bits per weight", size / max(n, 1), plan.bits_per_weight)):
        if not math.isclose(real, recorded, rel_tol=1e-9, abs_tol=1e-9):
            raise ConfigError(
                f"{where} records {recorded:,.6g} {key} but gives {real:,.6g} on this model: it "
                "was made for another model or spec; make one for this model (quept plan)")
    return size / max(n, 1)


def checked_widths(layers: Mapping[str, Any], plan: BitsPlan | Plan, floats: bool = True
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


def _check_group_sizes(fam: Family, model: nn.Module, spec: ElasticSpec) -> None:
    """Every group size of ``spec`` divides the input width of every linear ``prepare`` wraps
    (else :class:`GroupSizeError` naming the block and layer), so a refused spec leaves the
    model as it was."""
    for i, block in enumerate(fam.get_blocks(model)):
        for name, lin in fam.block_linears(block).items():
            for b in spec.bits:
                try:
                    n_groups(lin.in_features, spec.group_size_for(b))
                except GroupSizeError as e:
                    at = f", {b} bits" if spec.group_size else ""  # widths with sizes of their own
                    raise GroupSizeError(f"block {i} {name}{at}: {e}") from None


def spec_of(model: nn.Module) -> ElasticSpec:
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
        model.quept_base_fingerprint = weights_fingerprint(model, _family_linears(model, fam))
    rotate.rotate_decoder(model, fam.get_blocks(model), model.get_submodule(fam.final_norm),
                          seed)


def _family_linears(model: nn.Module, fam: Family) -> dict[str, nn.Module]:
    """The linears ``prepare`` wraps, by qualified name, before it wraps them."""
    names = {f"{path}.{n}" for path in fam.block_paths(model) for n in fam.linears}
    return {n: m for n, m in model.named_modules() if n in names}


def weights_fingerprint(model: nn.Module, layers: Mapping[str, nn.Module] | None = None) -> str:
    """A hash of a sample of the quantized linears' float weights (of the unrotated model)."""
    if layers is None:
        recorded = getattr(model, "quept_base_fingerprint", None)
        if recorded is not None:
            return recorded
        layers = elastic_layers(model)
    h = hashlib.sha256()
    for name, m in layers.items():
        _hash_sample(h, name, m.weight)
    return h.hexdigest()[:16]


def _hash_sample(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed ``h`` a tensor's name, shape and about 4096 of its values, evenly strided (taken
    before the float conversion, so a large bfloat16 embedding is not copied whole)."""
    w = t.detach().reshape(-1)
    h.update(name.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(w[:: max(1, w.numel() // 4096)].float().cpu().contiguous().numpy().tobytes())


def rest_fingerprint(model: nn.Module, linears: Mapping[str, nn.Module]) -> str:
    """A hash of a sample of every parameter but the weights of ``linears`` (the quantized
    linears, which :func:`weights_fingerprint` covers): the embeddings, norms, head and biases
    an elastic folder takes from its base model, as the base model holds them."""
    skip = {f"{name}.weight" for name in linears}
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name in skip:
            continue
        _hash_sample(h, name, p)
    return h.hexdigest()[:16]


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _fingerprint(model: nn.Module, spec: ElasticSpec, cfg: CalibConfig,
                 ids: torch.Tensor) -> dict[str, Any]:
    return {
        "spec": spec.to_dict(),
        "calib": cfg.to_dict(),
        "model": weights_fingerprint(model),
        "base": getattr(model, "quept_rest_fingerprint", None),  # embeddings, norms, head
        "prepare_seed": getattr(model, "quept_seed", None),  # draws a rotation
        "data": hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16],
    }


def check_text(tokenizer: Any, text: Any, what: str) -> str:
    """``text`` (one string) for ``what``, with a tokenizer to read it; refused otherwise."""
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError(f"{what} needs the model's tokenizer (quept.load_model returns it); "
                          f"got {type(tokenizer).__name__} (an image classifier calibrates on "
                          "pixel values, not text)")
    if not isinstance(text, str):
        raise ConfigError(f"{what} reads one text (a str; join several with '\\n\\n'), got "
                          f"{type(text).__name__}")
    if not text.strip():
        raise ConfigError(f"{what} was given an empty text")
    return text


def samples_from_text(tokenizer: Any, text: str, cfg: CalibConfig | None = None
                      ) -> torch.Tensor:
    """Calibration token windows (n_samples, seq_len) drawn from ``text`` with cfg.seed
    (``cfg`` None: the default :class:`CalibConfig`). With a
    BERT-style tokenizer (a [CLS] and a [SEP] token) each window is [CLS] + seq_len - 2 tokens
    + [SEP], the shape an encoder saw in training."""
    cfg = check_config(CalibConfig() if cfg is None else cfg, CalibConfig, "samples_from_text")
    ids = tokenize(tokenizer, check_text(tokenizer, text, "samples_from_text"))
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        return calibration_samples(ids, cfg.n_samples, cfg.seq_len, cfg.seed)
    if cfg.seq_len < 3:
        raise ConfigError(f"seq_len {cfg.seq_len} leaves no text in an encoder's window "
                          "([CLS] and [SEP] take two tokens): use seq_len >= 3, e.g. 128")
    try:
        body = calibration_samples(ids, cfg.n_samples, cfg.seq_len - 2, cfg.seed)
    except NotEnoughTextError as e:
        raise NotEnoughTextError(f"{e} (an encoder's window of seq_len={cfg.seq_len} tokens "
                                 f"holds [CLS] and [SEP] around {cfg.seq_len - 2} tokens of "
                                 "text)") from None
    col = lambda t: torch.full((body.shape[0], 1), t, dtype=body.dtype)  # noqa: E731
    return torch.cat([col(cls), body, col(sep)], dim=1)
