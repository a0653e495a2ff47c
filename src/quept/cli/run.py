"""``quept run`` (generate text, time prefill and decode) and ``quept info``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from quept import api
from quept.api import KIND_NAMES, model_kind
from quept.cli.common import (
    _load_elastic,
    at_least,
    check_widths,
    folder_config,
    plan_paths,
    width_label,
)
from quept.config import ConfigError
from quept.export.runtime import KV_CACHES, generate
from quept.info import describe, render
from quept.models import family_for
from quept.nn.packed_linear import BACKENDS
from quept.search.plan_files import read_widths


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what an elastic, compact, packed or exported model holds",
                       description="Describe a quept artifact from its JSON and tensor headers "
                       "alone (no weights loaded, no base model needed): for an elastic folder "
                       "the widths, adapters, calibration settings and time, the stored bits "
                       "per weight and size of every width, what `quept quantize` measured, "
                       "and whether a sensitivity table is cached; for a packed folder or an "
                       "export its widths, bits per weight and sizes. Also reads compact "
                       "checkpoints, compressed-tensors and ONNX folders, GGUF files and plain "
                       "Hugging Face model folders, and plan files (PLAN.json, or a folder "
                       "of them).")
    p.add_argument("path", help="folder, .gguf file or plan file (PLAN.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_info)


def cmd_info(a: argparse.Namespace) -> dict[str, Any]:
    info = describe(a.path)
    if not a.json:
        print(render(info))
    return info


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
        return [(f"plan {p}", read_widths(p)) for p in plan_paths(a.plan)]
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
    kind = model_kind(folder)
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
    if a.backend != "auto" and (a.fake_quant or kind not in ("packed", "elastic", "compact")):
        raise ConfigError("--backend picks the matmul of packed layers: it applies to packed "
                          "folders and to elastic and compact folders run packed")
    if not 0 <= a.keep_mb < math.inf:  # nan too
        raise ConfigError(f"--keep-mb must be a finite number >= 0 (megabytes), got {a.keep_mb}")
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
    mode = ("fake-quantized" if a.fake_quant else "packed") if configured else None
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
            _print_run(a, kind, label if configured else None, extra, gen, mode)
    out: dict[str, Any] = {"folder": str(folder), "kind": kind, "load_seconds": load_seconds}
    if mode is not None:
        out["mode"] = mode
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


def _what_ran(kind: str, mode: str | None) -> str:
    """What generated, in the words of each run's header: an elastic or compact folder runs
    layers packed from it (or itself fake-quantized); any other folder runs as written
    ("packed model", "ONNX export")."""
    if mode == "packed":
        return f"packed layers from the {kind} folder"
    if mode == "fake-quantized":
        return f"the {kind} folder fake-quantized"
    return KIND_NAMES[kind].partition(" ")[2]


def _print_run(a: argparse.Namespace, kind: str, label: str | None, extra: dict[str, Any],
               gen: Any, mode: str | None) -> None:
    if label is not None:
        kept = f", {extra['layers_kept']} layers kept" if extra["layers_kept"] else ""
        switched = ("" if extra["switch_seconds"] is None
                    else f", switched in {extra['switch_seconds']:.2f} s{kept}")
        print(f"--- {label} ({mode}, {extra['bits_per_weight']:.3f} bits per weight{switched})")
    print(a.prompt + gen.text)
    speed = gen.decode_tokens_per_second
    decode = "n/a" if speed is None else f"{speed:.1f} tok/s"
    print(f"\nprefill {gen.prompt_tokens} tokens: {gen.prefill_tokens_per_second:.1f} tok/s"
          f"; decode {gen.new_tokens - 1} tokens: {decode} ({_what_ran(kind, mode)})")
    if gen.kv_cache_bytes is not None:
        print(f"KV cache: {gen.prompt_tokens + gen.new_tokens - 1} tokens as packed codes, "
              f"{gen.kv_cache_bytes / 2**10:.1f} KiB (float32: "
              f"{gen.kv_cache_float32_bytes / 2**10:.1f} KiB)")
