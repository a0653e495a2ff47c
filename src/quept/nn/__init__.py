"""Stateful modules: the elastic linear, the packed inference linear and switching helpers."""

from quept.nn.elastic_linear import ElasticLinear
from quept.nn.packed_linear import PackedLinear
from quept.nn.switch import BitsPlan, elastic_layers, set_bits

__all__ = ["BitsPlan", "ElasticLinear", "PackedLinear", "elastic_layers", "set_bits"]
