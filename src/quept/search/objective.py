"""What a mixed-precision plan preserves, by model task: the cost the sensitivity table, the
in-context sweeps and the candidate checks measure against the float model.

- causal LMs: the KL of the next-token distribution over the vocabulary, per token;
- image classifiers: the KL of the class distribution, per image;
- encoders: the squared distance of the L2-normalised mean-pooled sentence embedding,
  halved, per sentence. For unit vectors ``1/2 |e - e_ref|^2 = 1 - cos(e, e_ref)``: the cost is
  one minus the cosine `quept eval` reports for an encoder.

Each objective gives the model's output for a batch of its inputs (with a graph to the inputs
when asked, so the backward hooks of the estimator fire while every weight stays frozen), the
cost of an output against a reference, the cost's gradient in the output and a random probe
whose covariance is the cost's Hessian in the output at the reference (softmax:
``diag(q) - q q'``; halved squared distance: the identity). The estimator of
:mod:`quept.search.sensitivity` needs nothing else from a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quept.config import ConfigError


class Objective:
    """One task's cost. ``inputs`` are what the task's model reads, ``N`` samples along the
    first dimension: token ids (N, T), pixel values (N, C, H, W) or
    :class:`quept.eval.Sentences` (ids and attention mask, N x T each)."""

    name = ""  # what plans record (and tables, for tasks other than the causal LM)
    unit = "sample"  # what one cost is per
    cost_name = ""  # what the cost is called in print
    per = ""  # the cost's unit in print

    # --- inputs -----------------------------------------------------------------------------
    def check(self, inputs: Any, what: str = "inputs") -> None:
        """Refuse inputs of the wrong kind or shape, naming what is expected."""
        raise NotImplementedError

    def size(self, inputs: Any) -> int:
        return inputs.shape[0]

    def take(self, inputs: Any, start: int, stop: int) -> Any:
        return inputs[start:stop]

    def n_units(self, inputs: Any) -> int:
        """How many costs a batch sums (tokens, images, sentences)."""
        return self.size(inputs)

    def shape(self, inputs: Any) -> tuple[int, ...]:
        return tuple(inputs.shape)

    def to_bytes(self, inputs: Any) -> bytes:
        return inputs.detach().cpu().contiguous().numpy().tobytes()

    def batches(self, inputs: Any, batch_size: int, device: torch.device | str | None = None
                ) -> Iterator[Any]:
        """``inputs`` ``batch_size`` samples at a time (tensors moved to ``device``)."""
        for i in range(0, self.size(inputs), batch_size):
            batch = self.take(inputs, i, i + batch_size)
            yield batch.to(device) if device is not None and torch.is_tensor(batch) else batch

    # --- outputs ----------------------------------------------------------------------------
    def output(self, model: nn.Module, batch: Any, *, grad: bool = False) -> torch.Tensor:
        """The model's output on ``batch`` in float32; with ``grad`` the graph reaches the
        inputs (an input-side tensor requires grad), so layer outputs get gradients."""
        raise NotImplementedError

    def target(self, out: torch.Tensor) -> torch.Tensor:
        """What a reference output is kept as for :meth:`cost`."""
        return out

    def cost(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        """Summed cost of ``out`` against the reference ``ref`` (from :meth:`target`)."""
        raise NotImplementedError

    def gradient(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """d cost / d out at ``out``, the reference being ``ref`` (from :meth:`target`)."""
        raise NotImplementedError

    def probe(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random output-space vector whose covariance is the cost's Hessian at ``out``."""
        raise NotImplementedError


class _SoftmaxKL(Objective):
    """KL(p_ref || p) of a softmax over the last dimension, summed over every other one."""

    def target(self, out: torch.Tensor) -> torch.Tensor:
        return out.log_softmax(-1)

    def cost(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        return F.kl_div(out.log_softmax(-1), ref, log_target=True, reduction="sum").item()

    def gradient(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return out.softmax(-1) - ref.exp()

    def probe(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        q = out.softmax(-1)
        root = q.sqrt()
        xi = torch.randn(q.shape, generator=gen).to(q.device)
        return root * xi - q * (root * xi).sum(-1, keepdim=True)  # covariance diag(q) - q q'


class NextTokenKL(_SoftmaxKL):
    """Causal LMs: KL of the next-token distribution, per token."""

    name, unit, cost_name, per = "next-token-kl", "token", "KL", "nats/token"

    def check(self, inputs: Any, what: str = "inputs") -> None:
        if (not isinstance(inputs, torch.Tensor) or inputs.ndim != 2 or inputs.numel() == 0
                or inputs.dtype not in (torch.int64, torch.int32)):
            raise ConfigError(f"{what} must be (N, T) integer token ids with N, T >= 1, got "
                              f"{_described(inputs)}")

    def n_units(self, inputs: torch.Tensor) -> int:
        return inputs.numel()

    def output(self, model: nn.Module, batch: torch.Tensor, *, grad: bool = False
               ) -> torch.Tensor:
        if not grad:
            return model(batch, use_cache=False).logits.float()
        embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
        return model(inputs_embeds=embeds, use_cache=False).logits.float()


class ClassKL(_SoftmaxKL):
    """Image classifiers: KL of the class distribution, per image."""

    name, unit, cost_name, per = "class-kl", "image", "KL", "nats/image"

    def check(self, inputs: Any, what: str = "inputs") -> None:
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or inputs.shape[0] == 0:
            raise ConfigError(f"{what} must be (N, C, H, W) pixel values with N >= 1, got "
                              f"{_described(inputs)}")

    def output(self, model: nn.Module, batch: torch.Tensor, *, grad: bool = False
               ) -> torch.Tensor:
        pixels = batch.detach().clone().requires_grad_(True) if grad else batch
        return model(pixel_values=pixels).logits.float()


class EmbeddingDistance(Objective):
    """Encoders: half the squared distance of the normalised mean-pooled embeddings, per
    sentence (``1 - cosine`` to the reference)."""

    name, unit, cost_name, per = "embedding-distance", "sentence", "1 - cosine", "per sentence"

    def check(self, inputs: Any, what: str = "inputs") -> None:
        ids = getattr(inputs, "input_ids", None)
        mask = getattr(inputs, "attention_mask", None)
        if (not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor)
                or ids.ndim != 2 or ids.shape != mask.shape or ids.numel() == 0):
            raise ConfigError(f"{what} must be quept.eval.Sentences (token ids and attention "
                              f"mask, N x T each, N, T >= 1), got {_described(inputs)}")

    def size(self, inputs: Any) -> int:
        return inputs.input_ids.shape[0]

    def take(self, inputs: Any, start: int, stop: int) -> Any:
        return dataclasses.replace(inputs, input_ids=inputs.input_ids[start:stop],
                                   attention_mask=inputs.attention_mask[start:stop])

    def shape(self, inputs: Any) -> tuple[int, ...]:
        return tuple(inputs.input_ids.shape)

    def to_bytes(self, inputs: Any) -> bytes:
        return (super().to_bytes(inputs.input_ids) + b"|"
                + super().to_bytes(inputs.attention_mask))

    def output(self, model: nn.Module, batch: Any, *, grad: bool = False) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        if grad:
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        else:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(pooled.float(), dim=-1)

    def cost(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        return 0.5 * (out - ref).square().sum().item()

    def gradient(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return out - ref

    def probe(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(out.shape, generator=gen).to(out.device)


OBJECTIVES = {"causal-lm": NextTokenKL, "image-classification": ClassKL,
              "encoder": EmbeddingDistance}
BY_NAME = {cls.name: cls for cls in OBJECTIVES.values()}


def objective_for(model: nn.Module) -> Objective:
    """The objective of ``model``'s family's task."""
    from quept.models import family_for

    return OBJECTIVES[family_for(model).task]()


def checked_objective(model: nn.Module, inputs: Any, what: str = "inputs") -> Objective:
    """The objective of ``model`` once ``inputs`` are checked: of the shape it measures, and
    what the model runs on (its vocabulary, channels, image size or positions:
    :func:`quept.calib.capture.check_model_inputs`)."""
    from quept.calib.capture import check_model_inputs
    from quept.models import family_for

    objective = objective_for(model)
    objective.check(inputs, what)
    check_model_inputs(model, family_for(model), inputs, what)
    return objective


def cost_words(name: str) -> str:
    """What the costs of objective ``name`` are: "KL per token", "1 - cosine per sentence"."""
    cls = BY_NAME[name]
    return f"{cls.cost_name} per {cls.unit}"


def cost_number(name: str, value: float) -> str:
    """A cost to four decimals (next-token KL) or three significant digits (the small costs
    of image classifiers and encoders)."""
    return f"{value:.4f}" if name == NextTokenKL.name else f"{value:.3g}"


def cost_text(name: str, value: float) -> str:
    """A cost in words: "KL 0.3830 nats/token", "KL 0.000512 nats/image", "1 - cosine
    0.0123 per sentence"."""
    cls = BY_NAME[name]
    return f"{cls.cost_name} {cost_number(name, value)} {cls.per}"


def _described(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"a {inputs.dtype} tensor of shape {tuple(inputs.shape)}"
    return type(inputs).__name__
