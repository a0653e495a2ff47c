"""Deployment commands of the CLI: ``quept compact``, ``quept export``, ``quept run``, and
``quept eval`` of a packed folder. Thin: parse, call :mod:`quept.api`, print."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from quept import api
from quept.api import KIND_NAMES, readable_kind
from quept.config import ConfigError, ElasticSpec, QuEPTConfig, check_bits
from quept.export.compact import CompactConfig
from quept.export.learned import LearnedRoundingConfig
from quept.export.packed import SCALE_DTYPES
from quept.export.runtime import KV_CACHES, generate
from quept.info import describe, render
from quept.models import family_for
from quept.nn.packed_linear import BACKENDS
from quept.nn.switch import elastic_layers, plan_widths
from quept.search.plan import (
    as_layer_widths,
    plan_files,
    read_plan,
    read_widths,
    split_warning,
)

log = logging.getLogger("quept")


def at_least(low: int, expected: str) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``; ``expected`` words the error."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return int(text)
    return parse


def folder_config(folder: Path, kind: str) -> QuEPTConfig:
    """The configuration an elastic or compact folder records, read from its JSON alone (no
    weights), so options can be checked against its widths before a model loads."""
    if kind == "compact":
        from quept.export.compact import read_compact_meta

        return QuEPTConfig.from_dict(read_compact_meta(folder)["config"])
    if kind == "elastic":
        return QuEPTConfig.from_dict(api.read_meta(folder)["config"])
    raise ConfigError(f"{folder} holds {KIND_NAMES[kind]}; this needs an elastic folder (from "
                      "`quept quantize`) or a compact checkpoint (from `quept compact`)")


def check_widths(widths: int | dict[str, int], spec: ElasticSpec, what: str) -> None:
    """Every width of ``widths`` (one, or a plan's) is one of ``spec``'s, or a ConfigError
    naming ``what`` asked for it."""
    for b in sorted({widths} if isinstance(widths, int) else set(widths.values())):
        try:
            check_bits(b, spec.bits)
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None


def check_out(out: str | Path, what: str, *, source: Path | None = None,
              writes: str | None = None) -> Path:
    """``--out`` checked before any work: ``what`` "file" must not name a folder, "folder"
    must not name a file. ``--out`` must not be the ``source`` folder being read, and a folder
    that holds a model of another kind than the one a command ``writes`` (a :func:`folder_kind`
    name) is refused, as writing there would spoil it; the same kind is replaced."""
    out = Path(out)
    if what == "file" and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the file to write "
                          f"there, e.g. {out / 'model.gguf'}")
    if what == "folder" and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to write into")
    if source is not None and out.is_dir() and out.resolve() == Path(source).resolve():
        raise ConfigError(f"--out {out} is the folder being read; give another folder")
    if writes is not None:
        api.check_out_folder(out, writes, "--out ")
    return out


def _load_elastic(folder: Path, kind: str, base: str | None) -> tuple[Any, Any, QuEPTConfig]:
    cfg = folder_config(folder, kind)
    model, tok = api.load_compact(folder) if kind == "compact" else api.load(folder, model=base)
    return model, tok, cfg


# --- compact ----------------------------------------------------------------------------------
def add_compact(sub: argparse._SubParsersAction) -> None:
    d = CompactConfig()
    p = sub.add_parser("compact", help="write the compact elastic checkpoint (~10 bits/weight)",
                       description="Store an elastic folder compactly: 8-bit master codes, int8 "
                       "adapters and low-bit clip factors, plus the rest of the model, config "
                       "and tokenizer. `quept export` and `quept eval` read it like the elastic "
                       "folder, with no base model needed.")
    p.add_argument("folder", help="elastic folder written by `quept quantize`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clip-bits", type=_clip_bits, default=d.clip_bits,
                   help="bits per stored clip factor: one number for every width, or "
                   "WIDTH:BITS pairs (default " + ",".join(f"{k}:{v}" for k, v in
                                                          d.clip_bits.items()) + ")")
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
        return {int(k): int(v) for k, v in (p.split(":") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number of bits (5) nor WIDTH:BITS pairs (2:7,3:7)") from None


def cmd_compact(a: argparse.Namespace) -> dict[str, Any]:
    folder = Path(a.folder)
    check_out(a.out, "folder", source=folder, writes="compact")
    ccfg = CompactConfig(master_bits=a.master_bits, clip_bits=a.clip_bits)
    model, tok, cfg = _load_elastic(folder, readable_kind(folder), a.model)
    meta = api.save_compact(model, a.out, cfg, tok, ccfg)
    s = meta["sizes"]
    if not a.json:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in s["parts_bits_per_weight"].items())
        print(f"compact checkpoint written to {a.out}: {s['bits_per_weight']:.3f} bits per "
              f"quantized weight for all widths ({parts}); other tensors "
              f"{s['other_bytes'] / 1e6:.1f} MB")
    return {"out": a.out, **s}


# --- export -----------------------------------------------------------------------------------
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
    from quept.cli import _images, _task, _text

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
    check_out(a.out, "file" if a.format == "gguf" else "folder", source=folder,
              writes=api.EXPORT_KINDS.get(a.format))
    if a.rounding == "nearest" and (a.calib_text, a.samples, a.seq_len) != (None, None, None):
        raise ConfigError("--calib-text, --samples and --seq-len apply to --rounding gptq or "
                          "learned")
    for flag, given in (("--iters", a.iters is not None), ("--bf16", a.bf16)):
        if given and a.rounding != "learned":
            raise ConfigError(f"{flag} applies to --rounding learned")
    kind = readable_kind(folder)
    given = a.bits if a.bits is not None else read_plan(a.plan)  # int, Plan or hand-written
    plan = as_layer_widths(given)
    check_widths(plan, folder_config(folder, kind).spec,
                 f"--bits {a.bits}" if a.bits is not None else f"--plan {a.plan}")
    if a.rounding != "nearest":  # read before the model loads: a missing file fails at once
        from quept.cli import check_texts

        check_texts(a, calib_text="calib")
    model, tok, cfg = _load_elastic(folder, kind, a.model)
    layers = elastic_layers(model)
    if isinstance(given, dict) and layers:  # a hand-written plan
        note = split_warning(plan_widths(layers, plan), f"--plan {a.plan}")
        if note:
            log.warning(note)
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
                                     f"({s['quantized_bytes'] / 1e6:.1f} MB), packed head "
                                     f"{s['head_bytes'] / 1e6:.1f} MB, other tensors "
                                     f"{s['other_bytes'] / 1e6:.1f} MB")
        if "bits_per_weight" in meta and s is None:
            size = (f": {meta['bits_per_weight']:.3f} bits per quantized weight "
                    f"({meta['quantized_bytes'] / 1e6:.1f} MB), {meta['file_bytes'] / 1e6:.1f} "
                    "MB in all")
        kind = "GPTQ" if a.rounding == "gptq" else "learned"
        how = "" if rounding is None else f" ({kind} rounding {rounding['seconds']:.1f}s)"
        print(f"{a.format} export written to {a.out} in {seconds:.1f}s{how}{size}")
    return {"out": a.out, "seconds": seconds, "rounding": a.rounding,
            **({} if rounding is None else {"rounding_seconds": rounding["seconds"]}), **meta}


# --- info ------------------------------------------------------------------------------------
def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what an elastic, compact, packed or exported model holds",
                       description="Describe a quept artifact from its JSON and tensor headers "
                       "alone (no weights loaded, no base model needed): for an elastic folder "
                       "the widths, adapters, calibration settings and time, the stored bits "
                       "per weight and size of every width, what `quept quantize` measured, "
                       "and whether a sensitivity table is cached; for a packed folder or an "
                       "export its widths, bits per weight and sizes. Also reads compact "
                       "checkpoints, compressed-tensors and ONNX folders, GGUF files and plain "
                       "Hugging Face model folders.")
    p.add_argument("path", help="folder, or a .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_info)


def cmd_info(a: argparse.Namespace) -> dict[str, Any]:
    info = describe(a.path)
    if not a.json:
        print(render(info))
    return info


# --- run --------------------------------------------------------------------------------------
def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text and time prefill and decode",
                       description="Greedy generation (batch 1, KV cache) with a packed folder, "
                       "a compressed-tensors or ONNX export (run in ONNX Runtime), the float "
                       "model of a plain HF folder, or an elastic/compact folder at --bits or "
                       "--plan. An elastic or compact folder runs packed layers (the codes "
                       "`quept export` writes, on the same kernels) and switches width in "
                       "memory: --bits 4,3,2 generates at each width in turn. Prints the text "
                       "and tokens per second of prefill (the prompt) and decode (each new "
                       "token).")
    p.add_argument("folder", help="packed folder, compressed-tensors or ONNX export, HF model "
                   "folder, or elastic/compact + --bits or --plan")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=at_least(1, "a positive number of tokens"),
                   default=64, help="tokens to generate")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--bits", default=None,
                   help="elastic/compact folders: a width, or comma-separated widths run one "
                   "after the other in the same loaded model (e.g. 4,3,2)")
    w.add_argument("--plan", metavar="PLAN.json", action="append", default=None,
                   help="elastic/compact folders: a mixed-precision plan (`quept plan`, or "
                   "a hand-written {layer or pattern: bits}, or inline: '*=3,*.mlp.down_proj=4'"
                   "); repeat, or name a folder of plans, to run several")
    p.add_argument("--fake-quant", action="store_true",
                   help="elastic/compact folders: run the elastic model fake-quantized (float "
                   "matmuls over the quantized weights) instead of packed layers")
    p.add_argument("--head-bits", type=int, default=None,
                   help="elastic/compact folders: also pack the output head (and a tied "
                   "embedding) at this width, e.g. 8, as `quept export --head-bits` does "
                   "(faster decoding; logits no longer exactly the elastic model's)")
    p.add_argument("--keep-mb", type=float, default=0.0,
                   help="elastic/compact folders: keep the packed layers of widths switched "
                   "away from, up to this many MB, so that switching back packs nothing "
                   "(default 0: pack on every switch)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="packed matmul: fused kernel, PyTorch int4, or dequantize per call")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="auto",
                   help="'quantized': keep keys and values as packed codes (models calibrated "
                   "with --kv-bits); 'float': transformers' cache; 'auto' (default): quantized "
                   "where the model quantizes its cache")
    p.add_argument("--prefill-chunk", type=at_least(1, "a positive number of tokens"),
                   default=None, metavar="N",
                   help="feed the prompt N tokens at a time (bounds a long prompt's working "
                   "memory; default: the whole prompt in one forward)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_run)


def _run_configs(a: argparse.Namespace) -> list[tuple[str, Any]]:
    """``[(label, width or plan)]`` from --bits / --plan."""
    if a.plan:
        return [(f"plan {p}", read_widths(p)) for p in plan_files(a.plan)]
    configs = []
    for part in a.bits.split(","):
        try:
            b = int(part)
        except ValueError:
            raise ConfigError(f"--bits takes widths separated by commas (e.g. 4,3,2), got "
                              f"{a.bits!r}") from None
        configs.append((width_label(b), b))
    return configs


def cmd_run(a: argparse.Namespace) -> dict[str, Any]:
    folder = Path(a.folder)
    if not a.prompt:
        raise ConfigError("--prompt is empty; give the text to continue")
    kind = readable_kind(folder)
    configured = a.bits is not None or bool(a.plan)
    if kind in ("elastic", "compact") and not configured:
        raise ConfigError(f"{folder} holds {KIND_NAMES[kind]}, which runs at any width: "
                          "pick one with --bits (e.g. --bits 4, or --bits 4,3,2 for each in "
                          "turn) or --plan")
    if configured and kind not in ("elastic", "compact"):
        raise ConfigError(f"{folder} holds {KIND_NAMES[kind]}, which runs as it was written: "
                          "--bits and --plan pick the width of an elastic or compact folder")
    if a.fake_quant and kind not in ("elastic", "compact"):
        raise ConfigError("--fake-quant applies to elastic and compact folders")
    if a.keep_mb < 0:
        raise ConfigError(f"--keep-mb must be >= 0, got {a.keep_mb}")
    if a.keep_mb and (a.fake_quant or kind not in ("elastic", "compact")):
        raise ConfigError("--keep-mb applies to elastic and compact folders run packed")
    if a.head_bits is not None and (a.fake_quant or kind not in ("elastic", "compact")):
        raise ConfigError("--head-bits applies to elastic and compact folders run packed "
                          "(a packed folder's head is chosen by `quept export --head-bits`)")
    configs = _run_configs(a) if configured else [(kind, None)]
    if configured:  # every width against the folder's, before the model loads
        spec = folder_config(folder, kind).spec
        for label, widths in configs:
            check_widths(widths, spec, label if a.plan else f"--bits {a.bits}")
    switch = None
    t0 = time.perf_counter()
    if kind == "packed":
        model, tok = api.load_packed(folder, backend=a.backend)
    elif kind in ("hf", "compressed-tensors", "onnx"):
        model, tok = api.load_model(folder)
    else:
        if a.fake_quant:
            model, tok, _ = _load_elastic(folder, kind, None)
            api.set_bits(model, configs[0][1])
        else:
            model, tok = api.load_switchable(folder, configs[0][1], backend=a.backend,
                                             head_bits=a.head_bits,
                                             keep_bytes=int(a.keep_mb * 1e6))
            switch = model.quept_switch
    load_seconds = time.perf_counter() - t0
    if not family_for(model).is_causal_lm:
        raise ConfigError(f"{folder} holds a {model.config.model_type} model, which does not "
                          "generate text (an encoder or an image classifier): `quept eval` "
                          "reports its embedding fidelity or accuracy")
    if tok is None:
        raise ConfigError(f"{folder} holds no tokenizer")
    runs = []
    for i, (label, config) in enumerate(configs):
        extra: dict[str, Any] = {}
        if configured:
            t1 = time.perf_counter()
            kept = 0
            if i and switch is not None:
                kept = switch.set_bits(config).reused
            elif i:
                api.set_bits(model, config)
            extra = {"config": label, "switch_seconds": time.perf_counter() - t1 if i else None,
                     "layers_kept": kept,
                     "bits_per_weight": api.stored_bits(model)}
        gen = generate(model, tok, a.prompt, a.max_new_tokens, stop_at_eos=not a.no_eos,
                       kv_cache=a.kv_cache, prefill_chunk=a.prefill_chunk)
        runs.append({**extra, **gen.to_dict()})
        if not a.json:
            _print_run(a, kind, label if configured else None, extra, gen,
                       "fake-quantized" if a.fake_quant else "packed")
    out: dict[str, Any] = {"folder": str(folder), "kind": kind, "load_seconds": load_seconds}
    if configured:
        out["mode"] = "fake-quantized" if a.fake_quant else "packed"
    if switch is not None:
        out["memory"] = switch.sizes()
        if not a.json:
            m = out["memory"]
            head = ("" if m["head_bytes"] is None else
                    f", the {m['head_bits']}-bit head {m['head_bytes'] / 1e6:.1f} MB")
            print(f"\nin memory: packed layers {m['packed_bytes'] / 1e6:.1f} MB now{head}, and "
                  f"the {m['source']} source of every width {m['source_bytes'] / 1e6:.1f} MB "
                  f"({m['source_bits_per_weight']:.2f} bits per weight); loaded in "
                  f"{load_seconds:.1f} s")
            if m["source"] == "elastic":
                print(f"(`quept compact {folder} --out DIR` writes a source of about 10 bits "
                      "per weight to switch from)")
    return {**out, **(runs[0] if len(runs) == 1 else {}), "runs": runs}


def _print_run(a: argparse.Namespace, kind: str, label: str | None, extra: dict[str, Any],
               gen: Any, mode: str) -> None:
    if label is not None:
        kept = f", {extra['layers_kept']} layers kept" if extra["layers_kept"] else ""
        switched = ("" if extra["switch_seconds"] is None
                    else f", switched in {extra['switch_seconds']:.2f} s{kept}")
        print(f"--- {label} ({mode}, {extra['bits_per_weight']:.3f} bits per weight{switched})")
    print(a.prompt + gen.text)
    print(f"\nprefill {gen.prompt_tokens} tokens: {gen.prefill_tokens_per_second:.1f} tok/s"
          f"; decode {gen.new_tokens - 1} tokens: {gen.decode_tokens_per_second:.1f} tok/s"
          f" ({kind} model)")
    if gen.kv_cache_bytes is not None:
        print(f"KV cache: {gen.prompt_tokens + gen.new_tokens - 1} tokens as packed codes, "
              f"{gen.kv_cache_bytes / 2**10:.1f} KiB (float32: "
              f"{gen.kv_cache_float32_bytes / 2**10:.1f} KiB)")


def width_label(bits: int | str | None, activations: bool = False) -> str:
    """"float", "W4", "W4A4" in weight+activation mode, or "mixed" (a plan's packed folder)."""
    if bits is None or bits == "mixed":
        return bits or "float"
    return f"W{bits}A{bits}" if activations else f"W{bits}"


def _packed_label(meta: dict[str, Any]) -> str:
    return width_label(meta["bits"], any(i.get("act_bits") for i in meta["layers"].values()))


# --- eval of a packed folder --------------------------------------------------------------------
def _eval_packed_encoder(a: argparse.Namespace, folder: Path, model: Any, tok: Any,
                         text: str) -> dict[str, Any]:
    """Embedding fidelity of a packed encoder against its float base model (--model, or the
    base model the packed folder records)."""
    from quept.eval import fidelity, sentence_embeddings, sentences_from_text

    meta = model.quept_packed
    base = a.model or meta.get("source", {}).get("base_model")
    if base is None:
        raise ConfigError(f"{folder} records no base model; pass --model with the float encoder "
                          "it was made from")
    float_model, _ = api.load_model(base)
    sentences = sentences_from_text(tok, text, a.sentences,
                                    max_len=min(128, model.config.max_position_embeddings))
    ref = sentence_embeddings(float_model, sentences, progress=not a.json, desc="embed float")
    row = {"bits": meta["bits"], "bits_per_weight": meta["sizes"]["bits_per_weight"],
           **fidelity(sentence_embeddings(model, sentences, progress=not a.json,
                                          desc="embed packed"), ref)}
    if not a.json:
        label = _packed_label(meta)
        print(f"\nEmbedding fidelity of {folder} against {base} ({sentences.input_ids.shape[0]} "
              f"paragraphs): {label} packed, {row['bits_per_weight']:.3f} bits per weight "
              f"stored, cosine {row['cosine_mean']:.4f} (min {row['cosine_min']:.4f}), same "
              f"nearest paragraph {row['neighbour_agreement']:.1%}")
    return {"folder": str(folder), "packed": True, "sentences": sentences.input_ids.shape[0],
            "embedding_rows": [row]}


def _eval_packed_images(a: argparse.Namespace, folder: Path, model: Any) -> dict[str, Any]:
    """Top-1 of a packed image classifier on Fashion-MNIST test images."""
    from quept.cli import _images, _refuse_text_options
    from quept.eval import top1_accuracy

    _refuse_text_options(a, "text")
    meta = model.quept_packed
    pixels, labels = _images(model, "test", a.images, 0)
    row = {"bits": meta["bits"], "bits_per_weight": meta["sizes"]["bits_per_weight"],
           "accuracy": top1_accuracy(model, pixels, labels, progress=not a.json,
                                     desc="accuracy packed")}
    if not a.json:
        label = _packed_label(meta)
        print(f"\nTop-1 accuracy of {folder} on {len(labels)} Fashion-MNIST test images: "
              f"{label} packed, {row['bits_per_weight']:.3f} bits per weight stored, "
              f"top-1 {row['accuracy']:.2%}")
    return {"folder": str(folder), "packed": True, "images": len(labels),
            "accuracy_rows": [row]}


def eval_packed(a: argparse.Namespace, folder: Path, text: Callable[[], str]) -> dict[str, Any]:
    """Perplexity (embedding fidelity, top-1) of a packed folder (its one configuration);
    ``text`` gives the evaluation text when the model reads text."""
    from quept.eval import perplexity

    model, tok = api.load_packed(folder)
    meta = model.quept_packed
    task = family_for(model).task
    if task == "encoder":
        return _eval_packed_encoder(a, folder, model, tok, text())
    if task == "image-classification":
        return _eval_packed_images(a, folder, model)
    windows = api.windows_from_text(tok, text(), a.seq_len, a.windows)
    ppl = perplexity(model, windows, progress=not a.json, desc="eval packed")
    row = {"bits": meta["bits"], "bits_per_weight": meta["sizes"]["bits_per_weight"], "ppl": ppl}
    if not a.json:
        label = _packed_label(meta)
        print(f"\nPerplexity of {folder} ({windows.shape[0]} windows x {a.seq_len} tokens): "
              f"{label} packed, {row['bits_per_weight']:.3f} bits per weight stored, "
              f"perplexity {ppl:.2f}")
    return {"folder": str(folder), "packed": True, "windows": windows.shape[0],
            "seq_len": a.seq_len, "rows": [row]}
