"""Evaluation: perplexity on token windows; embedding fidelity of sentence encoders; top-1
accuracy of image classifiers."""

from quept.eval.classify import top1_accuracy
from quept.eval.embedding import (
    NotEnoughSentencesError,
    Sentences,
    fidelity,
    sentence_embeddings,
    sentences_from_text,
)
from quept.eval.perplexity import perplexity, window_nll

__all__ = ["NotEnoughSentencesError", "Sentences", "fidelity", "perplexity", "sentence_embeddings",
           "sentences_from_text", "top1_accuracy", "window_nll"]
