"""``quept compact`` and ``quept export``: the compact checkpoint, and one width or plan
packed into a deployable model."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from quept import api
from quept.api import model_kind
from quept.api.deploy import check_export
from quept.api.elastic import check_plan_record
from quept.cli.common import (
    _images,
    _load_elastic,
    _task,
    _text,
    check_out,
    check_texts,
    check_widths,
    folder_config,
    repeated,
)
from quept.config import ConfigError, QuEPTConfig
from quept.export.compact_fit import CompactConfig
from quept.export.learned import LearnedRoundingConfig
from quept.export.packed import SCALE_DTYPES
from quept.nn import elastic_layers
from quept.nn.switch import plan_widths
from quept.search.plan import Plan, as_layer_widths, split_warning
from quept.search.plan_files import read_plan

log = logging.getLogger("quept")


def add_compact(sub: argparse._SubParsersAction) -> None:
    d = CompactConfig()
    p = sub.add_parser("compact", help="write the compact elastic checkpoint (~10 bits/weight)",
                       description="Store an elastic folder compactly: 8-bit master codes, int8 "
                       "adapters and low-bit clip factors, plus the rest of the model, config "
                       "and tokenizer. `quept export` and `quept eval` read it like the elastic "
                       "folder, with no base model needed.")
    p.add_argument("folder", help="elastic folder written by `quept quantize`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clip-bits", type=_clip_bits, default=None,
                   help="bits per stored clip factor: one number for every width, or "
                   "WIDTH:BITS pairs (default " + ",".join(f"{k}:{v}" for k, v in
                                                          d.clip_bits.items())
                   + ", for the widths the folder has)")
    p.add_argument("--master-bits", type=int, default=d.master_bits,
                   help=f"bits of the master weight codes (default {d.master_bits})")
    p.add_argument("--model", default=None,
                   help="base model folder, if not the one recorded in the elastic folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_compact)


def _clip_bits(text: str) -> int | dict[int, int]:
    """``5`` or ``2:7,3:7,4:6`` (width:bits pairs) for ``--clip-bits``."""
    try:
        if ":" not in text:
            return int(text)
        pairs = [(int(k), int(v)) for k, v in (p.split(":") for p in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number of bits (5) nor WIDTH:BITS pairs (2:7,3:7)") from None
    twice = repeated([k for k, _ in pairs])
    if twice:
        raise argparse.ArgumentTypeError(
            f"{text!r} gives width {', '.join(map(str, twice))} more than once; give each "
            "width once")
    return dict(pairs)


def cmd_compact(a: argparse.Namespace) -> dict[str, Any]:
    folder = Path(a.folder)
    check_out(a.out, "folder", source=folder, writes="compact")
    ccfg = CompactConfig(master_bits=a.master_bits,  # the default: each width's own
                         **({} if a.clip_bits is None else {"clip_bits": a.clip_bits}))
    kind = model_kind(folder)
    if isinstance(a.clip_bits, dict):  # widths the elastic folder has, checked before it loads
        widths = sorted(folder_config(folder, kind).spec.bits)
        extra = sorted(set(a.clip_bits) - set(widths))
        if extra:
            raise ConfigError(f"--clip-bits names width {', '.join(map(str, extra))}, which "
                              f"{folder} does not have (its widths: {widths})")
    model, tok, cfg = _load_elastic(folder, kind, a.model)
    meta = api.save_compact(model, a.out, cfg, tok, ccfg)
    s = meta["sizes"]
    if not a.json:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in s["parts_bits_per_weight"].items())
        print(f"compact checkpoint written to {a.out}: {s['bits_per_weight']:.3f} bits per "
              f"quantized weight for all widths ({parts}); other tensors "
              f"{s['other_bytes'] / 1e6:.1f} MB")
    return {"out": a.out, **s}


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="pack one width or plan into a deployable model",
                       description="Fold the adapters into the weights at one width (--bits) or "
                       "a per-layer plan (--plan) and write real low-bit integers: a packed "
                       "quept folder (default), a llama.cpp GGUF file (--format gguf), a "
                       "Hugging Face folder in the compressed-tensors format of vLLM and "
                       "transformers (--format compressed-tensors), or an ONNX Runtime model "
                       "(--format onnx).")
    p.add_argument("folder", help="elastic folder or compact checkpoint")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--bits", type=int, help="one width for every layer")
    w.add_argument("--plan", metavar="PLAN.json",
                   help="JSON {layer: bits}, bare or under 'plan' (or 'bits', as `quept plan` "
                   "writes); keys may be patterns applied in order, e.g. {\"*\": 3, "
                   "\"*.mlp.down_proj\": 4}, or inline: '*=3,*.mlp.down_proj=4'")
    p.add_argument("--out", required=True,
                   help="output folder (quept, compressed-tensors, onnx) or file (gguf)")
    p.add_argument("--format", choices=api.EXPORT_FORMATS, default="quept",
                   help="quept: packed folder for `quept run/eval`; gguf: llama.cpp file; "
                   "compressed-tensors: folder for vLLM and transformers; onnx: folder with "
                   "model.onnx for ONNX Runtime")
    p.add_argument("--scale-dtype", choices=sorted(SCALE_DTYPES), default=None,
                   help="dtype of the stored scales, quept and compressed-tensors formats "
                   "(float32 = the fake-quantized weights to the bit; float16, the default = "
                   "16 bits less per group); gguf stores float16, onnx float32")
    p.add_argument("--accuracy-level", type=int, default=None, choices=(0, 1, 2, 3, 4),
                   help="onnx: MatMulNBits accuracy level; 0 (default) computes in float32, "
                   "the elastic model's outputs; 4 lets ONNX Runtime's CPU kernels quantize "
                   "activations to int8 per block (faster, not exact; docs/deployment.md)")
    p.add_argument("--head-bits", type=int, default=None,
                   help="also store the output head (and a tied embedding) as codes of this "
                   "width, e.g. 8: smaller and faster to decode, logits no longer equal to the "
                   "fake-quantized model's (default: keep them float)")
    p.add_argument("--model", default=None,
                   help="base model folder, if not the one recorded in the elastic folder")
    r = p.add_argument_group("rounding")
    r.add_argument("--rounding", choices=ROUNDINGS, default="nearest",
                   help="nearest (default): each weight to the nearest level of its learned "
                   "grid, with the adapter, as the elastic model runs; learned: per-weight "
                   "rounding offsets on the same grid trained block by block on calibration "
                   "data against the float model, starting from nearest (minutes per width); "
                   "gptq: the codes chosen by GPTQ on the same grid, without the adapter (about "
                   "a minute per width for the default model). When each pays: "
                   "docs/deployment.md")
    r.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help="gptq, learned: calibration text (files or a hub text, as for `quept "
                   "quantize`; default: the built-in calibration text)")
    r.add_argument("--samples", type=int, default=None,
                   help="gptq, learned: calibration sequences, or images for an image "
                   "classifier (default: the folder's calibration count)")
    r.add_argument("--seq-len", type=int, default=None,
                   help="gptq, learned: tokens per calibration sequence (default: the folder's)")
    r.add_argument("--iters", type=int, default=None,
                   help="learned: signed-gradient steps per block (default "
                   f"{LearnedRoundingConfig.iters})")
    r.add_argument("--bf16", action="store_true",
                   help="learned: training steps under bfloat16 autocast, the checks that keep "
                   "the best offsets in float32 (faster on CPUs with bfloat16 matmuls)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_export)


ROUNDINGS = ("nearest", "gptq", "learned")


def _export_round(a: argparse.Namespace, model: Any, tok: Any, cfg: QuEPTConfig,
                  plan: Any) -> dict[str, Any]:
    """``quept export --rounding gptq|learned``: choose the codes of the chosen width or plan
    on calibration data drawn as ``quept quantize`` draws it (the folder's counts unless
    given)."""

    for name in ("samples", "seq_len"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    calib = replace(cfg.calib, n_samples=a.samples or cfg.calib.n_samples,
                    seq_len=a.seq_len or cfg.calib.seq_len)
    if _task(model) == "image-classification":
        if a.calib_text is not None or a.seq_len is not None:
            raise ConfigError("--calib-text and --seq-len apply to text models; an image "
                              "classifier is rounded on Fashion-MNIST training images "
                              "(--samples)")
        inputs, _ = _images(model, "train", calib.n_samples, calib.seed)
    else:
        inputs = api.samples_from_text(tok, _text(a.calib_text, "calib"), calib)
    if a.rounding == "learned":
        return api.round_learned(model, plan, inputs, LearnedRoundingConfig(
            **({} if a.iters is None else {"iters": a.iters}), bf16=a.bf16,
            loss=cfg.calib.loss, massive_ratio=cfg.calib.massive_ratio or None,
            massive_slack=cfg.calib.massive_slack), progress=not a.json)
    return api.round_gptq(model, plan, inputs, progress=not a.json)


def cmd_export(a: argparse.Namespace) -> dict[str, Any]:
    if a.head_bits is not None and a.format != "quept":
        raise ConfigError("--head-bits applies to the quept format")
    if a.format in ("gguf", "onnx") and a.scale_dtype is not None:
        fixed = "its blocks store float16" if a.format == "gguf" else "MatMulNBits takes float32"
        raise ConfigError(f"--scale-dtype does not apply to {a.format}: {fixed} scales")
    if a.accuracy_level is not None and a.format != "onnx":
        raise ConfigError("--accuracy-level applies to the onnx format")
    folder = Path(a.folder)
    gguf = a.format == "gguf"  # a file: not one that is not GGUF, nor inside the folder read
    check_out(a.out, "file" if gguf else "folder", source=folder,
              writes="gguf" if gguf else api.EXPORT_KINDS[a.format])
    if a.rounding == "nearest" and (a.calib_text, a.samples, a.seq_len) != (None, None, None):
        raise ConfigError("--calib-text, --samples and --seq-len apply to --rounding gptq or "
                          "learned")
    for flag, given in (("--iters", a.iters is not None), ("--bf16", a.bf16)):
        if given and a.rounding != "learned":
            raise ConfigError(f"{flag} applies to --rounding learned")
    kind = model_kind(folder)
    given = a.bits if a.bits is not None else read_plan(a.plan)  # int, Plan or hand-written
    plan = as_layer_widths(given)
    check_widths(plan, folder_config(folder, kind).spec,
                 f"--bits {a.bits}" if a.bits is not None else f"--plan {a.plan}")
    if a.rounding != "nearest":  # read before the model loads: a missing file fails at once

        check_texts(a, calib_text="calib")
    model, tok, cfg = _load_elastic(folder, kind, a.model)
    layers = elastic_layers(model)
    if isinstance(given, Plan):  # made for this model and spec (its record says what it gives)
        check_plan_record(layers, given, f"--plan {a.plan}")
    if isinstance(given, dict) and layers:  # a hand-written plan
        note = split_warning(plan_widths(layers, plan), f"--plan {a.plan}")
        if note:
            log.warning(note)
    # what the export checks of the model, tokenizer and --out, before any rounding work
    check_export(model, plan, a.out, a.format, tokenizer=tok, source=folder)
    rounding = None if a.rounding == "nearest" else _export_round(a, model, tok, cfg, plan)
    t0 = time.perf_counter()
    meta = api.export(model, plan, a.out, a.format, tokenizer=tok,
                      scale_dtype=a.scale_dtype or "float16",
                      accuracy_level=a.accuracy_level or 0,
                      **({} if a.format != "quept" else {"head_bits": a.head_bits}))
    seconds = time.perf_counter() - t0
    if not a.json:
        s = meta.get("sizes")
        size = "" if s is None else (f": {s['bits_per_weight']:.3f} bits per quantized weight "
                                     f"({s['quantized_bytes'] / 1e6:.1f} MB), "
                                     + (f"packed head {s['head_bytes'] / 1e6:.1f} MB, "
                                        if s.get("head_bytes") else "")
                                     + f"other tensors {s['other_bytes'] / 1e6:.1f} MB")
        if meta.get("bits_per_weight") is not None and s is None:
            size = (f": {meta['bits_per_weight']:.3f} bits per quantized weight "
                    f"({meta['quantized_bytes'] / 1e6:.1f} MB), {meta['file_bytes'] / 1e6:.1f} "
                    "MB in all")
        kind = "GPTQ" if a.rounding == "gptq" else "learned"
        how = "" if rounding is None else f" ({kind} rounding {rounding['seconds']:.1f}s)"
        print(f"{a.format} export written to {a.out} in {seconds:.1f}s{how}{size}")
    return {"out": a.out, "seconds": seconds, "rounding": a.rounding,
            **({} if rounding is None else {"rounding_seconds": rounding["seconds"]}), **meta}
