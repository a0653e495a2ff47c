"""Per-architecture knowledge, kept as data plus one generic walker."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no family entry."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps its transformer blocks and which linears in a block are quantized.

    blocks: dotted path from the top model to the ``ModuleList`` of blocks. A ``*`` segment
        stands for every entry of the ``ModuleList`` before it, in order (the stages of a
        hierarchical model: ``"swin.encoder.layers.*.blocks"``); the blocks are then the
        concatenation of every stage's list, each known by its real dotted path.
    linears: dotted names of the quantized linears inside one block.
    task: "causal-lm" (next-token logits: perplexity, KL sensitivity, GGUF export),
        "encoder" (hidden states: embedding fidelity) or "image-classification" (top-1).
    auto_class: the ``transformers`` auto class that loads the family's models.
    input_name: the model's input argument ("input_ids" or "pixel_values").
    final_norm: dotted path of the norm before the output head, for LLaMA-family decoders that
        can be rotated (ElasticSpec.rotation); None where rotation is not supported.
    per_block_kwargs: capture every block's own call arguments (positional ones by name) from
        one sample, for blocks whose arguments differ (Swin: the grid size and window shift of
        each stage); False keeps the cheaper capture of block 0's keyword arguments, shared by
        every block.
    stage_exit: dotted name, inside a stage (the module a ``*`` in ``blocks`` stands for), of
        a module run on the hidden states after the stage's last block (Swin's patch merging);
        a stage where it is missing or None has none. It stays float: calibration applies it
        to the float and the quantized streams alike and never trains it.
    exit_args: names of the last block's captured arguments passed to ``stage_exit`` after the
        hidden states, in order.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    linears: tuple[str, ...]
    task: str = "causal-lm"
    auto_class: str = "AutoModelForCausalLM"
    input_name: str = "input_ids"
    final_norm: str | None = None
    per_block_kwargs: bool = False
    stage_exit: str | None = None
    exit_args: tuple[str, ...] = ()

    @property
    def is_causal_lm(self) -> bool:
        return self.task == "causal-lm"

    @property
    def is_text(self) -> bool:
        return self.input_name == "input_ids"

    def run(self, model: nn.Module, inputs: torch.Tensor) -> object:
        """The whole model on a batch of its inputs (token ids or pixel values), no KV cache."""
        extra = {"use_cache": False} if self.is_causal_lm else {}
        return model(**{self.input_name: inputs}, **extra)

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.auto_class)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """Every block, in order. With a ``*`` in ``blocks`` this is a new list holding the
        stages' blocks (assigning into it does not change the model)."""
        if "*" not in self.blocks:
            return model.get_submodule(self.blocks)
        return nn.ModuleList([b for _, blocks, _ in self._block_lists(model) for b in blocks])

    def block_paths(self, model: nn.Module) -> list[str]:
        """Each block's dotted path in ``model`` (``"vit.layers.3"``,
        ``"swin.encoder.layers.1.blocks.0"``); its linears are ``f"{path}.{linear}"``."""
        return [f"{p}.{j}" for p, blocks, _ in self._block_lists(model) for j in range(len(blocks))]

    def block_exit(self, model: nn.Module, index: int) -> nn.Module | None:
        """The ``stage_exit`` module run between block ``index`` and the next, or None."""
        if self.stage_exit is None:
            return None
        end = 0
        for _, blocks, stage in self._block_lists(model):
            end += len(blocks)
            if index == end - 1:
                return _submodule_or_none(stage, self.stage_exit)
            if index < end:
                return None
        raise IndexError(f"block {index} of a model with {end} {self.name} blocks")

    def call_exit(self, module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run a ``stage_exit`` module on ``hidden`` (B, T, C) given the stage's last block's
        captured arguments; returns the next stage's input (B, T', C')."""
        return module(hidden, *(kwargs[a] for a in self.exit_args))

    def _block_lists(self, model: nn.Module) -> list[tuple[str, nn.ModuleList, nn.Module]]:
        """(dotted path, block list, stage) per list of blocks; the stage is the module the
        last ``*`` stands for (the model itself without one)."""
        found: list[tuple[str, nn.Module, nn.Module]] = [("", model, model)]
        for part in self.blocks.split("."):
            nxt = []
            for prefix, mod, stage in found:
                if part == "*":
                    nxt += [(f"{prefix}{name}.", child, child)
                            for name, child in mod.named_children()]
                else:
                    nxt.append((f"{prefix}{part}.", mod.get_submodule(part), stage))
            found = nxt
        return [(prefix[:-1], mod, stage) for prefix, mod, stage in found]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {n: block.get_submodule(n) for n in self.linears}

    def call_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run one block on ``hidden`` (B, T, C) with the captured keyword arguments."""
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _submodule_or_none(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

_BERT_LINEARS = (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
)

_VIT_LINEARS = (
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
    "mlp.fc1", "mlp.fc2",
)

FAMILIES: tuple[Family, ...] = (
    # LLaMA 1/2/3, Mistral, Qwen2 and SmolLM share this decoder block.
    Family("llama-decoder", ("llama", "mistral", "qwen2"), "model.layers", _LLAMA_LINEARS,
           final_norm="model.norm"),
    # BERT-style encoders (BERT, MiniLM sentence encoders): the bare encoder, no task head.
    Family("bert-encoder", ("bert",), "encoder.layer", _BERT_LINEARS, task="encoder",
           auto_class="AutoModel"),
    # Vision transformers (ViT image classifiers; patch embedding and classifier stay float).
    Family("vit", ("vit",), "vit.layers", _VIT_LINEARS, task="image-classification",
           auto_class="AutoModelForImageClassification", input_name="pixel_values"),
    # DeiT (with or without its distillation head): ViT's blocks under another prefix.
    Family("deit", ("deit",), "deit.layers", _VIT_LINEARS, task="image-classification",
           auto_class="AutoModelForImageClassification", input_name="pixel_values"),
    # Swin: the stages' blocks in order. Each block gets its own stage's grid size and window
    # shift; a stage's patch merging (downsample: its `reduction` linear) stays float and is
    # applied to both calibration streams after the stage's last block.
    Family("swin", ("swin",), "swin.encoder.layers.*.blocks", _VIT_LINEARS,
           task="image-classification", auto_class="AutoModelForImageClassification",
           input_name="pixel_values", per_block_kwargs=True, stage_exit="downsample",
           exit_args=("input_dimensions",)),
    # The Qwen2 language model inside LLaVA-OneVision: only its decoder blocks are quantized;
    # the vision tower, projector, embeddings and lm_head stay float. Calibration is text-only
    # (the whole model run on input_ids, no pixel values): no image-conditioned calibration.
    Family("llava-ov-language", ("llava_onevision",), "model.language_model.layers",
           _LLAMA_LINEARS, auto_class="AutoModelForImageTextToText",
           final_norm="model.language_model.norm"),
)


def family_for(model: nn.Module) -> Family:
    """The family entry for a Hugging Face model, by ``config.model_type``."""
    return family_for_type(getattr(getattr(model, "config", None), "model_type", None))


def family_for_type(model_type: str | None) -> Family:
    """The family entry for a ``model_type`` string (as in a model's config.json)."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported model types: {supported}"
    )
