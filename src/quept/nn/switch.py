"""Switch every ElasticLinear of a model to one width or to a per-layer plan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

from torch import nn

from quept.checks import ConfigError, check_bits, counted
from quept.nn.elastic_linear import ElasticLinear

BitsPlan = int | None | Mapping[str, int | None]


def elastic_layers(model: nn.Module) -> dict[str, ElasticLinear]:
    """Qualified name -> ElasticLinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ElasticLinear)}


GLOB_CHARS = frozenset("*?[")


def is_pattern(key: str) -> bool:
    """Whether a plan key is a shell-style pattern (``*``, ``?`` or ``[...]``), not a name."""
    return not GLOB_CHARS.isdisjoint(key)


def expand_patterns(names: Iterable[str], plan: Mapping[str, int | None],
                    error: type[Exception] = ConfigError) -> dict[str, int | None]:
    """A plan whose keys may be shell-style patterns (``"*": 3, "*.mlp.down_proj": 4``) as
    ``{name: bits}`` over ``names``: entries apply in the plan's order, a later one overriding
    an earlier one for the layers both match. A pattern that matches no name raises ``error``
    (a typo would otherwise change nothing); names no entry matches are left out, for
    :func:`plan_widths` to report."""
    names = list(names)
    out: dict[str, int | None] = {}
    for key, bits in plan.items():
        if not is_pattern(key):
            out[key] = bits  # an exact name: checked against the model by the caller
            continue
        hits = [n for n in names if fnmatchcase(n, key)]
        if not hits:
            raise error(f"plan entry {key!r} matches no layer; layers are named like "
                        f"{names[:2]} (patterns use * ? [...], as in a shell)")
        out.update(dict.fromkeys(hits, bits))
    return out


def plan_widths(layers: Mapping[str, nn.Module], bits: BitsPlan,
                error: type[Exception] = ConfigError) -> dict[str, int | None]:
    """``{layer name: bits}`` for every name in ``layers`` from one width (or None) or a plan
    that names every layer exactly, or covers them with shell-style patterns applied in order
    (``{"*": 3, "*.mlp.down_proj": 4}``: every layer at 3 bits, the down projections at 4); a
    mismatch raises ``error`` with examples."""
    if not isinstance(bits, Mapping):
        return dict.fromkeys(layers, bits)
    odd = [k for k in bits if not isinstance(k, str)]
    if odd:
        raise error(f"plan keys must be layer names or shell-style patterns (strings), got "
                    f"{odd[0]!r}; layers are named like {list(layers)[:2]}")
    if any(is_pattern(k) for k in bits):
        bits = expand_patterns(layers, bits, error)
    missing = [n for n in layers if n not in bits]
    unknown = [n for n in bits if n not in layers]
    if layers and len(unknown) == len(bits) > 0:  # no entry a "*" could complete
        raise error(f"plan names none of the model's {len(layers)} layers: it was made for "
                    f"another model (the plan names layers like {unknown[0]!r}, the model's "
                    f"are named like {next(iter(layers))!r}); make a plan for this model")
    if missing or unknown:
        hint = ("; add a first entry \"*\": BITS for the layers no other entry names"
                if missing else "")
        found = [f"{what} (e.g. {names[:3]})" for names, what in
                 ((missing, f"{counted(len(missing), 'layer')} missing"),
                  (unknown, counted(len(unknown), "unknown name"))) if names]
        raise error(f"plan does not match the model: {', '.join(found)}{hint}")
    return {n: bits[n] for n in layers}


def set_bits(model: nn.Module, bits: BitsPlan, *, rtn: bool = False) -> nn.Module:
    """Set every elastic layer to ``bits`` (int, or None for float) or apply a plan
    ``{layer name: bits}`` that must name every elastic layer exactly. Returns ``model``."""
    layers = elastic_layers(model)
    if not layers:
        raise ConfigError("the model has no elastic layers; run quept.prepare first")
    chosen = plan_widths(layers, bits)
    for n, b in chosen.items():  # every width checked before any layer switches
        if b is not None:
            try:
                chosen[n] = check_bits(b, layers[n].spec.bits)
            except ConfigError as e:
                raise ConfigError(f"layer {n}: {e}" if isinstance(bits, Mapping)
                                  else str(e)) from None
    for n, b in chosen.items():
        layers[n].set_bits(b, rtn=rtn)
    return model
