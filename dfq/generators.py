"""Calibration-data generators: Gaussian noise and ZeroQ-style BN-statistic matching.

Every batch is made from its own seed, derived from (seed, global batch index), so a batch never
depends on which process made it or on which batches were made before it.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from dfq.bn_stats import BNInputStats
from dfq.losses import zeroq_loss

INITS = ("gaussian", "zeroq_uniform")


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for batch ``batch_index`` of a dataset generated with ``seed``."""
    digest = hashlib.sha256(f"dfq:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    """Split ``num_images`` into batches of ``batch_size`` (the last one may be smaller)."""
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def init_images(init: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Starting pixels: ``gaussian`` N(0, 1) (the papers) or ``zeroq_uniform`` (official ZeroQ code)."""
    if init == "gaussian":
        return torch.randn(shape, generator=generator)
    if init == "zeroq_uniform":
        return (torch.randint(0, 255, shape, generator=generator).float() - 127.5) / 5418.75
    raise ValueError(f"init={init!r} is unknown; allowed: {', '.join(INITS)}")


def gaussian_batch(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Plain N(0, 1) noise in the model's normalised input space (no optimisation)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no weight gradients: generation only needs gradients with respect to the input."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


LossFn = Callable[[torch.Tensor, BNInputStats], torch.Tensor]


def optimize_images(
    model: nn.Module,
    x0: torch.Tensor,
    loss_fn: LossFn,
    *,
    iterations: int,
    lr: float,
    patience: int,
    min_lr: float,
    desc: str = "generate",
) -> tuple[torch.Tensor, dict]:
    """Optimise the pixels of ``x0`` with Adam to minimise ``loss_fn`` under a plateau LR schedule.

    Returns the images and {"loss_start", "loss_end", "iterations", "seconds", "seconds_per_iter"}.
    A NaN or infinite loss stops with an error naming the iteration.
    """
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=patience, min_lr=min_lr)
    loss_start = None
    t0 = time.perf_counter()
    with frozen(model), BNInputStats(model).to(x.device) as stats:
        bar = tqdm(range(iterations), desc=desc, leave=False)
        for it in bar:
            opt.zero_grad(set_to_none=True)
            model(x)
            loss = loss_fn(x, stats)
            value = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {value} at iteration {it}; nothing was saved")
            if loss_start is None:
                loss_start = value
            loss.backward()
            opt.step()
            sched.step(value)
            if it % 25 == 0:
                bar.set_postfix(loss=f"{value:.4g}", lr=f"{opt.param_groups[0]['lr']:.2g}")
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            model(x)
            loss_end = loss_fn(x, stats).item()
    return x.detach(), {
        "loss_start": loss_start,
        "loss_end": loss_end,
        "iterations": iterations,
        "seconds": seconds,
        "seconds_per_iter": seconds / max(iterations, 1),
    }


def zeroq_batch(
    model: nn.Module,
    shape: tuple[int, ...],
    seed: int,
    *,
    iterations: int = 500,
    lr: float = 0.5,
    patience: int = 100,
    min_lr: float = 1e-4,
    init: str = "gaussian",
    device: str | torch.device = "cpu",
    desc: str = "zeroq",
) -> tuple[torch.Tensor, dict]:
    """One ZeroQ batch: BN-statistic matching of per-sample statistics plus the image prior, no labels."""
    x0 = init_images(init, shape, torch.Generator().manual_seed(seed)).to(device)
    x, info = optimize_images(
        model, x0, zeroq_loss, iterations=iterations, lr=lr, patience=patience, min_lr=min_lr, desc=desc
    )
    return x.cpu(), info
