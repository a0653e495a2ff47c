"""PackedLinear: an inference-only linear layer over integer codes packed at their true width.

State (the buffers a packed folder stores, already in their packed shapes so a model can be
built on the meta device and filled with ``load_state_dict(assign=True)``):

- ``qweight`` uint8 (out, packed_length(in, bits)): codes in the bit-plane layout of
  :mod:`quept.ops.pack`;
- ``scale`` float16 or float32 (out, G): step per group (G = in / group_size);
- ``qzero`` uint8 (packed_length(out * G, bits),): zero-points, packed at ``bits`` as one row;
- ``bias`` (out,) when the layer has one.

``W[o, i] = (code[o, i] - zero[o, g]) * scale[o, g]`` with ``g = i // group_size``.

Forward backends: ``"kernel"`` runs the fused unpack + matmul CPU kernel of
:mod:`quept.ops.kernels` for up to 8 rows (token-by-token decode) and dequantizes into one
shared scratch buffer + ``F.linear`` for longer inputs (prefill); ``"aten-int4"`` uses PyTorch's
``_weight_int4pack_mm_for_cpu`` (widths <= 4, float32 activations); ``"dequant"`` dequantizes
with plain torch ops every call (any device). ``"auto"`` picks the kernel when it is available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quept.ops import kernels
from quept.ops.hadamard import hadamard_transform
from quept.ops.pack import pack, packed_length, unpack
from quept.ops.quant import (
    dequantize,
    fake_quant_act,
    fake_quant_static,
    n_groups,
    to_groups,
)

BACKENDS = ("auto", "kernel", "aten-int4", "dequant")
_scratch: dict[torch.device, torch.Tensor] = {}  # one shared float32 buffer per device


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored as ``bits``-bit group-wise asymmetric codes."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
        scale_dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = group_size or in_features  # 0 = per channel
        g = n_groups(in_features, self.group_size)
        self.register_buffer("qweight", torch.empty(
            out_features, packed_length(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, g, dtype=scale_dtype, device=device))
        self.register_buffer("qzero", torch.empty(
            packed_length(out_features * g, bits), dtype=torch.uint8, device=device))
        self.register_buffer(
            "bias", torch.empty(out_features, device=device) if bias else None)
        self.backend = "auto"
        # Weight+activation mode: the input is quantized per token at this width (simulated in
        # float: dequantized integers, so the product equals an integer GEMM's rescaled output).
        self.act_bits: int | None = None
        # ... by a static per-tensor quantizer (step, zero-point) instead, when set.
        self.act_static: tuple[float, float] | None = None
        self.in_rotation = False  # the codes read a Hadamard-rotated input (see ElasticLinear)
        # The output is a key or value of a KV cache quantized per token and head at
        # (bits, head_dim, rotated) (ElasticSpec.kv_bits): the attention applies it, after the
        # rotary embedding (quept.nn.kv).
        self.kv_quant: tuple[int, int, bool] | None = None
        # Derived on first use: (backend, scale fp32, -zero * scale fp32[, aten-int4 operands]).
        self._compute: tuple | None = None

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
        group_size: int, bias: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> PackedLinear:
        """Build from uint8 codes (out, in) and scale / zero (out, G) as ``quantize`` returns."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bits, group_size, bias is not None, scale_dtype, "meta")
        m.qweight = pack(codes, bits)
        m.scale = scale.to(scale_dtype).contiguous()
        zero = zero if zero.dtype == torch.uint8 else zero.round().to(torch.uint8)
        m.qzero = pack(zero.reshape(-1), bits)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def zeros(self) -> torch.Tensor:
        """Zero-points (out, G) as uint8 codes."""
        return unpack(self.qzero, self.bits, self.scale.numel()).reshape(self.scale.shape)

    def codes(self) -> torch.Tensor:
        """Codes (out, in) as uint8."""
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) these codes stand for."""
        return dequantize(self.codes(), self.scale.float(), self.zeros().float(), self.group_size)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backend, self._compute = backend, None

    def resolved_backend(self) -> str:
        """The backend ``forward`` uses for this layer on its current device."""
        cpu = self.qweight.device.type == "cpu"
        ok = kernels.supported(self.bits, self.in_features, self.group_size)
        if self.backend == "auto":
            return "kernel" if cpu and ok and kernels.load() is not None else "dequant"
        if self.backend == "kernel" and not (cpu and ok and kernels.load() is not None):
            raise RuntimeError(f"the fused kernel cannot run this layer ({self.extra_repr()})")
        if self.backend == "aten-int4" and not (cpu and self.bits <= 4):
            raise RuntimeError(f"aten-int4 needs a CPU layer of <= 4 bits ({self.extra_repr()})")
        return self.backend

    def _prepare(self) -> tuple:
        backend = self.resolved_backend()
        scale = self.scale.float().contiguous()
        zero = self.zeros().float()
        state: tuple = (backend, scale, (-zero * scale).contiguous())
        if backend == "aten-int4":
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous()
            state += (w, sz)
        self._compute = state
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend, scale, zs, *extra = self._compute or self._prepare()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if self.in_rotation:
            x2 = hadamard_transform(x2)
        if self.act_bits is not None and self.act_static is not None:
            x2 = fake_quant_static(x2, torch.tensor(self.act_static[0]), self.act_static[1],
                                   self.act_bits)
        elif self.act_bits is not None:
            x2 = fake_quant_act(x2, self.act_bits)
        if backend == "kernel" and x2.shape[0] <= kernels.MAX_ROWS:
            y = kernels.qgemv(x2, self.qweight, scale, zs, self.bits, self.group_size)
        elif backend == "aten-int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, extra[0], self.group_size, extra[1])
        elif backend == "kernel":
            y = F.linear(x2, self._dequant_into_scratch(scale, zs))
        else:
            y = F.linear(x2, self.dequantized().to(x2.device))
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _dequant_into_scratch(self, scale: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        n = self.out_features * self.in_features
        dev = self.qweight.device
        buf = _scratch.get(dev)
        if buf is None or buf.numel() < n:
            buf = _scratch[dev] = torch.empty(n, dtype=torch.float32, device=dev)
        out = buf[:n].view(self.out_features, self.in_features)
        return kernels.qdequant(self.qweight, scale, zs, self.bits, self.in_features,
                                self.group_size, out)

    def release_compute(self) -> None:
        """Drop the compute copies of the scales and zero-points (float32, built on first use
        and rebuilt on the next): a layer kept aside then holds only its stored state."""
        self._compute = None

    def _apply(self, fn, recurse=True):  # same signature as nn.Module._apply
        self.release_compute()  # device or dtype moves invalidate the compute copies
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.release_compute()
        super()._load_from_state_dict(*args, **kwargs)

    def stored_bytes(self) -> int:
        """Bytes of the stored state (codes, scales, zero-points, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def code_bytes(self) -> int:
        """Bytes of the quantized weight alone (codes, scales, zero-points): what a width's
        bits per weight count; a bias is a float tensor like the norms'."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    def extra_repr(self) -> str:
        act = "" if self.act_bits is None else f", act_bits={self.act_bits}"
        act += ", rotated input" if self.in_rotation else ""
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}{act}, backend={self.backend}")


class PackedEmbedding(PackedLinear):
    """An embedding table stored like a :class:`PackedLinear` (rows = tokens), so a tied
    input embedding can share the packed output head's buffers. ``forward(ids)`` dequantizes
    the looked-up rows only: (..., ) int64 -> (..., embedding_dim) float32."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, scale, zs, *_ = self._compute or self._prepare()
        rows = ids.reshape(-1)
        codes = to_groups(unpack(self.qweight[rows], self.bits, self.in_features).float(),
                          self.group_size)
        out = torch.addcmul(zs[rows].unsqueeze(-1), codes, scale[rows].unsqueeze(-1))
        return out.reshape(*ids.shape, self.in_features)

    def resolved_backend(self) -> str:
        return "dequant"
