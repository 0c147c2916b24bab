"""Wall time per image-iteration of every optimising source on one model and batch, beside the frozen floor.

`python -m bench.genie_timing [ARCH] [BATCH] [ITERS] [DEVICE]` (defaults: cifar_resnet20 57 30 cpu). Each source
makes one batch of ITERS iterations through the library (``generate_batch``, the generate stage's call) in rounds
(the sources interleaved, the fastest round kept, so a load change hits every source alike); the floor is one
forward + backward to the input with the weights frozen, what any statistic-matching generator must pay. Prints
ms per image-iteration and the ratio to the floor. Weights are random: the time does not depend on them.
"""

from __future__ import annotations

import sys

import torch

from bench.timing import fwd_bwd_floor
from dfq.fp32.models import build_model
from dfq.generation.sources import generate_batch, source_config

SOURCES = {
    "zeroq": ("zeroq", {}),
    "dsg": ("dsg", {}),
    "genie": ("genie", {}),
    "genie (pixels)": ("genie", {"generator": False}),
    "genie (no swing)": ("genie", {"swing": False}),
    "genie_dsg": ("genie_dsg", {"method": "genie_dsg"}),
}


def main(arch: str = "cifar_resnet20", batch: int = 57, iters: int = 30, device: str = "cpu", rounds: int = 3) -> None:
    torch.manual_seed(0)
    channels, size = (1, 28) if arch == "fmnist_resnet" else (3, 224 if not arch.startswith("cifar") else 32)
    model = build_model(arch, 10).to(device).eval()
    shape = (batch, channels, size, size)
    best = {name: float("inf") for name in SOURCES}
    for r in range(rounds):
        for name, (method, extra) in SOURCES.items():
            cfg = source_config(method, {"iterations": iters, **extra})
            _, info, _ = generate_batch(method, model, shape, r, cfg, device, desc=name)
            best[name] = min(best[name], info["seconds_per_iter"])
    floor = fwd_bwd_floor(model, torch.randn(shape, device=device), False, iters, device)
    print(f"{arch}, batch {batch}, {device}, {torch.get_num_threads()} threads; fastest of {rounds} rounds")
    print("| source | ms per image-iteration | x frozen floor |\n|---|---|---|")
    print(f"| frozen fwd+bwd floor | {floor / batch * 1e3:.3f} | 1.00 |")
    for name, t in best.items():
        print(f"| {name} | {t / batch * 1e3:.3f} | {t / floor:.2f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:1] + [int(a) for a in args[1:3]] + args[3:4]))
