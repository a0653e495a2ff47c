"""Replay one block's calibration exactly, from a calibrated elastic folder.

Calibration is deterministic given its inputs, but one block's outcome can hang on the order in
which its samples and widths were drawn (a 2-bit run can lose the first token's massive
activation at one block in one calibration and keep it in another). To study such a block
without recalibrating the blocks before it, this script rebuilds what that block saw: the
folder's trained blocks before it carry the float stream and every bit group's quantized
stream, and the calibrator's random generator is advanced through the same calls the earlier
blocks made (sample order, width draws, stream draws), without their training. The block itself
starts from a freshly prepared copy of the base model (the same seed, so the same adapter init)
and is calibrated again with the folder's settings, or with ``--protect-outliers`` changed.
It prints the block's loss per bit group before and after training (the numbers the
calibration log shows for that block) and the first token's largest value in float and at the
lowest width. The calibration samples are the folder's settings over the built-in calibration
text (what ``quept quantize`` and ``benchmarks/peers.py`` use by default) or ``--text``.
Thread count matters for bit-exactness: use the calibration's (2 on this project's CPU runs).
``--draw-seed N`` trains the block on the same inputs from the same init in another draw order.

    python benchmarks/replay_block.py --elastic FOLDER --block 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import quept
from quept import data
from quept.calib.capture import capture_block_inputs
from quept.calib.loop import BlockCalibrator, train_schedule
from quept.config import QuEPTConfig
from quept.models.families import family_for
from quept.nn import set_bits


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elastic", required=True, help="calibrated elastic folder")
    p.add_argument("--block", type=int, required=True, help="block to replay, 1-based")
    p.add_argument("--text", nargs="*", default=None,
                   help="calibration text files (default: the built-in calibration text)")
    p.add_argument("--protect-outliers", type=float, default=None,
                   help="replay with this super-weight ratio instead of the folder's")
    p.add_argument("--massive-ratio", type=float, default=None,
                   help="replay with this CalibConfig.massive_ratio instead of the folder's")
    p.add_argument("--massive-slack", type=float, default=None,
                   help="replay with this CalibConfig.massive_slack instead of the folder's")
    p.add_argument("--draw-seed", type=int, default=None,
                   help="reseed the generator just before the block's training: the same "
                   "inputs and init, another order of samples and widths")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def replay(folder: str, block: int, text: list[str] | None = None,
           protect_outliers: float | None = None, draw_seed: int | None = None,
           massive_ratio: float | None = None, massive_slack: float | None = None) -> dict:
    meta = quept.read_meta(folder)
    cfg = QuEPTConfig.from_dict(meta["config"])
    spec, calib = cfg.spec, cfg.calib
    if protect_outliers is not None:
        spec = replace(spec, protect_outliers=protect_outliers)
    if massive_ratio is not None:
        calib = replace(calib, massive_ratio=massive_ratio)
    if massive_slack is not None:
        calib = replace(calib, massive_slack=massive_slack)
    trained, tok = quept.load(folder)
    fam = family_for(trained)
    blocks = fam.get_blocks(trained)
    if not 1 <= block <= len(blocks):
        raise SystemExit(f"--block must be 1..{len(blocks)}, got {block}")
    raw = data.load_texts(text) if text else data.calibration_text()
    ids = quept.samples_from_text(tok, raw, calib)
    x0, kwargs = capture_block_inputs(trained, fam, ids, calib.batch_size)
    fresh, _ = quept.load_model(meta["base_model"])
    quept.prepare(fresh, spec, seed=calib.seed)
    cal = BlockCalibrator(fresh, fam, spec, calib, kwargs, None, progress=False)
    gen = torch.Generator().manual_seed(calib.seed)
    x_fp, x_q = x0, [x0] * len(spec.bit_groups)
    for i in range(block - 1):  # what calibration did before this block, from trained blocks
        set_bits(blocks[i], None)
        y_fp = cal._run(blocks[i], x_fp)
        for _step in train_schedule(calib, spec, ids.shape[0], gen):  # draws, no compute
            pass
        x_q = cal._propagate(blocks[i], x_q, gen)
        x_fp = y_fp
    target = fam.get_blocks(fresh)[block - 1]
    t0 = time.perf_counter()
    y_fp = cal._float_pass(target, x_fp, block - 1)
    before = cal._probe(target, x_q, y_fp)
    if draw_seed is not None:
        gen.manual_seed(draw_seed)
    cal._train(block - 1, target, x_q, y_fp, gen, tqdm(disable=True))
    after = cal._probe(target, x_q, y_fp)
    low = min(spec.bits)
    set_bits(target, low)
    y_low = cal._run(target, x_q[-1])
    set_bits(target, None)
    return {"folder": Path(folder).name, "block": block,
            "bits": [min(g) for g in spec.bit_groups], "loss_before": before,
            "loss_after": after, "protect_outliers": spec.protect_outliers,
            "draw_seed": draw_seed, "massive_ratio": calib.massive_ratio,
            "massive_slack": calib.massive_slack,
            "token0_max_float": y_fp[:, 0].abs().max().item(),
            f"token0_max_w{low}": y_low[:, 0].abs().max().item(),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    r = replay(a.elastic, a.block, a.text, a.protect_outliers, a.draw_seed, a.massive_ratio,
               a.massive_slack)
    fmt = lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"  # noqa: E731
    print(f"{r['folder']} block {r['block']}: loss at {r['bits']} bits: {fmt(r['loss_before'])}"
          f" -> {fmt(r['loss_after'])}")
    low = min(r["bits"])
    print(f"first token's largest value: float {r['token0_max_float']:.0f}, "
          f"W{low} {r[f'token0_max_w{low}']:.0f} ({r['seconds']:.0f} s)")
    if a.json:
        r["command"] = " ".join(["python", "benchmarks/replay_block.py", *sys.argv[1:]])
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
