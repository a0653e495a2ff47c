"""RepQ-ViT-style reparameterisation of post-LayerNorm activations (DESIGN 2.5).

A LayerNorm's output channels have very different ranges, so one static per-tensor quantizer
on them wastes most of its levels. With per-channel ranges ``[m_c, M_c]`` measured on
calibration inputs, the channels are rescaled and shifted to one common range: the norm
outputs ``y' = (y + shift) / scale`` (its weight divided by ``scale``, its bias becomes
``(bias + shift) / scale``) and every linear reading it takes ``W diag(scale)`` with bias
``b - W shift``. The float function is unchanged; a per-tensor quantizer on ``y'`` is as good
as a per-channel one on ``y``. ``scale_c`` is the channel's range over the mean range and
``shift_c`` puts every channel's zero at the same relative place in its range.
"""

from __future__ import annotations

import torch
from torch import nn

from quept.models.families import Family

# Per family: (norm, the linears that read its output) inside one block.
REPARAM_PAIRS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "vit": (("layernorm_before", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
            ("layernorm_after", ("mlp.fc1",))),
    "deit": (("layernorm_before", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
             ("layernorm_after", ("mlp.fc1",))),
}


def block_pairs(family: Family) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The family's (norm, linears) pairs; empty where none is known (no reparameterisation)."""
    return REPARAM_PAIRS.get(family.name, ())


def channel_transform(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel mapping each range ``[lo_c, hi_c]`` onto one common range."""
    width = (hi - lo).clamp(min=1e-6)
    scale = width / width.mean()
    rho = (-lo / width).mean()  # the common relative position of zero in the range
    shift = -lo - width * rho
    return scale, shift


@torch.no_grad()
def fold(norm: nn.LayerNorm, linears: list[nn.Module], scale: torch.Tensor,
         shift: torch.Tensor) -> None:
    """Fold ``(scale, shift)`` into ``norm`` and the elastic ``linears`` reading it."""
    if norm.weight is None or norm.bias is None:
        raise ValueError(f"{norm} has no affine weight and bias to fold a reparameterisation into")
    norm.bias.add_(shift.to(norm.bias)).div_(scale.to(norm.bias))
    norm.weight.div_(scale.to(norm.weight))
    for m in linears:
        m.fold_input_reparam(scale, shift)


def refold(model: nn.Module, family: Family) -> int:
    """Redo, on a freshly prepared model whose elastic state was just loaded, every recorded
    reparameterisation not folded in yet (the norms and weights are the base model's);
    returns how many norms were changed."""
    return sum(refold_block(block, family) for block in family.get_blocks(model))


def refold_block(block: nn.Module, family: Family) -> int:
    """:func:`refold` for one block."""
    done = 0
    for norm, names in block_pairs(family):
        lins = [block.get_submodule(n) for n in names]
        first = lins[0]
        if not first.act_parameters():  # no static activation quantizers: never reparameterised
            continue
        if first.reparam_folded or (bool((first.in_scale == 1).all())
                                    and bool((first.in_shift == 0).all())):
            continue
        scale, shift = first.in_scale.clone(), first.in_shift.clone()
        fold(block.get_submodule(norm), lins, scale, shift)
        done += 1
    return done
