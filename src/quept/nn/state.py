"""The elastic state of a module: adapters and clip logits (plus, with static activation
quantizers, their steps and the input reparameterisation), as a flat tensor dict."""

from __future__ import annotations

import torch
from torch import nn

from quept.nn.elastic_linear import ElasticLinear


class StateMismatchError(ValueError):
    """Saved elastic state does not fit the model it is loaded into."""


def elastic_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified parameter name: tensor}`` for every adapter and clip logit under ``module``."""
    out: dict[str, torch.Tensor] = {}
    for name, m in module.named_modules():
        if isinstance(m, ElasticLinear):
            prefix = f"{name}." if name else ""
            out[f"{prefix}lora_u"] = m.lora_u.detach().contiguous()
            out[f"{prefix}lora_v"] = m.lora_v.detach().contiguous()
            for b, p in m.clip_hi.items():
                out[f"{prefix}clip_hi.{b}"] = p.detach().contiguous()
            for b, p in m.clip_lo.items():
                out[f"{prefix}clip_lo.{b}"] = p.detach().contiguous()
            if m.act_parameters():  # ElasticSpec.activations "per-tensor"
                for b, p in m.act_log_step.items():
                    out[f"{prefix}act_log_step.{b}"] = p.detach().contiguous()
                for k in ("act_searched", "in_scale", "in_shift"):
                    out[f"{prefix}{k}"] = getattr(m, k).detach().contiguous()
    return out


@torch.no_grad()
def load_elastic_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the module's adapters and clips; every key must match exactly."""
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    expected = elastic_state_dict(module)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise StateMismatchError(
            f"elastic state does not match the model: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unknown)} unexpected (e.g. {unknown[:2]}), as if "
            "saved from a different model or spec"
        )
    for k, v in state.items():
        p = own[k]
        if p.shape != v.shape:
            raise StateMismatchError(
                f"{k}: saved shape {tuple(v.shape)} but the model needs {tuple(p.shape)}"
            )
        p.copy_(v)
