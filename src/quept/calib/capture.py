"""Capture the inputs of block 0 (hidden states and the keyword arguments blocks receive; for
families that need it, every block's own arguments), and the per-channel input statistics the
activation-aware clip search weights its error by."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from quept.config import ConfigError
from quept.models import Family
from quept.ops.hadamard import hadamard_transform


class _Captured(Exception):
    pass


FIXED_SIZE_FAMILIES = ("vit", "deit")  # one learned position embedding per patch of one size


def check_model_inputs(model: nn.Module, family: Family, inputs: object,
                       what: str = "calibration inputs") -> None:
    """``inputs`` must be what ``family`` runs on: for a text model (N, T) int64 or int32 token
    ids within the vocabulary (for an encoder also within its positions, or
    :class:`quept.eval.Sentences` whose attention mask keeps a token of every sentence); for
    an image classifier (N, C, H, W) finite float pixel values with the model's channels (and,
    for ViT and DeiT, its image size)."""
    from quept.eval.embedding import Sentences

    cfg = getattr(model, "config", None)
    if not family.is_text:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else None
        if shape is None or len(shape) != 4 or not inputs.is_floating_point() or 0 in shape:
            got = (f"{inputs.dtype} of shape {shape}" if shape is not None
                   else type(inputs).__name__)
            raise ConfigError(f"{what} must be (N, C, H, W) float pixel values with N >= 1 for "
                              f"an image classifier, got {got}")
        channels = getattr(cfg, "num_channels", None)
        if channels is not None and shape[1] != channels:
            raise ConfigError(f"{what} have {shape[1]} channels; the model takes {channels}")
        size = getattr(cfg, "image_size", None)
        if family.name in FIXED_SIZE_FAMILIES and size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if shape[2:] != size:
                raise ConfigError(f"{what} are {shape[2]}x{shape[3]}; the model takes "
                                  f"{size[0]}x{size[1]} images")
        _check_finite(inputs, what)
        return
    if family.task == "encoder" and isinstance(inputs, Sentences):
        ids, mask = inputs.input_ids, inputs.attention_mask
        if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor) or (
                mask.shape != ids.shape):
            raise ConfigError(f"{what}: the attention mask and the token ids must be tensors "
                              "of one shape (N, T)")
        if ids.dim() == 2 and 0 not in ids.shape and not mask.any(1).all():
            raise ConfigError(f"{what}: sentence {int((~mask.any(1)).nonzero()[0])} has no "
                              "token (its attention mask is all 0)")
        inputs = ids
    if not isinstance(inputs, torch.Tensor):
        raise ConfigError(f"{what} must be a torch.Tensor, got {type(inputs).__name__}")
    shape = tuple(inputs.shape)
    if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32) or 0 in shape:
        raise ConfigError(f"{what} must be (N, T) integer token ids (int64 or int32) with "
                          f"N, T >= 1, got {inputs.dtype} of shape {shape}")
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is not None and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
        raise ConfigError(f"{what} hold token ids from {int(inputs.min())} to "
                          f"{int(inputs.max())}; the model's vocabulary is 0..{vocab - 1}")
    for name in PLACEHOLDER_TOKENS:
        token = getattr(cfg, name, None)
        at = (inputs == token).nonzero() if isinstance(token, int) else ()
        if len(at):
            n, t = (int(i) for i in at[0])
            raise ConfigError(
                f"{what} hold the {name.split('_')[0]} placeholder token {token} (first in "
                f"sample {n}, position {t}): text-only inputs feed no {name.split('_')[0]} for "
                "the model to put there; take it out of the text (its tokenizer makes it of "
                f"{name.split('_')[0]} markers such as '<{name.split('_')[0]}>')")
    positions = context_length(model)
    if positions is not None and shape[1] > positions:
        if family.task == "encoder":
            raise ConfigError(f"{what} are {shape[1]} tokens long; the model has {positions} "
                              "positions")
        raise ConfigError(f"{what} are {shape[1]} tokens long, past the model's context of "
                          f"{positions} tokens (max_position_embeddings), where what it computes "
                          f"is not what it was trained for; use windows of at most {positions} "
                          "tokens (--seq-len, --eval-seq-len)")


def _check_finite(pixels: torch.Tensor, what: str) -> None:
    """Refuse pixel values holding NaN or inf: the model would run on them and every measure
    taken from its outputs (a loss, an accuracy) would be meaningless."""
    bad = int((~torch.isfinite(pixels)).sum())
    if bad:
        raise ConfigError(f"{what} hold {bad} non-finite values (NaN or inf) of "
                          f"{pixels.numel()}; pixel values must all be finite numbers")


PLACEHOLDER_TOKENS = ("image_token_index", "image_token_id", "video_token_index",
                      "video_token_id")
"""The config fields of a vision-language model naming the tokens its processor replaces by
image or video features: text alone must not hold them."""


def context_length(model: nn.Module) -> int | None:
    """The longest token sequence a text model was made for (its language model's
    ``max_position_embeddings``), or None when its config does not say."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    positions = getattr(text, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, family: Family, input_ids: torch.Tensor, batch_size: int, device: str = "cpu"
) -> tuple[torch.Tensor, dict | list[dict]]:
    """Run the model up to block 0 and return its inputs.

    input_ids: (N, T) token ids, or (N, C, H, W) pixel values for a vision family. Returns
    (hidden (N, T, C) float32 on CPU, kwargs) where kwargs are the extra block arguments
    (rotary embeddings, mask, positions) captured for a batch of one sample; they broadcast
    over any batch size. With ``family.per_block_kwargs`` kwargs is a list holding each block's
    own arguments (:func:`capture_each_block_kwargs`), else one dict shared by every block.
    """
    check_model_inputs(model, family, input_ids)
    blocks = family.get_blocks(model)
    store: dict = {}

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store["hidden"] = hidden
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    outs = []
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                family.run(model, input_ids[i : i + batch_size].to(device))
            except _Captured:
                pass
            outs.append(store["hidden"].float().cpu())
        try:
            family.run(model, input_ids[:1].to(device))
        except _Captured:
            pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in store["kwargs"].items() if k not in ("cache", "past_key_values")}
    if family.is_causal_lm:
        kwargs["use_cache"] = False
    if family.per_block_kwargs:
        return torch.cat(outs), capture_each_block_kwargs(model, family, input_ids[:1], device)
    return torch.cat(outs), kwargs


@torch.no_grad()
def capture_each_block_kwargs(
    model: nn.Module, family: Family, sample: torch.Tensor, device: str = "cpu"
) -> list[dict]:
    """Every block's call arguments but its hidden states, positional ones by name, from one
    forward pass of the whole model on ``sample`` (one input, (1, T) or (1, C, H, W))."""
    blocks = family.get_blocks(model)
    store: dict[int, dict] = {}

    def hook(i: int):
        def fn(block: nn.Module, args: tuple, kwargs: dict) -> None:
            store[i] = _named_arguments(block, args, kwargs)
        return fn

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        family.run(model, sample.to(device))
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(blocks)) if i not in store]
    if missing:
        raise RuntimeError(f"{family.name}: blocks {missing} did not run on a sample input")
    return [store[i] for i in range(len(blocks))]


def _named_arguments(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A block call's arguments other than the hidden states (its first), all by name."""
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache",
                                                          "past_key_values")}
    if len(args) <= 1:
        return rest
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(block.forward).parameters.values()
             if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"{type(block).__name__} takes {len(names)} positional arguments but "
                        f"was called with {len(args)}")
    return {**dict(zip(names[1:], args[1:])), **rest}


def block_kwargs_on(kwargs: dict | list[dict], device: str | torch.device
                    ) -> Callable[[int], dict]:
    """Block ``i``'s arguments on ``device`` (floats in float32), from the kwargs
    :func:`capture_block_inputs` returned: one shared dict, moved once, or each block's own,
    moved when that block asks."""
    if isinstance(kwargs, list):
        return lambda i: move_kwargs(kwargs[i], device, torch.float32)
    shared = move_kwargs(kwargs, device, torch.float32)
    return lambda i: shared


def move_kwargs(kwargs: dict, device: str | torch.device, dtype: torch.dtype) -> dict:
    """Move tensors (also inside tuples) of captured block kwargs to ``device``; floats to dtype."""

    def mv(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if isinstance(v, tuple):
            return tuple(mv(x) for x in v)
        return v

    return {k: mv(v) for k, v in kwargs.items()}


@contextmanager
def watch_inputs(layers: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None],
                 rotate: bool = True) -> Iterator[None]:
    """While active, call ``fn(name, x)`` with every input a layer gets, as float
    (tokens, in_features); with ``rotate``, as the layer's weight reads it (Hadamard-rotated
    where the layer rotates its input online)."""
    def hook(name: str):
        def pre(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if rotate and getattr(m, "in_rotation", False):
                x = hadamard_transform(x)
            fn(name, x)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def mean_sq_inputs(
    layers: Mapping[str, nn.Module], amax: dict[str, torch.Tensor] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, record each layer's squared input per input channel; on exit the yielded
    dict holds, per layer name, the mean over every token the layer saw (in_features,).
    ``amax``, if given, is filled with each layer's largest absolute input per channel."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def record(name: str, x: torch.Tensor) -> None:
        sums[name] = x.pow(2).sum(0) + sums.get(name, 0)
        counts[name] += x.shape[0]
        if amax is not None:
            top = x.abs().amax(0)
            amax[name] = torch.maximum(amax[name], top) if name in amax else top

    with watch_inputs(layers, record):
        yield sums
    for n in list(sums):
        sums[n] = sums[n] / counts[n]
