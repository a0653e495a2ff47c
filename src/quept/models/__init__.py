"""Model families as data: where the blocks are, which linears to wrap, how to call a block."""

from quept.models.families import (
    FAMILIES,
    Family,
    UnsupportedModelError,
    family_for,
    family_for_type,
)

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "family_for", "family_for_type"]
