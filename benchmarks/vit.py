"""Top-1 accuracy of one elastic ViT (the built-in Fashion-MNIST ViT) at every width, against
round-to-nearest (RTN) at the same group size.

Run from the repository root (the ViT is trained once on first use, a few minutes on a CPU):

    pip install -e ".[hf]"
    python benchmarks/vit.py                        # 512 images, 1 epoch
    python benchmarks/vit.py --images 1024 --epochs 8
    python benchmarks/vit.py --images 1024 --preset cpu-long --epochs 16 --ranks 0,32,32,32,32

It calibrates once on a seeded draw of Fashion-MNIST training images (the six blocks' linears;
patch embedding, norms and classifier stay float), then measures top-1 on the whole test split
(10,000 images) for the float model and at each width, QuEPT and RTN, with the mean KL of the
class distribution to the float model's and the share of images whose predicted class is the
float model's. Writes a JSON file (default results/vit.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from peers.common import add_spec_args, quept_settings

import quept
from quept import data
from quept.cli.common import positive
from quept.config import CalibConfig, ElasticSpec, weight_act_spec


@torch.no_grad()
def logits(model: torch.nn.Module, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(pixel_values=pixels[i:i + batch]).logits
                      for i in range(0, len(pixels), batch)])


def logit_fidelity(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean KL(float || quantized) of the class distributions, and the share of images whose
    predicted class is the float model's."""
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    return {"kl": float(kl), "agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def add_config_args(p: argparse.ArgumentParser, images: int, epochs: int) -> None:
    """The options that choose QuEPT's spec and calibration (shared with vit_peers.py)."""
    p.add_argument("--images", type=positive, default=images, help=f"calibration images ({images})")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (32)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes per block ({epochs})")
    add_spec_args(p)


def quept_config(a: argparse.Namespace) -> tuple[ElasticSpec, CalibConfig]:
    """The spec and calibration settings the options describe."""
    return quept_settings(a, n_samples=a.images, batch_size=a.batch_size, epochs=a.epochs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(p, images=512, epochs=1)
    p.add_argument("--activations", choices=("none", "per-token", "per-tensor"), default="none",
                   help="weight+activation mode (W4A4..W8A8): per-token = dynamic, one scale "
                   "per token; per-tensor = static quantizers with learned steps after a "
                   "RepQ-ViT-style reparameterisation (RTN then keeps the searched steps)")
    p.add_argument("--no-reparam", action="store_true",
                   help="ablation, with --activations per-tensor: skip the reparameterisation "
                   "of the post-LayerNorm inputs (this run's model only)")
    p.add_argument("--out", default="results/vit.json", help="JSON output")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if a.no_reparam:
        from quept.models import reparam

        reparam.REPARAM_PAIRS.clear()
    folder = data.vit_model_dir()
    source = json.loads((folder / data.vit.SOURCE_FILE).read_text())
    model, _ = quept.load_model(folder)
    spec, calib = quept_config(a)
    if a.activations != "none":
        spec = weight_act_spec(spec, a.activations)
    act = spec.activations != "none"
    quept.prepare(model, spec, seed=calib.seed)
    images, _ = data.load_fashion_mnist("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(a.seed))[:a.images]
    t0 = time.perf_counter()
    quept.calibrate(model, data.pixel_values(images[pick]), calib, progress=True)
    calib_s = time.perf_counter() - t0
    test_images, test_labels = data.load_fashion_mnist("test")
    pixels = data.pixel_values(test_images)
    rows = quept.evaluate_accuracy(model, pixels, test_labels, [None, *sorted(spec.bits)],
                                   rtn=True)
    # Top-1 moves little on a small, robust classifier; the logits show the rest.
    float_logits = logits(model, pixels)
    fidelity = {}
    for b in sorted(spec.bits):
        for rtn in (False, True):
            quept.set_bits(model, b, rtn=rtn)
            fidelity[(b, rtn)] = logit_fidelity(logits(model, pixels), float_logits)
    quept.set_bits(model, None)

    print(f"\nFashion-MNIST ViT ({source['test_accuracy']:.2%} top-1 float when trained), one "
          f"elastic model (calibration {calib_s:.0f} s on {a.images} images, {a.epochs} "
          f"epoch(s)); top-1 on the {len(test_labels)} test images; group {a.group_size}\n")
    print("| width | stored bits/weight | top-1 QuEPT | top-1 RTN | KL to float QuEPT | "
          "KL to float RTN | same prediction QuEPT | same prediction RTN |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.bits is None:
            print(f"| float | 32 | {r.accuracy:.2%} | | | | | |")
            continue
        q, n = fidelity[(r.bits, False)], fidelity[(r.bits, True)]
        label = f"W{r.bits}A{r.bits}" if act else f"W{r.bits}"
        print(f"| {label} | {r.bits_per_weight:.3f} | {r.accuracy:.2%} | "
              f"{r.accuracy_rtn:.2%} | {q['kl']:.4f} | {n['kl']:.4f} | {q['agree']:.2%} | "
              f"{n['agree']:.2%} |")
    result = {"model": "the project's Fashion-MNIST ViT (quept.data.vit_model_dir)",
              "model_recipe": source,
              "eval": f"Fashion-MNIST test split, {len(test_labels)} images, top-1",
              "calibration": {"images": a.images, "batch_size": a.batch_size,
                              "epochs": a.epochs, "seed": a.seed, "seconds": calib_s,
                              "preset": a.preset, "settings": calib.to_dict()},
              "spec": spec.to_dict(), "reparameterised": not a.no_reparam,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "rows": [r.__dict__ for r in rows],
              "logit_fidelity": [{"bits": b, "rtn": rtn, **v}
                                 for (b, rtn), v in fidelity.items()]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from quept.cli import run_script

    sys.exit(run_script(main))
