"""Calibration-data generators: Gaussian noise, ZeroQ-style BN-statistic matching, DSG, real subsets.

Every batch is made from its own seed, derived from (seed, global batch index), so a batch never
depends on which process made it or on which batches were made before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Callable, Iterator, Literal, Optional

import torch
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass
from torch import nn
from tqdm import tqdm

from dfq.generation.bn_stats import BNInputStats
from dfq.generation.losses import dsg_loss, lse_weights, sda_margins, zeroq_loss

INITS = ("gaussian", "uniform", "zeroq_uniform")
PROBES = ("gaussian", "uniform", "init")
_CONFIG = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


@dataclass(config=_CONFIG, frozen=True)
class ZeroQConfig:
    """ZeroQ (Cai et al. 2020): per-sample BN-statistic matching by Adam on the pixels, plateau-decayed lr."""

    method: Optional[Literal["zeroq"]] = None
    iterations: int = Field(500, gt=0)
    lr: float = Field(0.5, gt=0)
    patience: int = Field(100, ge=0)  # ReduceLROnPlateau on the loss
    min_lr: float = Field(1e-4, ge=0)
    init: str = "gaussian"  # gaussian | uniform | zeroq_uniform (the official ZeroQ code's tiny uniform init)

    @field_validator("init")
    @classmethod
    def _known_init(cls, v: str) -> str:
        return _one_of(v, INITS, "init")


@dataclass(config=_CONFIG, frozen=True)
class DSGTerms:
    """DSG's two ingredients on a BN-statistic loss: slack margins (SDA) and layerwise sample enhancement (LSE)
    (shared by dsg and genie_dsg)."""

    sda: bool = True  # slack distribution alignment: dead-zone loss inside per-layer margins
    eps: float = Field(0.9, ge=0, le=1)  # margins: eps-quantile of |stat(probe) - BN running stat|
    per_channel: bool = False  # one margin per channel instead of per layer
    margin_probe: str = "gaussian"  # the probe batch: gaussian | uniform | init (the batch's own start)
    lse: bool = True
    lse_weight: float = Field(2.0, ge=1)  # 2: the paper's X = I + 1 1^T; 4: the official code
    lse_tied: Optional[int] = Field(None, gt=0)  # None: sample j tied to layer j mod L; N: samples j < N only

    @field_validator("margin_probe")
    @classmethod
    def _known_probe(cls, v: str) -> str:
        return _one_of(v, PROBES, "margin_probe")


@dataclass(config=_CONFIG, frozen=True)
class DSGConfig(ZeroQConfig, DSGTerms):
    """DSG (Zhang, Qin et al. 2021): ZeroQ's optimisation with slack margins (SDA) and layerwise sample
    enhancement (LSE), plus the official code's extras; SDA, LSE and every extra off is ZeroQ exactly."""

    method: Optional[Literal["dsg"]] = None
    label_weight: float = Field(0.0, ge=0)  # cross-entropy to seeded random labels
    tv_weight: float = Field(0.0, ge=0)  # L2 total variation of the jittered batch
    l2_weight: float = Field(0.0, ge=0)  # mean per-image L2 norm of the jittered batch
    jitter: int = Field(0, ge=0)  # priors see the batch rolled by a random offset in [-jitter, jitter) px
    unbiased_std: bool = False  # per-sample variance: population (BN's) or unbiased (the code's torch.var)


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for batch ``batch_index`` of a dataset generated with ``seed``."""
    digest = hashlib.sha256(f"dfq:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    """Split ``num_images`` into batches of ``batch_size`` (the last one may be smaller)."""
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def init_images(init: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Starting pixels in the normalised input space: ``gaussian`` N(0, 1) (the papers), ``uniform``
    U[0, 1) (the official DSG code's torch.rand) or ``zeroq_uniform`` (the official ZeroQ code's)."""
    if init == "gaussian":
        return torch.randn(shape, generator=generator)
    if init == "uniform":
        return torch.rand(shape, generator=generator)
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


LossFn = Callable[[torch.Tensor, BNInputStats, torch.Tensor], torch.Tensor]  # (images, BN stats, logits)


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

    Args:
        model: the FP32 model, frozen (eval mode, no weight gradients) while the pixels are optimised.
        x0: starting images (B, C, H, W) in the normalised input space; a copy is optimised, ``x0`` is unchanged.
        loss_fn: (images, BN input stats of the forward pass, logits) -> scalar loss.
        iterations: number of Adam steps.
        lr: Adam's initial learning rate.
        patience: ReduceLROnPlateau patience: steps without a lower loss before the lr is cut.
        min_lr: the floor of the plateau schedule's learning rate.
        desc: progress-bar label, also named in the error of a non-finite loss.
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
            loss = loss_fn(x, stats, model(x))
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
            loss_end = loss_fn(x, stats, model(x)).item()
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
    cfg: ZeroQConfig = ZeroQConfig(),
    device: str | torch.device = "cpu",
    desc: str = "zeroq",
) -> tuple[torch.Tensor, dict]:
    """One ZeroQ batch: BN-statistic matching of per-sample statistics plus the image prior, no labels.

    Args:
        model: the FP32 model whose BN statistics the images match.
        shape: (B, C, H, W) of the batch.
        seed: the batch's seed (``batch_seed``): draws the starting pixels.
        cfg: iterations, lr, patience, min_lr and init (gaussian | uniform | zeroq_uniform) of the optimisation.
        device: where the optimisation runs; the images come back on the CPU.
        desc: progress-bar label.
    """
    x0 = init_images(cfg.init, shape, torch.Generator().manual_seed(seed)).to(device)
    x, info = optimize_images(
        model, x0, zeroq_loss, iterations=cfg.iterations, lr=cfg.lr, patience=cfg.patience, min_lr=cfg.min_lr, desc=desc
    )
    return x.cpu(), info


def probe_seed(seed: int) -> int:
    """Seed of the random probe that sets a batch's SDA margins (distinct from the init's seed)."""
    return seed ^ 0x5DEECE66D


def extras_seed(seed: int) -> int:
    """Seed of a DSG batch's random labels and jitter offsets (distinct from the init's and the probe's)."""
    return seed ^ 0x2545F4914F6CDD1D


def margin_probe(probe: str, shape: tuple[int, ...], seed: int, x0: torch.Tensor | None = None) -> torch.Tensor:
    """The batch whose statistics set the SDA margins: a seeded ``gaussian`` N(0, 1) or ``uniform``
    U[0, 1) probe of the batch's shape, or ``init``: the batch's own starting pixels ``x0``."""
    if probe == "init":
        if x0 is None:
            raise ValueError("margin_probe=init needs the batch's starting pixels")
        return x0
    g = torch.Generator().manual_seed(probe_seed(seed))
    if probe == "gaussian":
        return torch.randn(shape, generator=g)
    if probe == "uniform":
        return torch.rand(shape, generator=g)
    raise ValueError(f"margin_probe={probe!r} is unknown; allowed: {', '.join(PROBES)}")


@torch.no_grad()
def compute_margins(
    model: nn.Module,
    shape: tuple[int, ...],
    seed: int,
    eps: float,
    per_channel: bool,
    device="cpu",
    probe: str = "gaussian",
    x0: torch.Tensor | None = None,
    unbiased_std: bool = False,
):
    """SDA margins: the eps-quantile of |stat - BN stat| over one forward pass of the probe batch.

    Args:
        model: the FP32 model whose BN layers' running statistics the probe is compared with.
        shape: (B, C, H, W) of the probe batch (gaussian and uniform probes).
        seed: the batch's seed; a gaussian or uniform probe is drawn with ``probe_seed(seed)``.
        eps: quantile in [0, 1] of |stat - BN running stat| that sets each margin.
        per_channel: one margin per channel (True) or one per layer (False).
        device: where the probe's forward pass runs.
        probe: gaussian (N(0, 1)) | uniform (U[0, 1)) | init (the batch's starting pixels ``x0``).
        x0: the batch's starting pixels; required for probe init, else unused.
        unbiased_std: per-sample stds from the unbiased variance instead of the population one (BN's).
    """
    x = margin_probe(probe, shape, seed, x0).to(device)
    with frozen(model), BNInputStats(model).to(device) as stats:
        model(x)
        return sda_margins(stats, eps, per_channel, unbiased_std)


def _dsg_loss_fn(cfg: DSGConfig, margins, weights, g: torch.Generator) -> LossFn:
    """DSG's loss of one batch as ``optimize_images`` calls it: the random labels drawn once (at the first call,
    from the model's class count) and a new jitter offset per call, both from the batch's extras generator."""
    labels = []

    def loss_fn(x, stats, logits):
        if cfg.label_weight and not labels:  # drawn once per batch, uniformly over the model's classes
            labels.append(torch.randint(logits.shape[1], (len(x),), generator=g).to(logits.device))
        offset = int(torch.randint(-cfg.jitter, cfg.jitter, (1,), generator=g)) if cfg.jitter else 0
        extras = dict(label_weight=cfg.label_weight, tv_weight=cfg.tv_weight, l2_weight=cfg.l2_weight)
        extras.update(labels=labels[0] if labels else None, offset=offset, unbiased_std=cfg.unbiased_std)
        return dsg_loss(x, stats, margins, weights, logits, **extras)

    return loss_fn


def dsg_batch(
    model: nn.Module,
    shape: tuple[int, ...],
    seed: int,
    cfg: DSGConfig = DSGConfig(),
    device: str | torch.device = "cpu",
    desc: str = "dsg",
) -> tuple[torch.Tensor, dict, dict | None]:
    """One DSG batch. With ``sda`` the BN-statistic match is slack (dead zone of width given by the
    eps-quantile margins of the ``margin_probe`` batch); with ``lse`` a sample's loss at its tied BN layer
    counts ``lse_weight`` times (every sample j at layer j mod L, or with ``lse_tied`` = N only samples
    j < N, at layer j). The official code's extras: cross-entropy to seeded uniformly random labels
    (``label_weight``), L2 total variation and per-image L2 norm of the batch rolled by a random offset in
    [-jitter, jitter) (``tv_weight``, ``l2_weight``), unbiased per-sample variances (``unbiased_std``).
    SDA, LSE and every extra off is ZeroQ exactly. Returns (images, info, margins or None).

    Args:
        model: the FP32 model whose BN statistics the images match.
        shape: (B, C, H, W) of the batch.
        seed: the batch's seed: the starting pixels; the probe (``probe_seed``) and the labels and jitter offsets
            (``extras_seed``) use seeds derived from it.
        cfg: ZeroQ's optimisation fields plus sda, eps, per_channel, margin_probe, lse, lse_weight, lse_tied and the
            extras (label_weight, tv_weight, l2_weight, jitter, unbiased_std).
        device: where the optimisation runs; images and margins come back on the CPU.
        desc: progress-bar label.
    """
    num_layers = len(BNInputStats(model))
    x0 = init_images(cfg.init, shape, torch.Generator().manual_seed(seed)).to(device)
    margins = None
    if cfg.sda:
        probe, unbiased = cfg.margin_probe, cfg.unbiased_std
        margins = compute_margins(model, shape, seed, cfg.eps, cfg.per_channel, device, probe, x0, unbiased)
    weights = lse_weights(shape[0], num_layers, cfg.lse_weight, cfg.lse_tied).to(device) if cfg.lse else None
    loss_fn = _dsg_loss_fn(cfg, margins, weights, torch.Generator().manual_seed(extras_seed(seed)))
    x, info = optimize_images(
        model, x0, loss_fn, iterations=cfg.iterations, lr=cfg.lr, patience=cfg.patience, min_lr=cfg.min_lr, desc=desc
    )
    saved = None
    if margins is not None:
        mean, std = [m.cpu() for m in margins[0]], [g.cpu() for g in margins[1]]
        saved = {"mean": mean, "std": std, "eps": cfg.eps, "per_channel": cfg.per_channel, "probe": cfg.margin_probe}
    return x.cpu(), info, saved
