"""Calibration-data generators: Gaussian noise and ZeroQ-style BN-statistic matching.

Every batch is made from its own seed, derived from (seed, global batch index), so a batch never
depends on which process made it or on which batches were made before it.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from dfq.bn_stats import BNInputStats
from dfq.losses import dsg_loss, lse_weights, sda_margins, zeroq_loss

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
    opt = torch.optim.Adam([x], lr=lr, fused=True if x.is_cuda else None)  # one kernel per step on a GPU
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
            if not math.isfinite(value):  # the float: no second device sync
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


def probe_seed(seed: int) -> int:
    """Seed of the Gaussian probe that sets a batch's SDA margins (distinct from the init's seed)."""
    return seed ^ 0x5DEECE66D


@torch.no_grad()
def compute_margins(model: nn.Module, shape: tuple[int, ...], seed: int, eps: float, per_channel: bool, device="cpu"):
    """SDA margins from one forward pass of a seeded N(0, 1) probe of the batch's shape."""
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(probe_seed(seed))).to(device)
    with frozen(model), BNInputStats(model).to(device) as stats:
        model(probe)
        return sda_margins(stats, eps, per_channel)


def dsg_batch(
    model: nn.Module,
    shape: tuple[int, ...],
    seed: int,
    *,
    iterations: int = 500,
    lr: float = 0.5,
    patience: int = 100,
    min_lr: float = 1e-4,
    init: str = "gaussian",
    sda: bool = True,
    eps: float = 0.9,
    per_channel: bool = False,
    lse: bool = True,
    lse_weight: float = 2.0,
    device: str | torch.device = "cpu",
    desc: str = "dsg",
) -> tuple[torch.Tensor, dict, dict | None]:
    """One DSG batch. With ``sda`` the BN-statistic match is slack (dead zone of width given by the
    margins); with ``lse`` sample j's loss at BN layer j mod L counts ``lse_weight`` times. Both off is
    ZeroQ exactly. Returns (images, info, margins or None)."""
    num_layers = len(BNInputStats(model))
    margins = compute_margins(model, shape, seed, eps, per_channel, device) if sda else None
    weights = lse_weights(shape[0], num_layers, lse_weight).to(device) if lse else None

    def loss_fn(x, stats):
        return dsg_loss(x, stats, margins, weights)

    x0 = init_images(init, shape, torch.Generator().manual_seed(seed)).to(device)
    x, info = optimize_images(
        model, x0, loss_fn, iterations=iterations, lr=lr, patience=patience, min_lr=min_lr, desc=desc
    )
    saved = None
    if margins is not None:
        saved = {"mean": [m.cpu() for m in margins[0]], "std": [g.cpu() for g in margins[1]],
                 "eps": eps, "per_channel": per_channel}
    return x.cpu(), info, saved


SOURCES = ("gaussian", "zeroq", "dsg", "real")


def method_of(source: str, cfg: dict) -> str:
    """A source's generation method: its params group's ``method`` key, else its own name."""
    method = cfg.get("method", source)
    if method not in SOURCES:
        raise ValueError(f"generate.{source}.method={method!r} is unknown; allowed: {', '.join(SOURCES)}")
    return method


def plan_batches(source: str, num_images: int, batch_size: int, cfg: dict, num_bn: int) -> tuple[list[int], str]:
    """Batch sizes for a source and a note when the count had to change.

    DSG ties sample j to BN layer j mod L, so its batches hold a whole multiple of L samples
    (``batch_multiple`` x L) and the image count is rounded up to whole batches.
    """
    if method_of(source, cfg) != "dsg":
        return batch_sizes(num_images, batch_size), ""
    size = num_bn * int(cfg.get("batch_multiple", 1))
    n = -(-num_images // size)
    note = ""
    if n * size != num_images:
        note = (f"{source}: batches must hold {size} images ({cfg.get('batch_multiple', 1)} x {num_bn} BN layers); "
                f"data.num_images={num_images} rounded up to {n * size}")
    return [size] * n, note


def generate_batch(source: str, model: nn.Module, shape: tuple[int, ...], seed: int, cfg: dict,
                   device="cpu", desc: str = "") -> tuple[torch.Tensor, dict, dict | None]:
    """One batch of a synthetic source: (images, info, extras to save beside it or None)."""
    method = method_of(source, cfg)
    cfg = {k: v for k, v in cfg.items() if k != "method"}
    if method == "gaussian":
        return gaussian_batch(shape, seed), {}, None
    if method == "zeroq":
        x, info = zeroq_batch(model, shape, seed, device=device, desc=desc, **cfg)
        return x, info, None
    if method == "dsg":
        kw = {k: v for k, v in cfg.items() if k != "batch_multiple"}
        return dsg_batch(model, shape, seed, device=device, desc=desc, **kw)
    raise ValueError(f"generate source {source!r}: method {method!r} makes no synthetic batches here")
