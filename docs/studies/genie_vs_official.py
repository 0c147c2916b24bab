"""Our Genie-D against the official code (SamsungLabs/Genie 7b089d9, distill.py) on the same batch, float64.

    git --git-dir=<mirror of SamsungLabs/Genie> archive 7b089d9 | tar x -C OFFICIAL   (outside this repo)
    python docs/studies/genie_vs_official.py OFFICIAL MODEL.th ITERS [--no-swing]

Both start from one generator initialisation (the official module's weights copied into ours by name) and one
latent matrix (16 x 256); the official ``distill_data`` runs on the CPU (its .cuda() calls made no-ops, its
ReduceLROnPlateau ``verbose`` argument dropped for torch >= 2.7) and ours through ``optimize_latents`` with
``genie_loss_fn``. Swing shifts: both draw from numpy's global RNG, reseeded to 0, in the official order (column offset,
then row offset, per strided conv per forward), so both see the same shifts; ``--no-swing`` forces shift (1, 1)
in the official code and turns swing off in ours. Prints the relative difference of the two batches after ITERS
iterations (the batch of the last iteration, as the official code keeps it). Nothing of the official code is in
this repository: it is imported from OFFICIAL.
"""

import copy
import logging
import sys

import numpy as np
import torch

from dfq.fp32.models import build_model, load_state_dict
from dfq.generation import genie as ours
from dfq.generation.bn_stats import BNInputStats
from dfq.generation.generators import frozen

NAMES = {"fc": "linear", "bn0": "conv_layers.0", "conv1": "conv_layers.2", "bn1": "conv_layers.3"}
NAMES.update(conv2="conv_layers.6", out="conv_layers.8")
B = 16


def _model(path: str) -> torch.nn.Module:
    m = build_model("cifar_resnet20", 10)
    sd = torch.load(path, weights_only=True, map_location="cpu")
    sd = sd.get("state_dict", sd)
    return load_state_dict(m, {k.removeprefix("module."): v for k, v in sd.items()}, path).eval()


def _official(off, m, g_off, z0, iters: int, swing: bool) -> torch.Tensor:
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    plateau = off.optim.lr_scheduler.ReduceLROnPlateau

    class Plateau(plateau):
        def __init__(self, *a, verbose=None, **k):
            super().__init__(*a, **k)

    off.optim.lr_scheduler.ReduceLROnPlateau = Plateau
    if not swing:
        off.SwingConv2d.forward = lambda self, x: self.org_module(x)
    off.Generator = lambda latent_dim=256: copy.deepcopy(g_off)
    randn = torch.randn
    torch.randn = lambda *a, **k: z0.clone() if a[:2] == (B, 256) else randn(*a, **k)
    np.random.seed(0)
    try:
        return off.distill_data(m, B, B, iters=iters)
    finally:
        torch.randn = randn


def _ours(m, g, z0, iters: int, swing: bool) -> torch.Tensor:
    def hook(self, module, inputs):  # the official draw order: column offset, then row offset
        dx = np.random.randint(3)
        dy = np.random.randint(3)
        return (ours.swing(inputs[0], dy, dx), *inputs[1:])

    ours.Swing._hook = hook
    cfg = ours.GenieConfig(iterations=iters, swing=swing)
    moving = ours.swing_modules(m, False, (2, 3, 32, 32)) if swing else []
    np.random.seed(0)
    with frozen(m), ours.Swing(moving, None), BNInputStats(m) as stats:
        return ours.optimize_latents(g.train(), z0, ours.genie_loss_fn(m, stats, cfg), cfg)[0]


def main(official: str, weights: str, iters: str, *flags: str) -> None:
    sys.path.insert(0, official)
    import distill as off  # the official module, from OFFICIAL

    logging.basicConfig(level=logging.INFO, format="official: %(message)s")
    torch.set_default_dtype(torch.float64)
    m = _model(weights).double()
    torch.manual_seed(0)
    z0 = torch.randn(B, 256)
    g_off = off.Generator(image_size=32)
    g = ours.Generator((3, 32, 32))
    sd = g_off.state_dict()
    g.load_state_dict({k: sd[NAMES[k.split(".")[0]] + "." + k.split(".", 1)[1]] for k in g.state_dict()})
    swing = "--no-swing" not in flags
    x_ours = _ours(copy.deepcopy(m), g, z0, int(iters), swing)
    x_off = _official(off, m, g_off, z0, int(iters), swing)
    d = float((x_ours - x_off).norm() / x_off.norm())
    print(f"swing {swing}: batch after {iters} iterations, relative difference {d:.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
