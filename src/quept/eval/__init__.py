"""Evaluation: perplexity on token windows."""

from quept.eval.perplexity import perplexity

__all__ = ["perplexity"]
