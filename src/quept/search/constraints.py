"""Constraints on the widths a plan may give: pin layers to one width or bound them from below
or above, by exact name or shell-style pattern.

    model.layers.0.*=8        every linear of the first block at 8 bits
    *.mlp.down_proj>=4        down projections at 4 bits or more
    *<=6                      no layer above 6 bits

Constraints apply in the order given: each narrows the widths the earlier ones left a layer,
and where it leaves none (``*<=3`` then ``model.layers.0.*=8``) the later one wins, as a later
entry of a hand-written plan does. A constraint that matches no layer, or allows no width of
the elastic model, is refused. The allocation then chooses among the widths each layer is left
(:func:`clamp` keeps whole units, blocks or sublayers, moving together: a unit's option ``b``
puts each of its linears at the allowed width nearest ``b``), and the budget counts the pinned
layers like any other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from quept.checks import MAX_BITS, MIN_BITS, ConfigError, check_bits
from quept.nn.switch import is_pattern

_SYNTAX = re.compile(r"\s*(?P<pattern>.*?)\s*(?P<op>>=|<=|=)\s*(?P<bits>[0-9]+)\s*")
HELP = "PATTERN=BITS, PATTERN>=BITS or PATTERN<=BITS (e.g. 'model.layers.0.*=8', '*.down_proj>=4')"


@dataclass(frozen=True)
class Constraint:
    """Widths ``lo``..``hi`` (inclusive) for the layers ``pattern`` names (an exact layer name
    or a shell-style pattern)."""

    pattern: str
    lo: int
    hi: int
    written: str = field(default="", compare=False)  # the text it was read from, if any

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ConfigError("a constraint needs a layer name or pattern")
        for b in (self.lo, self.hi):
            check_bits(b)
        if self.lo > self.hi:
            raise ConfigError(f"constraint on {self.pattern!r}: the lower bound {self.lo} is "
                              f"above the upper bound {self.hi}")

    @classmethod
    def parse(cls, text: str) -> Constraint:
        m = _SYNTAX.fullmatch(str(text))
        if m is None or not m.group("pattern"):
            raise ConfigError(f"cannot read a constraint from {text!r}; write {HELP}")
        bits = int(m.group("bits"))
        try:
            check_bits(bits)
        except ConfigError as e:
            raise ConfigError(f"constraint {text!r}: {e}") from None
        op = m.group("op")
        lo = bits if op in ("=", ">=") else MIN_BITS
        hi = bits if op in ("=", "<=") else MAX_BITS
        return cls(m.group("pattern"), lo, hi, str(text).strip())

    @property
    def texts(self) -> tuple[str, ...]:
        """The constraint as it would be written, ``("*.down_proj>=4",)``; one with both bounds
        (made in Python, ``Constraint("*", 3, 6)``) as its two halves."""
        if self.written:
            return (self.written,)
        if self.lo == self.hi:
            return (f"{self.pattern}={self.lo}",)
        return tuple([f"{self.pattern}>={self.lo}"] * (self.lo > MIN_BITS)
                     + [f"{self.pattern}<={self.hi}"] * (self.hi < MAX_BITS)) or (
            f"{self.pattern}>={MIN_BITS}",)

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern) if is_pattern(self.pattern) else (
            name == self.pattern)


def parse_constraints(items: Iterable[str | Constraint] | None) -> tuple[Constraint, ...]:
    """Constraints from their texts (``"model.layers.0.*=8"``) or as given."""
    if isinstance(items, (str, Constraint)):
        items = [items]
    return tuple(c if isinstance(c, Constraint) else Constraint.parse(c) for c in items or ())


def constraint_texts(items: Iterable[str | Constraint] | None) -> tuple[str, ...]:
    """The constraints as a plan records them: each as it would be written."""
    return tuple(t for c in parse_constraints(items) for t in c.texts)


def allowed_widths(names: Iterable[str], bits: tuple[int, ...],
                   constraints: Iterable[str | Constraint] | None) -> dict[str, tuple[int, ...]]:
    """Each layer's widths among ``bits`` (the elastic model's, ascending) under the
    constraints, applied in order: each keeps the widths of those left that it allows, or,
    where it allows none of them, its own (a later constraint wins a conflict). A constraint
    that matches no layer or allows no width of ``bits`` raises ConfigError."""
    names = list(names)
    out = dict.fromkeys(names, tuple(bits))
    for c in parse_constraints(constraints):
        own = tuple(b for b in bits if c.lo <= b <= c.hi)
        if not own:
            raise ConfigError(f"constraint {', '.join(c.texts)!r} allows no width of the "
                              f"elastic model ({', '.join(map(str, bits))})")
        hits = [n for n in names if c.matches(n)]
        if not hits:
            under = not is_pattern(c.pattern) and any(
                n.startswith(c.pattern + ".") for n in names)
            hint = (f"; for the linears under {c.pattern} write {c.pattern}.*" if under else
                    f"; layers are named like {names[:2]} (patterns use * ? [...], as in a "
                    "shell)")
            raise ConfigError(f"constraint {', '.join(c.texts)!r} matches no layer{hint}")
        for n in hits:
            out[n] = tuple(b for b in out[n] if b in own) or own
    return out


def clamp(allowed: tuple[int, ...], bits: int) -> int:
    """The width a layer allowed ``allowed`` (ascending, non-empty) takes when its unit is at
    ``bits``: ``bits`` itself when allowed, else the nearest allowed width (the lower on a tie)."""
    if bits in allowed:
        return bits
    return min(allowed, key=lambda b: (abs(b - bits), b))

