"""ElasticLinear: one linear layer that runs at any width of its spec (DESIGN 2.1, 2.2)."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from quept.checks import check_bits
from quept.config import ElasticSpec
from quept.ops import (
    dequantize,
    fake_quant,
    fake_quant_act,
    fake_quant_static,
    n_groups,
    quantize,
    rtn,
    search_act_range,
    search_clip,
)
from quept.ops.hadamard import hadamard_transform

# Clip factors tried by the clip search at up to 4 bits; the largest is < 1 so the logit stays
# finite (and its gradient alive). Widths above 4 bits never want much clipping: they try whole
# quantization steps of it, 1 - k / (2**bits - 1), down to HIGH_BITS_FLOOR (clip_grid).
CLIP_GRID = (0.999, 0.975, 0.95, 0.925, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
HIGH_BITS_FLOOR = 0.9
# Logit of the clip factor of an unclipped width: sigmoid(20) is exactly 1.0 in float32.
NO_CLIP_LOGIT = 20.0


def clip_grid(bits: int) -> tuple[float, ...]:
    """Clip factors the search tries at ``bits``: :data:`CLIP_GRID` up to 4 bits; above, no
    clipping and whole quantization steps of it down to :data:`HIGH_BITS_FLOOR` (a fraction of
    a step only moves the grid, and at 7-8 bits the coarse grid's 2.5% is several steps)."""
    if bits <= 4:
        return CLIP_GRID
    qmax = 2**bits - 1
    return tuple(1 - k / qmax for k in range(int((1 - HIGH_BITS_FLOOR) * qmax) + 1))


class ElasticLinear(nn.Module):
    """A frozen float linear plus cascaded low-rank adapters and per-bit clip logits.

    ``bits = None`` runs the float layer (the full-precision reference: no adapter). At a width
    ``b`` of group ``g`` the weight is ``Q_b(W + U[:, :r_g] V[:r_g])`` with clip factors
    ``sigmoid(clip_hi[b])`` / ``sigmoid(clip_lo[b])`` per row or group. ``rtn = True`` gives plain
    round-to-nearest at ``b`` (no adapter, no clipping), the baseline. In weight+activation
    mode (``spec.activations``) the input is quantized per token at ``b`` too, RTN included.
    """

    def __init__(
        self, linear: nn.Linear, spec: ElasticSpec, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.spec = spec
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        dev, dt = self.weight.device, self.weight.dtype
        max_rank = min(self.in_features, self.out_features)
        self.rank_prefix = tuple(min(spec.rank_prefix(g), max_rank) for g in range(len(spec.ranks)))
        r = self.rank_prefix[-1]
        self.lora_u = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        self.lora_v = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_v, a=math.sqrt(5), generator=generator)
        self.clip_hi = nn.ParameterDict()
        self.clip_lo = nn.ParameterDict()
        for b in spec.bits:
            shape = (self.out_features, n_groups(self.in_features, spec.group_size_for(b)))
            init = NO_CLIP_LOGIT if b in spec.unclipped_bits else spec.clip_init
            self.clip_hi[str(b)] = nn.Parameter(torch.full(shape, init, device=dev, dtype=dt))
            self.clip_lo[str(b)] = nn.Parameter(torch.full(shape, init, device=dev, dtype=dt))
        self.bits: int | None = None
        self.rtn = False
        self._cache: tuple[tuple, list[weakref.ref], torch.Tensor] | None = None
        self.protected: list[tuple[int, int]] = []  # super weights (row, col): protect_outliers
        # Codes chosen by export-time rounding (quept.export.gptq) per width: (codes, scale,
        # zero) that replace round-to-nearest at that width; never saved with the folder.
        self.rounded: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # The weight reads a Hadamard-rotated input (ElasticSpec.rotation): forward rotates x.
        self.in_rotation = False
        # The output is a key or value a KV cache holds (ElasticSpec.kv_bits): (bits, head_dim,
        # Hadamard-rotated heads), quantized per token and head by the attention (after the
        # rotary embedding, quept.nn.kv) whenever this layer is quantized.
        self.kv_quant: tuple[int, int, bool] | None = None
        if spec.activations == "per-tensor":
            self._init_static_act(spec, dev, dt)

    def _init_static_act(self, spec: ElasticSpec, dev: torch.device, dt: torch.dtype) -> None:
        """State of the static activation quantizers and the input reparameterisation."""
        # per width: the learned log-step; the searched (log-step, zero-point), NaN until the
        # search (init_act_by_search) has run: the RTN baseline's quantizer and the start.
        self.act_log_step = nn.ParameterDict(
            {str(b): nn.Parameter(torch.zeros((), device=dev, dtype=dt), requires_grad=False)
             for b in spec.bits})
        self.register_buffer("act_searched", torch.full((len(spec.bits), 2), float("nan"),
                                                        device=dev, dtype=dt))
        self._act_index = {b: i for i, b in enumerate(spec.bits)}
        # The input is (x + in_shift) / in_scale per channel: a reparameterisation folded into
        # the norm before and into this weight and bias (quept.models.reparam); identity here.
        self.register_buffer("in_scale", torch.ones(self.in_features, device=dev, dtype=dt))
        self.register_buffer("in_shift", torch.zeros(self.in_features, device=dev, dtype=dt))
        self.reparam_folded = False

    @torch.no_grad()
    def init_act_by_search(self, sample: torch.Tensor) -> None:
        """Set every width's static input quantizer (learned and searched copies) from a sample
        of this layer's inputs (percentile search, :func:`quept.ops.search_act_range`)."""
        found = search_act_range(sample, list(self._act_index))
        for b, i in self._act_index.items():
            step, zero = found[b]
            self.act_searched[i] = torch.tensor([math.log(step), zero])
            self.act_log_step[str(b)].fill_(math.log(step))

    def static_act_params(self, bits: int, rtn: bool = False) -> tuple[torch.Tensor, float]:
        """(step, zero-point) of the static input quantizer at ``bits``; ``rtn`` = searched."""
        log_step, zero = self.act_searched[self._act_index[bits]]
        if torch.isnan(zero):
            raise RuntimeError("the static activation quantizers of this layer have no range "
                               "yet: calibrate the model (or call init_act_by_search) first")
        return (log_step if rtn else self.act_log_step[str(bits)]).exp(), zero.item()

    @torch.no_grad()
    def fold_input_reparam(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Take inputs ``(x + shift) / scale`` in place of ``x`` with the same output: bias
        ``b - W shift``, weight ``W diag(scale)``; only on an unreparameterised layer."""
        if self.reparam_folded:
            raise RuntimeError("this layer's input reparameterisation is already folded in")
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.weight.dtype,
                                                 device=self.weight.device), requires_grad=False)
        self.bias.sub_(self.weight @ shift.to(self.weight))
        self.weight.mul_(scale.to(self.weight))
        self.in_scale.copy_(scale)
        self.in_shift.copy_(shift)
        self.reparam_folded = True
        self._cache = None

    @torch.no_grad()
    def init_clip_by_search(self, bits: int, col_weight: torch.Tensor | None = None) -> None:
        """Set the max and min clip logits of ``bits`` to the grid factors with least
        (input-weighted) quantization error, refined apart ``spec.clip_refine`` rounds;
        ``col_weight`` (in,) is e.g. the mean squared input per channel."""
        grid = torch.tensor(clip_grid(bits), dtype=self.weight.dtype)
        if col_weight is not None:
            col_weight = col_weight.to(self.weight.device, self.weight.dtype)
        factors = search_clip(
            self.weight, bits, self.spec.group_size_for(bits), grid, col_weight,
            self.spec.clip_refine,
        )
        # A learned clip must keep a gradient (sigmoid saturates at exactly 1), so it starts
        # just below 1; a fixed one keeps "no clip" exactly.
        for logits, alpha in zip((self.clip_hi, self.clip_lo), factors):
            logit = torch.logit(alpha.clamp(max=CLIP_GRID[0]))
            if bits not in self.spec.learned_clip_bits:
                logit = torch.where(alpha >= 1, NO_CLIP_LOGIT, logit)
            logits[str(bits)].copy_(logit)

    @torch.no_grad()
    def find_super_weights(self, in_amax: torch.Tensor, ratio: float) -> list[tuple[int, int]]:
        """Weights whose contribution ``|W[r, j]| * in_amax[j]`` (``in_amax``: largest absolute
        input per channel) is the largest of their row and above ``ratio`` times the median
        row's largest: the few that make a massive activation, as (row, col)."""
        contrib = self.weight.float().abs() * in_amax.to(self.weight.device).float()[None, :]
        row_max, col = contrib.max(dim=1)
        rows = (row_max > ratio * row_max.median()).nonzero().flatten().tolist()
        return [(r, int(col[r])) for r in rows]

    @torch.no_grad()
    def hold_protected_clips(self) -> None:
        """Set the clip of every protected weight's group, on the weight's side (max for a
        positive weight, min for a negative one), to "no clip" at every clipped width."""
        for b in self.spec.bits:
            if b in self.spec.unclipped_bits:
                continue
            gs = self.spec.group_size_for(b)
            for r, j in self.protected:
                side = self.clip_hi if self.weight[r, j] > 0 else self.clip_lo
                side[str(b)][r, j // gs if gs else 0] = NO_CLIP_LOGIT
        self._cache = None

    def set_bits(self, bits: int | None, rtn: bool = False) -> None:
        """Switch to width ``bits`` (None = float). O(1): nothing is recomputed here."""
        if bits is not None:
            bits = check_bits(bits, self.spec.bits)
        self.bits, self.rtn = bits, rtn

    def delta(self, bits: int) -> torch.Tensor:
        """Adapter delta ``U[:, :r] V[:r]`` of the group holding ``bits`` (out, in)."""
        r = self.rank_prefix[self.spec.group_of(bits)]
        return self.lora_u[:, :r] @ self.lora_v[:r]

    def clip_factors(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.clip_hi[str(bits)]), torch.sigmoid(self.clip_lo[str(bits)])

    def quantized_weight(self, bits: int, rtn_only: bool = False) -> torch.Tensor:
        """The fake-quantized weight at ``bits`` (differentiable w.r.t. adapters and clips;
        a width holding export-time codes in ``rounded`` gives those, with no gradient)."""
        gs = self.spec.group_size_for(bits)
        if rtn_only:
            return rtn(self.weight, bits, gs)
        if bits in self.rounded:
            return dequantize(*self._rounded(bits), gs).to(self.weight.dtype)
        return fake_quant(self.weight + self.delta(bits), bits, gs, *self.clip_factors(bits))

    def quantized_codes(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapter folded in: uint8 codes (out, in), scale and zero (out, G) at ``bits`` (the
        export-time codes in ``rounded`` where that width has them)."""
        if bits in self.rounded:
            return self._rounded(bits)
        with torch.no_grad():
            w = self.weight + self.delta(bits)
            return quantize(w, bits, self.spec.group_size_for(bits), *self.clip_factors(bits))

    def _rounded(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The export-time codes, scale and zero at ``bits``, on the weight's device."""
        return tuple(t.to(self.weight.device) for t in self.rounded[bits])

    def _sources(self) -> list[torch.Tensor]:
        """The tensors the quantized weight at the current width is made from."""
        b = str(self.bits)
        tensors = [self.weight, self.lora_u, self.lora_v]
        if b in self.clip_hi:
            tensors += [self.clip_hi[b], self.clip_lo[b]]
        return tensors

    def current_weight(self) -> torch.Tensor:
        """Weight used by ``forward`` now; cached while no gradient is being recorded. The
        cache is made anew when the width changes or any tensor it was made from is replaced
        (``load_state_dict(..., assign=True)``), edited in place, moved or cast."""
        if self.bits is None:
            return self.weight
        if torch.is_grad_enabled():
            self._cache = None
            return self.quantized_weight(self.bits, self.rtn)
        sources = self._sources()
        key = (self.bits, self.rtn, id(self.rounded.get(self.bits)),
               *((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
        cached = self._cache
        if (cached is None or cached[0] != key
                or any(ref() is not t for ref, t in zip(cached[1], sources))):
            cached = (key, [weakref.ref(t) for t in sources],
                      self.quantized_weight(self.bits, self.rtn))
            self._cache = cached
        return cached[2]

    def clear_cache(self) -> None:
        self._cache = None

    @property
    def act_bits(self) -> int | None:
        """Width the input is quantized to now (weight+activation mode), else None."""
        return self.bits if self.spec.activations != "none" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_rotation:
            x = hadamard_transform(x)
        if self.act_bits is not None:
            if self.spec.activations == "per-token":
                x = fake_quant_act(x, self.act_bits)
            else:
                x = fake_quant_static(x, *self.static_act_params(self.act_bits, self.rtn),
                                      self.act_bits)
        w = self.current_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(adapter parameters, learnable clip logits); unclipped and fixed widths have none."""
        learn = [str(b) for b in self.spec.learned_clip_bits]
        return [self.lora_u, self.lora_v], [d[b] for d in (self.clip_hi, self.clip_lo) for b in learn]

    def act_parameters(self) -> list[nn.Parameter]:
        """The learned log-steps of the static activation quantizers (none in other modes)."""
        return list(self.act_log_step.values()) if hasattr(self, "act_log_step") else []

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, ranks={self.rank_prefix}, "
            f"bits={self.bits}{' (rtn)' if self.rtn else ''}"
            + (f", kv_bits={self.kv_quant[0]}" if self.kv_quant else "")
        )
