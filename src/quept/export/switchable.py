"""Run-time width switching with packed layers: one loaded model, any width or plan, real kernels.

A *switchable* model is a packed model (a :class:`PackedLinear` in place of every elastic layer,
so matmuls run on the integer codes) that also keeps, per layer, the *source* every width is
packed from, and re-packs its layers when :meth:`Switchable.set_bits` asks for another width or
a plan. Two sources:

- ``"compact"``: the compact checkpoint's own tensors (8-bit master codes with fp16 ends, int8
  adapters, clip codes; ~10.4 bits per weight on the default model). A switch rebuilds one
  layer at a time as an :class:`ElasticLinear` (the same rebuild as
  :func:`quept.export.compact.restore_compact`), packs it and drops the float copy, so memory
  holds the compact source plus the packed codes of the current width, never the float model.
- ``"elastic"``: the layers of a loaded elastic model, kept as they are (float32 weights); a
  switch packs them again.

Either way the packed layers hold exactly the codes ``quept export`` writes for that width or
plan, so the outputs are the packed folder's.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import numbers
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quept.export.compact import layer_state, read_compact_tensors, split_layer_tensors
from quept.export.compact_fit import CompactConfig
from quept.export.load import fill
from quept.export.packed import (
    SCALE_DTYPES,
    PackedArgumentError,
    PackedFormatError,
    layer_widths,
    pack_head,
    pack_model,
)
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.packed_linear import PackedLinear
from quept.nn.switch import elastic_layers

log = logging.getLogger(__name__)

# A switch from the compact source hands the freed heap back to the system (malloc_trim)
# whenever the float weights rebuilt since the last time reach this many bytes (each comes
# with several temporaries of its size). On the default model, 2-core CPU: trimming after
# every layer kept a switch's peak within 50 MB of the resident set but took 2.2 s a switch;
# only at the end of a switch, 0.8 s, with the peak 200-390 MB above; at 64 MB, 0.7-1.5 s
# and 92-275 MB above in five runs (at 128 MB, 366 MB above in one run, and no faster).
TRIM_BYTES = 64 << 20


@dataclass(frozen=True)
class SwitchReport:
    """What one :meth:`Switchable.set_bits` did."""

    repacked: int  # layers packed anew
    seconds: float
    bits_per_weight: float  # stored bits per quantized weight of the new configuration
    reused: int = 0  # layers whose packed codes at the new width were kept from before


class _Holder(nn.Module):
    """A one-layer module tree, so :func:`pack_model` can pack a single elastic layer."""

    def __init__(self, layer: ElasticLinear) -> None:
        super().__init__()
        self.layer = layer


class Switchable:
    """The switching state of a model whose elastic layers were replaced by packed ones.

    Built by :func:`make_switchable`; reached as ``model.quept_switch``. ``set_bits`` takes one
    width or a plan ``{layer: bits}`` naming every layer.
    """

    def __init__(self, model: nn.Module, source: str, skeletons: Mapping[str, ElasticLinear],
                 raw: Mapping[str, Mapping[str, torch.Tensor]] | None,
                 compact: CompactConfig | None, backend: str, scale_dtype: str,
                 keep_bytes: int = 0) -> None:
        if not isinstance(keep_bytes, int) or isinstance(keep_bytes, bool) or keep_bytes < 0:
            raise PackedArgumentError(f"keep_bytes must be a whole number of bytes >= 0, got "
                                      f"{keep_bytes!r}")
        self.model, self.source = model, source
        # Packed layers of widths switched away from, kept (least recently used dropped first)
        # while their codes fit in keep_bytes, so switching back to them packs nothing.
        self.keep_bytes = keep_bytes
        self._kept: OrderedDict[tuple[str, int], PackedLinear] = OrderedDict()
        self._layers = dict(skeletons)
        self._raw = dict(raw or {})
        self._compact = compact
        self.backend, self.scale_dtype = backend, scale_dtype
        self._widths: dict[str, int] = {}
        self.head_bits: int | None = None  # the output head's width when it is packed too

    @property
    def widths(self) -> dict[str, int]:
        """``{layer: bits}`` the packed layers hold now."""
        return dict(self._widths)

    def skeletons(self) -> dict[str, ElasticLinear]:
        """``{layer: the elastic layer it is packed from}`` (spec and shapes; the compact
        source's hold no weights between switches)."""
        return dict(self._layers)

    def set_bits(self, plan: int | Mapping[str, int]) -> SwitchReport:
        """Re-pack every layer whose width changes; returns what it did."""
        t0 = time.perf_counter()
        wanted = self._resolve(plan)
        changed = {n: b for n, b in wanted.items() if self._widths.get(n) != b}
        reused = 0
        with torch.no_grad(), self._trimming() as packed_anew:
            for name, b in changed.items():
                old = self.model.get_submodule(name)
                if self.keep_bytes and isinstance(old, PackedLinear):
                    old.release_compute()
                    self._kept[(name, old.bits)] = old
                packed = self._kept.pop((name, b), None)
                if packed is None:
                    packed = packed_anew(name, b)
                else:
                    reused += 1
                self.model.set_submodule(name, packed)
                self._widths[name] = b
            self._drop_kept()
        seconds = time.perf_counter() - t0
        report = SwitchReport(len(changed) - reused, seconds, self.bits_per_weight(), reused)
        log.debug("switched %d layers in %.2f s (%d packed, %d kept; %.3f bits per weight)",
                  len(changed), seconds, report.repacked, reused, report.bits_per_weight)
        return report

    def prefetch(self, plan: int | Mapping[str, int]) -> SwitchReport:
        """Pack the layers of another width or plan ahead of time, into the kept layers (so
        ``keep_bytes`` must hold them), without switching: a later :meth:`set_bits` to it then
        swaps modules only. Layers already at that width or kept there are skipped. The report
        counts the layers packed; its bits per weight are the current configuration's."""
        if not self.keep_bytes:
            raise PackedArgumentError("prefetch keeps packed layers: give the model a keep_bytes "
                                      "budget (load_switchable(..., keep_bytes=N))")
        t0 = time.perf_counter()
        wanted = self._resolve(plan)
        todo = {n: b for n, b in wanted.items()
                if self._widths.get(n) != b and (n, b) not in self._kept}
        with torch.no_grad(), self._trimming() as packed_anew:
            for name, b in todo.items():
                self._kept[(name, b)] = packed_anew(name, b)
        if self.kept_bytes() > self.keep_bytes:
            self._drop_kept()
            log.warning("prefetch: the kept layers exceed keep_bytes (%d); the least recently "
                        "used were dropped, some of the prefetched ones among them",
                        self.keep_bytes)
        return SwitchReport(len(todo), time.perf_counter() - t0, self.bits_per_weight())

    @contextmanager
    def _trimming(self) -> Iterator[Callable[[str, int], PackedLinear]]:
        """``packed_anew(name, bits)``: the layer packed at ``bits`` on the device of the layer
        now in its place (the source lives on the CPU); from the compact source, the freed
        heap goes back to the system every :data:`TRIM_BYTES` of float layers rebuilt, and at
        the end."""
        freed = 0

        def packed_anew(name: str, bits: int) -> PackedLinear:
            nonlocal freed
            old = self.model.get_submodule(name)
            device = next((t.device for t in (*old.buffers(), *old.parameters())),
                          torch.device("cpu"))
            packed = self._pack(name, bits).to(device)
            if self.source == "compact":
                freed += 4 * packed.in_features * packed.out_features  # its float copy
                if freed >= TRIM_BYTES:
                    _return_freed_memory()
                    freed = 0
            return packed

        try:
            yield packed_anew
        finally:
            if freed:
                _return_freed_memory()

    def kept_bytes(self) -> int:
        """Bytes of the packed layers kept from earlier widths."""
        return sum(m.stored_bytes() for m in self._kept.values())

    def _drop_kept(self) -> None:
        total = self.kept_bytes()
        while self._kept and total > self.keep_bytes:
            _, m = self._kept.popitem(last=False)
            total -= m.stored_bytes()

    def _resolve(self, plan: int | Mapping[str, int]) -> dict[str, int]:
        if isinstance(plan, bool) or not (plan is None
                                          or isinstance(plan, (numbers.Integral, Mapping))):
            raise PackedArgumentError(f"a switchable model takes a width (int) or a plan "
                                      f"{{layer: bits}}, got {plan!r}")
        return layer_widths(self._layers, plan)

    def _pack(self, name: str, bits: int) -> PackedLinear:
        layer = self._materialise(name, bits)
        try:
            packed = pack_model(_Holder(layer), {"layer": bits}, self.scale_dtype)["layer"]
        finally:
            if self.source == "compact":
                layer.to("meta")  # drop the float copy; the compact tensors stay
        packed.set_backend(self.backend)
        return packed

    def _materialise(self, name: str, bits: int) -> ElasticLinear:
        """The elastic layer, with (at least) what packing it at ``bits`` reads filled in."""
        layer = self._layers[name]
        if self.source == "elastic":
            return layer
        try:
            state = layer_state(name, layer, self._raw[name], self._compact, only_bits=bits)
        except (KeyError, RuntimeError, ValueError) as e:
            raise PackedFormatError(f"layer {name} cannot be rebuilt from its compact "
                                    f"tensors: {e}") from None
        prefix = f"{name}."
        res = layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()},
                                    strict=False, assign=True)
        if res.unexpected_keys or any(k.endswith(f".{bits}") for k in res.missing_keys):
            raise PackedFormatError(f"layer {name}: its compact tensors do not fit the layer "
                                    f"(unexpected {res.unexpected_keys[:2]}, missing "
                                    f"{res.missing_keys[:2]})")
        return layer

    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight of the packed layers (codes, scales, zero-points)."""
        packed = [self.model.get_submodule(n) for n in self._widths]
        weights = sum(m.in_features * m.out_features for m in packed)
        return 8 * sum(m.code_bytes() for m in packed) / max(weights, 1)

    def sizes(self) -> dict[str, Any]:
        """Bytes in memory: the packed layers now, and the source every width comes from."""
        packed = [self.model.get_submodule(n) for n in self._widths]
        weights = sum(m.in_features * m.out_features for m in packed)
        if self.source == "compact":
            source = sum(t.numel() * t.element_size() for d in self._raw.values()
                         for t in d.values())
        else:
            source = sum(t.numel() * t.element_size() for m in self._layers.values()
                         for t in (*m.parameters(), *m.buffers()))
        head = self.model.get_output_embeddings() if self.head_bits is not None else None
        return {"source": self.source, "quantized_weights": weights,
                "packed_bytes": sum(m.code_bytes() for m in packed),
                "head_bits": self.head_bits,
                "head_bytes": head.stored_bytes() if isinstance(head, PackedLinear) else None,
                "kept_bytes": self.kept_bytes(), "keep_bytes": self.keep_bytes,
                "source_bytes": source, "source_bits_per_weight": 8 * source / max(weights, 1),
                "bits_per_weight": self.bits_per_weight()}


def _return_freed_memory() -> None:
    """Hand the heap the float copies of a switch were freed into back to the system (glibc's
    ``malloc_trim``; elsewhere nothing): a switch frees one float layer after another, which
    glibc keeps in its heap, so without this a process's resident set grows by a few hundred
    MB on the default model after the first switch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def make_switchable(model: nn.Module, bits: int | Mapping[str, int], *, backend: str = "auto",
                    scale_dtype: str = "float16", head_bits: int | None = None,
                    keep_bytes: int = 0) -> Switchable:
    """Replace the elastic layers of a loaded elastic model by packed layers at ``bits`` and
    attach the switch as ``model.quept_switch``; the float layers stay as the source.
    ``head_bits`` also packs the output head (and a tied embedding) once, as ``quept export
    --head-bits`` does; ``keep_bytes`` keeps packed layers of earlier widths up to that many
    bytes, so that switching back to them is a swap of modules."""
    _check_scale_dtype(scale_dtype)
    layers = elastic_layers(model)
    if not layers:
        raise PackedFormatError("the model has no elastic layers: load an elastic folder "
                                "(`quept quantize`) or a compact checkpoint (`quept compact`)")
    return _attach(Switchable(model, "elastic", layers, None, None, backend, scale_dtype,
                              keep_bytes), bits, head_bits)


def switchable_from_compact(net: nn.Module, folder: str | os.PathLike, meta: Mapping[str, Any],
                            bits: int | Mapping[str, int], *, backend: str = "auto",
                            scale_dtype: str = "float16", head_bits: int | None = None,
                            keep_bytes: int = 0) -> Switchable:
    """Fill ``net`` (built on the meta device and prepared with the checkpoint's spec) from the
    compact checkpoint in ``folder``, except its elastic layers, which become packed layers at
    ``bits`` rebuilt one at a time from the compact tensors (kept as the source)."""
    _check_scale_dtype(scale_dtype)
    layers = elastic_layers(net)
    if sorted(layers) != sorted(meta["layers"]):
        raise PackedFormatError(f"{folder}: its layers do not match the model's elastic layers")
    # copied out of the file's memory map: its pages would otherwise stay resident for as
    # long as any tensor of the file lives, also those of a float head replaced by codes
    raw = {k: t.clone() for k, t in read_compact_tensors(folder).items()}
    try:
        per_layer, rest = split_layer_tensors(raw, list(layers))
    except PackedFormatError as e:
        raise PackedFormatError(f"{folder}: {e}") from None
    for name in layers:  # out of the tree while the rest is filled; packed layers go here
        net.set_submodule(name, nn.Identity())
    fill(net, rest, meta.get("aliases", {}), str(folder))
    ccfg = CompactConfig(**meta["compact"])
    return _attach(Switchable(net, "compact", layers, per_layer, ccfg, backend, scale_dtype,
                              keep_bytes), bits, head_bits)


def _attach(sw: Switchable, bits: int | Mapping[str, int], head_bits: int | None) -> Switchable:
    sw.set_bits(bits)
    if head_bits is not None:  # once: the head does not switch
        for name, packed in pack_head(sw.model, head_bits, sw.scale_dtype).items():
            packed.set_backend(sw.backend)
            sw.model.set_submodule(name, packed)
        sw.head_bits = head_bits
    sw.model.quept_switch = sw
    return sw


def _check_scale_dtype(scale_dtype: str) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise PackedFormatError(f"scale dtype {scale_dtype!r} is not one of {list(SCALE_DTYPES)}")
