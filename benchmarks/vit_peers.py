"""The built-in ViT against peers: one elastic QuEPT model against GPTQ (llmcompressor) and HQQ
run once per width, and round-to-nearest, on the same images, widths and group size.

Run from the repository root in an environment with the peers' libraries (the same one as
benchmarks/peers.py):

    python3 -m venv --system-site-packages ../peers-venv
    ../peers-venv/bin/pip install "torch==2.13.0" hqq llmcompressor
    ../peers-venv/bin/python benchmarks/vit_peers.py --images 1024 --epochs 8
    ../peers-venv/bin/python benchmarks/vit_peers.py --preset cpu-long --epochs 16 \\
        --ranks 0,32,32,32,32 --out results/vit_peers_long.json

Every method quantizes the six linears of each block (query, key, value, attention output,
intermediate, output) with asymmetric integer weights in groups of --group-size inputs; the
patch embedding, norms and classifier stay float.

- QuEPT: one calibration (the benchmarks/vit.py recipe: --images training images drawn with
  --seed, --epochs passes per block, the spec and rates of --preset, with --bit-groups and
  --ranks if given), then every width from the one model.
- RTN: min/max rounding per group (the elastic model's own RTN path, no clips, no adapters).
- HQQ: the ``hqq`` package's ``HQQLinear`` (calibration-free), dequantized back in place.
- GPTQ: ``llmcompressor.oneshot`` with a ``GPTQModifier`` (its defaults: block 128, dampening
  0.01), fed the same calibration images through a DataLoader; weights quantized in forward.

Each method's levels are checked (at most 2^b distinct values per group). On the whole test
split (10,000 images): top-1, the mean KL of the class distribution to the float model's and
the share of images whose predicted class is the float model's. Writes a JSON file (default
results/vit_peers.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import quept
from quept import data

sys.path.insert(0, str(Path(__file__).parent))
from peers.common import quept_label  # noqa: E402
from peers.single import compare, machine, print_tables  # noqa: E402
from vit import add_config_args, logit_fidelity, logits, quept_config  # noqa: E402


def gptq(model: torch.nn.Module, bits: int, group_size: int, pixels: torch.Tensor
         ) -> torch.nn.Module:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from torch.utils.data import DataLoader
    from transformers import ViTImageProcessor

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                               group_size=group_size)
    recipe = GPTQModifier(config_groups={"weights": QuantizationScheme(targets=["Linear"],
                                                                       weights=weights)},
                          ignore=["classifier"])
    loader = DataLoader(list(pixels), batch_size=16,
                        collate_fn=lambda batch: {"pixel_values": torch.stack(batch)})
    # The processor is only there because oneshot asks for one; the loader gives pixel values.
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(pixels),
            processor=ViTImageProcessor())
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(p, images=1024, epochs=8)
    p.add_argument("--bits", default="2,3,4", help="widths, comma-separated")
    p.add_argument("--out", default="results/vit_peers.json")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    widths = [int(b) for b in a.bits.split(",")]

    folder = data.vit_model_dir()
    source = json.loads((folder / data.vit.SOURCE_FILE).read_text())
    base, _ = quept.load_model(folder)
    images, _ = data.load_fashion_mnist("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(a.seed))[:a.images]
    calib_pixels = data.pixel_values(images[pick])
    test_images, test_labels = data.load_fashion_mnist("test")
    pixels = data.pixel_values(test_images)
    ref = logits(base, pixels)

    def score(model: torch.nn.Module) -> dict[str, float]:
        got = logits(model, pixels)
        return {"top1": float((got.argmax(-1) == test_labels).float().mean()),
                **logit_fidelity(got, ref)}

    spec, calib = quept_config(a)
    rows, calib_s = compare(base, spec, calib, calib_pixels, widths, quept_label(spec), score,
                            gptq=lambda model, b: gptq(model, b, a.group_size, calib_pixels))
    float_top1 = float((ref.argmax(-1) == test_labels).float().mean())
    rows.insert(0, {"method": "float", "bits": None, "top1": float_top1})

    print(f"\nFashion-MNIST ViT ({float_top1:.2%} top-1 float), group {a.group_size}; QuEPT "
          f"calibrated once ({calib_s:.0f} s, {a.images} images, {a.epochs} epochs); "
          f"{len(test_labels):,} test images\n")
    print_tables(rows, widths, (("kl", "KL to float (lower is better)", "{:.5f}"),
                                ("agree", "same prediction as float", "{:.2%}"),
                                ("top1", "top-1", "{:.2%}")))
    result = {"model": "the project's Fashion-MNIST ViT (quept.data.vit_model_dir)",
              "model_recipe": source, "group_size": a.group_size,
              "eval": f"Fashion-MNIST test split, {len(test_labels)} images",
              "calibration": {"images": a.images, "seed": a.seed, "quept_epochs": a.epochs,
                              "quept_batch_size": a.batch_size, "quept_seconds": calib_s,
                              "quept_spec": spec.to_dict(), "quept_settings": calib.to_dict()},
              "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
