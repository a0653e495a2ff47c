"""Stateful modules: the elastic linear and whole-model switching helpers."""

from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import BitsPlan, elastic_layers, set_bits

__all__ = ["BitsPlan", "ElasticLinear", "elastic_layers", "set_bits"]
