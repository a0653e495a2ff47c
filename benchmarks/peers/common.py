"""What every adapter shares: the linears that are quantized, and a check of their levels."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from quept.config import PRESET_SPECS, PRESETS, CalibConfig, ElasticSpec
from quept.models import family_for


@dataclass
class Quantized:
    """What an adapter returns: ``select(bits)`` gives the model to evaluate at ``bits``
    (None = float); ``info`` may override the run's record (calib_seconds, n_samples, seq_len,
    calib_reused, library settings)."""

    select: Callable[[int | None], nn.Module]
    info: dict[str, Any] = field(default_factory=dict)


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear (each linear of each decoder block), by its full module name."""
    fam = family_for(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    out = {}
    for block in fam.get_blocks(model):
        for name, lin in fam.block_linears(block).items():
            out[f"{prefix[id(block)]}.{name}"] = lin
    return out


@torch.no_grad()
def levels_max(weight: torch.Tensor, group_size: int, rows: int = 64) -> int:
    """Most distinct values in one group of ``group_size`` inputs over the first ``rows`` rows of
    ``weight`` (out, in): at most 2^b for a real b-bit quantizer."""
    w = weight[:rows].float()
    g = w.reshape(w.shape[0], -1, group_size).sort(dim=-1).values
    return int(((g[..., 1:] != g[..., :-1]).sum(-1) + 1).max())


def check_levels(model: nn.Module, bits: int, group_size: int, method: str) -> None:
    """Refuse a model whose block linears hold more than 2^bits values in a group at ``bits``."""
    for name, lin in block_linears(model).items():
        n = levels_max(current_weight(lin, bits), group_size)
        if n > 2**bits:
            raise RuntimeError(f"{method} at {bits} bits: {name} has {n} levels in a group")


def current_weight(lin: nn.Module, bits: int | None) -> torch.Tensor:
    """The weight a linear computes with at ``bits`` (elastic layers quantize on the fly)."""
    if bits is not None and hasattr(lin, "quantized_weight"):
        return lin.quantized_weight(bits)
    scheme = getattr(lin, "quantization_scheme", None)  # compressed-tensors: quantized in forward
    if bits is not None and scheme is not None and scheme.weights is not None:
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        with torch.no_grad():
            return forward_quantize(lin, lin.weight, "weight", scheme.weights)
    return lin.weight


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The options that choose QuEPT's spec and rates in the single-model benchmarks."""
    p.add_argument("--group-size", type=int, default=64, help="quantization group (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data draw and adapters")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo",
                   help="quept's spec and rates (default cpu-demo); the sample count, batch "
                   "size and epochs options always apply")
    p.add_argument("--bit-groups", default=None,
                   help="bit groups high to low, e.g. 7,8/5,6/4/3/2 (default: the preset's)")
    p.add_argument("--ranks", default=None,
                   help="adapter rank added per group, e.g. 0,32,32,32,32 (default: the "
                   "preset's; 8 per group with --bit-groups)")


def quept_settings(a: argparse.Namespace, **calib: Any) -> tuple[ElasticSpec, CalibConfig]:
    """The spec and calibration settings of :func:`add_spec_args`'s options, with ``calib``'s
    fields (those not None) over the preset's. Other bit groups take equal merge weights and
    drop a preset's per-group adapter rates (they fit its own groups)."""
    spec = replace(PRESET_SPECS[a.preset], default_group_size=a.group_size)
    settings = replace(PRESETS[a.preset], seed=a.seed,
                       **{k: v for k, v in calib.items() if v is not None})
    if a.bit_groups is not None:
        groups = tuple(tuple(int(b) for b in g.split(",")) for g in a.bit_groups.split("/"))
        spec = replace(spec, bit_groups=groups, ranks=(8,) * len(groups),
                       merge_weights=(1 / len(groups),) * len(groups))
        settings = replace(settings, lr_adapter_groups=None)
    if a.ranks is not None:
        spec = replace(spec, ranks=tuple(int(r) for r in a.ranks.split(",")))
    return spec, settings


def quept_label(spec: ElasticSpec, preset: str | None = None, epochs: int | None = None) -> str:
    """A QuEPT row's name, with its preset, the groups and ranks of its spec, and its epochs."""
    parts = [preset] if preset else []
    parts += ["groups " + "/".join(",".join(map(str, g)) for g in spec.bit_groups),
              "ranks " + ",".join(map(str, spec.ranks))]
    parts += [f"{epochs} epochs"] if epochs else []
    return f"QuEPT (one model, all widths; {', '.join(parts)})"
