"""Switch every ElasticLinear of a model to one width or to a per-layer plan."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from quept.config import ConfigError
from quept.nn.elastic_linear import ElasticLinear

BitsPlan = int | None | Mapping[str, int | None]


def elastic_layers(model: nn.Module) -> dict[str, ElasticLinear]:
    """Qualified name -> ElasticLinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ElasticLinear)}


def set_bits(model: nn.Module, bits: BitsPlan, *, rtn: bool = False) -> nn.Module:
    """Set every elastic layer to ``bits`` (int, or None for float) or apply a plan
    ``{layer name: bits}`` that must name every elastic layer exactly. Returns ``model``."""
    layers = elastic_layers(model)
    if not layers:
        raise ConfigError("the model has no elastic layers; run quept.prepare first")
    if isinstance(bits, Mapping):
        missing = [n for n in layers if n not in bits]
        unknown = [n for n in bits if n not in layers]
        if missing or unknown:
            raise ConfigError(
                f"plan does not match the model: {len(missing)} layers missing "
                f"(e.g. {missing[:3]}), {len(unknown)} unknown names (e.g. {unknown[:3]})"
            )
        for n, m in layers.items():
            try:
                m.set_bits(bits[n], rtn=rtn)
            except ConfigError as e:
                raise ConfigError(f"layer {n}: {e}") from None
    else:
        for m in layers.values():
            m.set_bits(bits, rtn=rtn)
    return model
