"""ONNX Runtime's ``com.microsoft.MatMulNBits`` operator for quantized linears.

Each quantized linear becomes a ``MatMulNBits``: ``B`` the codes, ``block_size`` = our group
size, one float32 ``scale`` and one packed ``zero_point`` per group, dequantized as
``(q - z) * s``, which is ours, so the weights are the elastic model's exactly. ONNX Runtime's
CPU kernel takes 2, 4 and 8 bits, so 3-bit codes travel in 4-bit containers and 5, 6 and 7-bit
codes in 8-bit ones (exact; the file is as large as the container's width). Codes and
zero-points are packed low bits first.

Under torch an :class:`NBitsLinear` runs the custom op ``quept::matmul_nbits`` (registered
once, when this module is imported), whose ONNX translation (:func:`_translation`, for
:func:`quept.export.onnx_format.save_graph`) is the ``MatMulNBits`` node; its schema is
registered with ``onnx`` for the tracer, once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # our width -> MatMulNBits bits
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (float32), 1 fp32, 2 fp16, 3 bf16, 4 int8


class OnnxExportError(ValueError):
    """The model or plan cannot be exported to ONNX."""


# --------------------------------------------------------------------------- packing
def pack_low_first(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values < 2^bits (..., n) -> uint8 (..., ceil(n*bits/8)), low bits first, for
    ``bits`` in 2, 4, 8 (the widths a byte holds a whole number of)."""
    if bits not in (2, 4, 8):
        raise OnnxExportError(f"MatMulNBits containers are 2, 4 or 8 bits, not {bits}")
    per = 8 // bits
    v = values.to(torch.uint8)
    pad = -v.shape[-1] % per
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (v << shifts).sum(-1).to(torch.uint8)


def unpack_low_first(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_low_first`: uint8 (..., bytes) -> uint8 (..., n)."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


# --------------------------------------------------------------------------- the custom op
@torch.library.custom_op("quept::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    """``x @ W.T`` for the MatMulNBits operands of ``W`` (n, k); computed in float32 here
    whatever ``accuracy_level`` (an attribute for ONNX Runtime) says."""
    blocks = k // block_size
    codes = unpack_low_first(b, bits, block_size).float()  # (n, blocks, block)
    zero = unpack_low_first(zero_points, bits, blocks).float().unsqueeze(-1)
    w = ((codes - zero) * scales.unsqueeze(-1)).reshape(n, k)
    return x @ w.t()


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, k, n, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


class NBitsLinear(nn.Module):
    """A linear layer as MatMulNBits operands (buffers) plus an optional float bias."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 block_size: int, bias: torch.Tensor | None, accuracy_level: int = 0):
        super().__init__()
        n, k = codes.shape
        self.k, self.n, self.bits, self.block_size = k, n, CONTAINER[bits], block_size
        self.accuracy_level = accuracy_level
        blocks = k // block_size
        self.register_buffer("b", pack_low_first(codes.reshape(n, blocks, block_size), self.bits))
        self.register_buffer("scales", scale.float().reshape(n, blocks).contiguous())
        self.register_buffer("zero_points", pack_low_first(zero.round().reshape(n, blocks),
                                                           self.bits))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quept.matmul_nbits(x, self.b, self.scales, self.zero_points, self.k,
                                         self.n, self.bits, self.block_size, self.accuracy_level)
        return y if self.bias is None else y + self.bias

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.b, self.scales, self.zero_points))


def _register_schema() -> None:
    """Make ``com.microsoft.MatMulNBits`` known to ``onnx.defs`` (the tracer needs a schema)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    fp = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"),
                fp("zero_points", "T3", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""),
                          ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                    for a in ("K", "N", "bits", "block_size", "accuracy_level")],
    ))


def _translation() -> dict[Any, Any]:
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def matmul_nbits_onnx(x, b, scales, zero_points, k: int, n: int, bits: int, block_size: int,
                          accuracy_level: int):
        return msft.MatMulNBits(x, b, scales, zero_points, K=k, N=n, bits=bits,
                                block_size=block_size, accuracy_level=accuracy_level)

    return {torch.ops.quept.matmul_nbits.default: matmul_nbits_onnx}
