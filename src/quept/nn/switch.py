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


def plan_widths(layers: Mapping[str, nn.Module], bits: BitsPlan,
                error: type[Exception] = ConfigError) -> dict[str, int | None]:
    """``{layer name: bits}`` for every name in ``layers`` from one width (or None) or a plan
    that must name every layer exactly; a mismatch raises ``error`` with examples."""
    if not isinstance(bits, Mapping):
        return dict.fromkeys(layers, bits)
    missing = [n for n in layers if n not in bits]
    unknown = [n for n in bits if n not in layers]
    if missing or unknown:
        raise error(
            f"plan does not match the model: {len(missing)} layers missing "
            f"(e.g. {missing[:3]}), {len(unknown)} unknown names (e.g. {unknown[:3]})"
        )
    return {n: bits[n] for n in layers}


def set_bits(model: nn.Module, bits: BitsPlan, *, rtn: bool = False) -> nn.Module:
    """Set every elastic layer to ``bits`` (int, or None for float) or apply a plan
    ``{layer name: bits}`` that must name every elastic layer exactly. Returns ``model``."""
    layers = elastic_layers(model)
    if not layers:
        raise ConfigError("the model has no elastic layers; run quept.prepare first")
    for n, b in plan_widths(layers, bits).items():
        try:
            layers[n].set_bits(b, rtn=rtn)
        except ConfigError as e:
            raise ConfigError(f"layer {n}: {e}" if isinstance(bits, Mapping) else str(e)) from None
    return model
