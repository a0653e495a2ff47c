"""Hadamard rotation of a LLaMA-family decoder before weight+activation quantization.

Activation outliers (a few channels far larger than the rest) waste a per-token quantizer's
range; at 4 bits they ruin it. An orthogonal rotation of the hidden state spreads them out
while the float model computes the same function (QuaRot, DESIGN 2.5):

1. every RMSNorm's scale is folded into the linears that read its output (q/k/v, gate/up,
   the output head), leaving norms of scale 1, which commute with a rotation;
2. the residual stream is rotated by a seeded random Hadamard matrix ``Q``: the embedding and
   the linears writing the stream (o_proj, down_proj) produce ``x Q``; the linears reading it
   take ``W Q`` (a tied head is untied first: it now differs from the embedding);
3. each value head is rotated by a Hadamard matrix of the head size, undone in o_proj's input;
4. down_proj's input (the MLP's intermediate activations) is rotated online: the layer applies
   a fast Hadamard transform to its input and holds ``W H`` (``in_rotation`` on the layer).

All of it is exact in float arithmetic (up to rounding): the float model's logits are
unchanged. Steps 1-3 change only weights; step 4 is a flag on the down_proj layers that
:class:`~quept.nn.ElasticLinear` and :class:`~quept.nn.PackedLinear` carry.
"""

from __future__ import annotations

import torch
from torch import nn

from quept.checks import ConfigError
from quept.ops.hadamard import HadamardSizeError, hadamard, random_hadamard

READS_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
READS_MLP = ("mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")
ONLINE = "mlp.down_proj"  # its input is rotated online


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def _mul_in(lin: nn.Module, r: torch.Tensor) -> None:
    """The linear now reads ``x R``: weight W -> W R."""
    lin.weight.copy_((lin.weight.double() @ r).to(lin.weight.dtype))


@torch.no_grad()
def _mul_out(lin: nn.Module, r: torch.Tensor) -> None:
    """The linear now writes ``y R``: weight W -> R^T W, bias b -> b R."""
    lin.weight.copy_((r.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ r).to(lin.bias.dtype))


def _untie_head(model: nn.Module) -> nn.Module:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
    return head


@torch.no_grad()
def rotate_decoder(model: nn.Module, blocks: nn.ModuleList, final_norm: nn.Module,
                   seed: int) -> None:
    """Rotate a LLaMA-family decoder in place (steps 1-3 above, and down_proj's weight for
    step 4); the caller marks the down_proj layers as reading a rotated input."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    downs = {block.get_submodule(ONLINE).in_features for block in blocks}
    for what, n in (("the hidden size", hidden), ("the head dimension", head_dim),
                    *(("down_proj's input (the MLP width)", d) for d in sorted(downs))):
        try:  # every order built before anything is rotated: a refusal changes nothing
            hadamard(n)
        except HadamardSizeError as e:
            raise ConfigError(f"{what} {n} cannot be rotated: {e}; use rotation 'none' "
                              "(--rotation none)") from None
    q = random_hadamard(hidden, seed)
    h_head = hadamard(head_dim)
    head = _untie_head(model)
    emb = model.get_input_embeddings()
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    for block in blocks:
        attn_in = [block.get_submodule(n) for n in READS_ATTN]
        mlp_in = [block.get_submodule(n) for n in READS_MLP]
        _fold_norm(block.input_layernorm, attn_in)
        _fold_norm(block.post_attention_layernorm, mlp_in)
        for lin in attn_in + mlp_in:
            _mul_in(lin, q)
        for name in WRITES:
            _mul_out(block.get_submodule(name), q)
        v, o = block.self_attn.v_proj, block.self_attn.o_proj
        n_v, n_o = v.out_features // head_dim, o.in_features // head_dim
        _mul_out(v, torch.block_diag(*[h_head] * n_v))
        _mul_in(o, torch.block_diag(*[h_head] * n_o))
        down = block.get_submodule(ONLINE)
        _mul_in(down, hadamard(down.in_features))
    _fold_norm(final_norm, [head])
    _mul_in(head, q)
