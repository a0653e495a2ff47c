"""The methods the benchmark knows, as data: how each is run, labelled and counted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FLOAT = "float"


@dataclass(frozen=True)
class Method:
    """One row of the table.

    adapter: module under ``peers`` with ``quantize(model, tok, ids, job)``; None = float model.
    options: passed to the adapter in the job (e.g. AutoRound's iterations).
    calibrates: uses the calibration samples (else calibration-free).
    one_run: one run serves every width (QuEPT); otherwise one run per width.
    zero_bits: bits stored per zero-point; None = the code width (zero packed at b bits).
    library: PyPI distribution whose version is recorded (None = this project).
    in_plot: drawn in the PNG (a smoke test of the harness is not).
    """

    label: str
    adapter: str | None
    options: dict[str, Any] = field(default_factory=dict)
    calibrates: bool = False
    one_run: bool = False
    zero_bits: int | None = None
    library: str | None = None
    in_plot: bool = True


def _elastic(label: str, epochs: int, groups: list | None = None, ranks: list | None = None,
             lr_adapter: float = 1e-3, lr_groups: list | None = None,
             fixed_clip_bits: list | None = None, protect_outliers: float = 0.0,
             massive_ratio: float = 0.0, in_plot: bool = True, rounding: str = "nearest"
             ) -> Method:
    """A harness-calibrated QuEPT setting: the cpu-demo preset at adapter / clip rates
    ``lr_adapter`` / 0.1 for ``epochs`` passes, groups 7-8/5-6/4/3/2 and ranks 0,16,8,8,8 unless
    given, equal merge weights; ``lr_groups``: an adapter rate per group's slice instead;
    ``fixed_clip_bits``: widths whose searched clips are kept, not learned (default 7, 8);
    ``protect_outliers``: the spec's super-weight protection ratio (0 = off);
    ``massive_ratio``: the calibration's massive-activation loss term (0 = off);
    ``rounding``: "gptq" rounds each width by GPTQ on the calibration windows before it is
    evaluated (quept.round_gptq), as ``quept export --rounding gptq`` does."""
    groups = groups or [[7, 8], [5, 6], [4], [3], [2]]
    spec = {"bit_groups": groups, "ranks": ranks or [0, 16, 8, 8, 8],
            "merge_weights": [1 / len(groups)] * len(groups)}
    if fixed_clip_bits is not None:
        spec["fixed_clip_bits"] = fixed_clip_bits
    if protect_outliers:
        spec["protect_outliers"] = protect_outliers
    options = {"epochs": epochs, "lr_adapter": lr_adapter, "lr_clip": 0.1, "spec": spec}
    if lr_groups is not None:
        options["lr_adapter_groups"] = lr_groups
    if massive_ratio:
        options["massive_ratio"] = massive_ratio
    if rounding != "nearest":
        options["rounding"] = rounding
    return Method(label, "elastic", options, calibrates=True, one_run=True, in_plot=in_plot)


METHODS: dict[str, Method] = {
    FLOAT: Method("float", None),
    "rtn": Method("RTN (min/max)", "rtn"),
    # HQQ keeps its zero-point in floating point (fp16 when stored), not as an integer.
    "hqq": Method("HQQ", "hqq", zero_bits=16, library="hqq"),
    "gptq": Method("GPTQ (llmcompressor)", "gptq", calibrates=True, library="llmcompressor"),
    # AWQ as llmcompressor runs it: per-channel scales searched on the calibration activations,
    # then min/max group ranges ("awq"), or ranges shrunk to the lowest weight error by the MSE
    # observer ("awq-mse"; AutoAWQ's own clipping step, which minimises the output error on
    # the activations, is not in llmcompressor, and AutoAWQ itself is no longer maintained).
    "awq": Method("AWQ (llmcompressor)", "awq", calibrates=True, library="llmcompressor"),
    "awq-mse": Method("AWQ, MSE-searched ranges (llmcompressor)", "awq", {"observer": "mse"},
                      calibrates=True, library="llmcompressor"),
    "awq-smoke": Method("AWQ smoke test (4-point grid; not a result)", "awq", {"n_grid": 4},
                        calibrates=True, library="llmcompressor", in_plot=False),
    # AutoRound's recipes: "light" = 50 iterations at lr 5e-3, default = 200 (lr 1/iters).
    "autoround-light": Method("AutoRound light (50 iters)", "autoround",
                              {"iters": 50, "lr": 5e-3}, calibrates=True, library="auto-round"),
    "autoround": Method("AutoRound default (200 iters)", "autoround", {"iters": 200},
                        calibrates=True, library="auto-round"),
    "autoround-smoke": Method("AutoRound smoke test (2 iters, 2 samples; not a result)",
                              "autoround", {"iters": 2, "nsamples": 2}, calibrates=True,
                              library="auto-round", in_plot=False),
    "quept": Method("QuEPT (one model, all widths)", "elastic", calibrates=True, one_run=True),
    # The same method with a longer calibration: 4 passes over the samples at lower rates
    # (the cpu-demo preset is sized for 12 steps per block, this gives 64 with 32 samples),
    # and the 3-4 bit group split in two, so W4 and W3 each get an adapter slice of their own.
    # quept-long8/16: more passes (128 and 256 steps per block), everything else the same.
    "quept-long": _elastic("QuEPT, 4 epochs, groups 7-8/5-6/4/3/2 (one model, all widths)", 4),
    "quept-long8": _elastic("QuEPT, 8 epochs, groups 7-8/5-6/4/3/2 (one model, all widths)", 8),
    "quept-long16": _elastic("QuEPT, 16 epochs, groups 7-8/5-6/4/3/2 (one model, all widths)",
                             16),
    # The 16-epoch setting with wider adapters below 4 bits (the 3-bit group's own slice 8 -> 24,
    # the 2-bit group's 8 -> 96: prefixes 0/16/24/48/144); the cpu-long preset of `quept quantize`.
    "quept-long16-wide": _elastic("QuEPT, 16 epochs, ranks 0,16,8,24,96 (one model, all widths)",
                                  16, ranks=[0, 16, 8, 24, 96]),
    # The same at adapter rate 3e-3: the 2-bit group alone gains most from it (ablations below).
    "quept-long16-wide-lr3": _elastic(
        "QuEPT, 16 epochs, ranks 0,16,8,24,96, adapter rate 3e-3 (one model, all widths)", 16,
        ranks=[0, 16, 8, 24, 96], lr_adapter=3e-3),
    # Rates per adapter slice: the 4-6 bit slices at 1e-3 (where 3e-3 cost W4-W6 a little), the
    # slices only W3 and W2 use at 3e-3 (where it gained most). Stopped after 16 of 30 blocks
    # (2026-11-28): every group's block loss was above the single-rate 3e-3 run's (block 16:
    # 4-bit 0.512 against 0.485, 3-bit 0.793 against 0.755, 2-bit 1.297 against 1.055), since
    # W3 and W2 also use the slower lower slices (results/adapter_rates_stopped.json). Kept to
    # rerun, not a preset.
    "quept-long16-wide-rates": _elastic(
        "QuEPT, 16 epochs, ranks 0,16,8,24,96, adapter rates 1e-3 (4-6 bit slices) / 3e-3 "
        "(3 and 2 bit slices) (one model, all widths)", 16, ranks=[0, 16, 8, 24, 96],
        lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3]),
    # The cpu-long setting with the 6-bit clips kept at their searched values, not learned:
    # on quept-long16-wide-lr3, putting the searched 6-bit clips back under the learned
    # adapters took W6 from 25.42 to 25.15 (W5 went from 25.64 to 25.88 and W4 from 26.66 to
    # 27.70, so their clips stay learned). Run once (2026-11-28): W6 25.26, but W5 25.67, W4
    # 26.73, W3 31.42 and W2 51.90, the 2-bit stream's error jumping at block 13 as in the
    # per-slice rates run (results/block12_event.json). Not a preset.
    "quept-long16-wide-lr3-fix6": _elastic(
        "QuEPT, 16 epochs, ranks 0,16,8,24,96, adapter rate 3e-3, 6-8 bit clips searched "
        "(one model, all widths)", 16, ranks=[0, 16, 8, 24, 96], lr_adapter=3e-3,
        fixed_clip_bits=[6, 7, 8], in_plot=False),
    # The per-slice rates setting with super-weight protection: in the rates and fix6 runs the
    # 2-bit stream lost SmolLM2's massive activation at block 12 (token 0, channel 507: 27085 in
    # float, 2869 in the fix6 model's 2-bit stream), which is what the 2-bit error jump at block
    # 13 was (docs/pitfalls.md). Run once (2026-11-28/29): ties at W3-W8 (W4 26.615, W6 25.215),
    # but W2 51.39: holding the super weight's clip did not keep the value, which the 2-bit
    # attention and gate lose before the down projection. Not a preset.
    "quept-long16-wide-rates-sw": _elastic(
        "QuEPT, 16 epochs, ranks 0,16,8,24,96, adapter rates 1e-3 (4-6 bit slices) / 3e-3 "
        "(3 and 2 bit slices), super weights protected (one model, all widths)", 16,
        ranks=[0, 16, 8, 24, 96], lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3],
        protect_outliers=100.0),
    # The same with the massive-activation loss term (CalibConfig.massive_ratio 1000, slack
    # 0.5): the training loss also counts the relative error beyond one half of the float
    # output's massive elements, so a width that starts to lose the first token's value is
    # pulled back and the others train as before (results/replay_block12_massive.json). Run
    # once (2026-11-29): ties or wins at all six widths (W2 49.33, W3 31.02, W4 26.63) in
    # 5508 s; the cpu-long preset since.
    "quept-long16-wide-rates-massive": _elastic(
        "QuEPT, 16 epochs, ranks 0,16,8,24,96, adapter rates 1e-3 (4-6 bit slices) / 3e-3 "
        "(3 and 2 bit slices), super weights protected, massive-activation loss (one model, "
        "all widths)", 16, ranks=[0, 16, 8, 24, 96], lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3],
        protect_outliers=100.0, massive_ratio=1000.0),
    # The cpu-long setting with wider slices for the 4-6 bit widths (the 5-6 bit group's 16 -> 32,
    # the 4-bit group's own 8 -> 32: prefixes 0/32/64/88/184): on the built-in ViT, W4 trained
    # at rank 32 instead of 8 reached a 30% lower KL (docs/vision.md).
    "quept-long16-wider-rates-massive": _elastic(
        "QuEPT, 16 epochs, ranks 0,32,32,24,96, adapter rates 1e-3 (4-6 bit slices) / 3e-3 "
        "(3 and 2 bit slices), super weights protected, massive-activation loss (one model, "
        "all widths)", 16, ranks=[0, 32, 32, 24, 96], lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3],
        protect_outliers=100.0, massive_ratio=1000.0),
    # The cpu-long preset again once fake quantization ran in the fused kernel (2026-12-06):
    # the same settings; its calibration time on the kernel, and whether the figures hold.
    "quept-cpu-long-fused": _elastic(
        "QuEPT, the cpu-long preset again, fake quantization in the fused kernel (one model, "
        "all widths)", 16, ranks=[0, 16, 8, 24, 96], lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3],
        protect_outliers=100.0, massive_ratio=1000.0),
    # The cpu-long preset's model exported with GPTQ rounding on its learned grid (quept export
    # --rounding gptq, 2026-12-06), and the same folder with its own rounding beside it: both
    # rows reuse one calibration (--elastic), so they differ only in how the codes are chosen.
    "quept-cpu-long-nearest": _elastic(
        "QuEPT, the cpu-long preset, this machine's calibration, nearest rounding (one model, "
        "all widths)", 16, ranks=[0, 16, 8, 24, 96], lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3],
        protect_outliers=100.0, massive_ratio=1000.0),
    "quept-cpu-long-gptq": _elastic(
        "QuEPT, the cpu-long preset, this machine's calibration, GPTQ rounding at export (one "
        "model, GPTQ per width)", 16, ranks=[0, 16, 8, 24, 96],
        lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3], protect_outliers=100.0, massive_ratio=1000.0,
        rounding="gptq"),
    "quept-cpu-long-learned": _elastic(
        "QuEPT, the cpu-long preset, this machine's calibration, learned rounding at export "
        "(one model, rounding learned per width)", 16, ranks=[0, 16, 8, 24, 96],
        lr_groups=[1e-3, 1e-3, 1e-3, 3e-3, 3e-3], protect_outliers=100.0, massive_ratio=1000.0,
        rounding="learned"),
    # Ablations, not results for the table's question: the 2-bit group calibrated alone at a
    # large rank (no other width shares its adapter), to see what rank and rate do at W2.
    "ablation-w2-r136": _elastic("QuEPT ablation: 2-bit group alone, rank 136, 16 epochs", 16,
                                 groups=[[2]], ranks=[136], in_plot=False),
    "ablation-w2-r136-lr3": _elastic(
        "QuEPT ablation: 2-bit group alone, rank 136, 16 epochs, adapter rate 3e-3", 16,
        groups=[[2]], ranks=[136], lr_adapter=3e-3, in_plot=False),
}

# Weight+activation mode (benchmarks/peers.py --activations): every input quantized per token.
WA_SPEC = {"bit_groups": [[7, 8], [5, 6], [4]], "ranks": [0, 16, 8],
           "merge_weights": [0.3, 0.3, 0.4], "unclipped_bits": [7, 8],
           "activations": "per-token", "rotation": "hadamard"}
WA_METHODS: dict[str, Method] = {
    "rtn-wa": Method("RTN (llmcompressor, min/max)", "llmc_wa", library="llmcompressor"),
    "rtn-wa-rot": Method("RTN after QuaRot rotation (llmcompressor SpinQuantModifier)",
                         "llmc_wa", {"rotation": "spinquant"}, library="llmcompressor"),
    "gptq-wa": Method("GPTQ (llmcompressor)", "llmc_wa", {"gptq": True}, calibrates=True,
                      library="llmcompressor"),
    "gptq-wa-rot": Method("GPTQ after QuaRot rotation (llmcompressor SpinQuantModifier)",
                          "llmc_wa", {"gptq": True, "rotation": "spinquant"}, calibrates=True,
                          library="llmcompressor"),
    "quept-wa": Method("QuEPT, Hadamard-rotated (one model, all widths)", "elastic",
                       {"spec": WA_SPEC}, calibrates=True, one_run=True),
}
METHODS.update(WA_METHODS)

DEFAULT_METHODS = ("float", "rtn", "hqq", "gptq", "awq", "autoround-light", "autoround", "quept")


def method(name: str) -> Method:
    """The method called ``name``; KeyError names the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
