"""Genie-D (Jeon, Lee, Kim, CVPR 2023): images made by a small generator fed one learnable latent per image.

Per batch a freshly initialised generator and a latent matrix z (B, latent_dim) are optimised together (two
Adam optimisers: latents with a plateau schedule, generator with an exponential one) so that the BN-input
statistics of the frozen FP32 model match its running statistics, while every strided convolution of the
model sees its input shifted by -1, 0 or +1 pixel per axis ("swing convolution", reflect padding), a new
shift per call. The official code's loss uses BATCH statistics over (N, H, W), unbiased stds and
sigma = sqrt(running_var + 1e-6), each layer's squared errors averaged over its channels, plus a per-image
input prior (channel mean 0, std 1).

Every ingredient is a param (``GenieConfig``): the generator can be replaced by optimising pixels, swing
turned off or extended to strided parameter-free shortcuts, the batch statistics replaced by ZeroQ's
per-sample ones. ``genie_dsg`` (``GenieDSGConfig``) keeps Genie's generator, latents, swing and schedules
and optimises DSG's loss instead (per-sample statistics with slack margins and layerwise sample
enhancement; LSE weighs samples, so it needs per-sample statistics). Every random draw (generator init,
latents, swing shifts) comes from the batch's seed: batches are byte-reproducible on one device and do not
depend on process order. The official code seeds nothing and names its two lrs the other way round; the
params here are named by role with the values that actually run there (latents 0.1, generator 0.01).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn
from tqdm import tqdm

from dfq.generation.bn_stats import STD_EPS, BNInputStats
from dfq.generation.generators import DSGTerms, compute_margins, frozen
from dfq.generation.losses import dsg_loss, lse_weights, zeroq_loss
from dfq.tracing import bn_layers

_CONFIG = ConfigDict(extra="forbid")


@dataclass(config=_CONFIG, frozen=True)
class GenieCore:
    """What Genie-D and genie_dsg share: the generator, the latents, swing and the two optimisers' schedules."""

    iterations: int = Field(500, gt=0)  # per batch
    generator: bool = True  # False: optimise the pixels themselves (the paper's ablation), with the latents' lr
    latent_dim: int = Field(256, gt=0)
    width: int = Field(128, gt=0)  # channels after the generator's linear layer (then width // 2)
    lr_latent: float = Field(0.1, gt=0)  # Adam on the latents (or the pixels); the code's "lr_g"
    patience: int = Field(100, ge=0)  # the latents' ReduceLROnPlateau on the loss
    min_lr: float = Field(1e-4, ge=0)
    lr_generator: float = Field(0.01, gt=0)  # Adam on the generator's weights; the code's "lr_z"
    gamma: float = Field(0.95, gt=0, le=1)  # the generator's lr x gamma ...
    gamma_every: int = Field(100, gt=0)  # ... every this many iterations
    swing: bool = True  # shift the input of every strided conv by a random -1/0/+1 px per axis
    swing_shortcuts: bool = False  # also shift strided parameter-free shortcuts (CIFAR option A); code: no


@dataclass(config=_CONFIG, frozen=True)
class GenieConfig(GenieCore):
    """Genie-D, the official code's recipe except the iteration count (code: 4000 per batch of 128)."""

    method: Optional[Literal["genie"]] = None
    statistics: Literal["batch", "sample"] = "batch"  # batch: Genie's loss; sample: ZeroQ's per-sample loss
    std_eps: float = Field(1e-6, ge=0)  # sigma = sqrt(running_var + std_eps) in the batch loss (not BN's eps)


@dataclass(config=_CONFIG, frozen=True)
class GenieDSGConfig(GenieCore, DSGTerms):
    """Genie's generator, latents, swing and schedules optimising DSG's loss: per-sample statistics with slack
    margins (sda, eps, per_channel, margin_probe: gaussian | uniform | init = the first generator output) and
    layerwise sample enhancement (lse, lse_weight, lse_tied). DSG's loss is per-sample (LSE weighs samples), so
    there is no ``statistics`` and no ``std_eps`` (Genie's batch loss only)."""

    method: Optional[Literal["genie_dsg"]] = None


class Generator(nn.Module):
    """Genie's generator: Linear(latent -> width x H/4 x W/4), BN, x2 up, conv 3x3 -> width/2, BN, LeakyReLU 0.2,
    up to H x W, conv 3x3 -> C, tanh, BN without affine (in train mode: every output channel has batch mean 0 and
    variance 1, the model's normalised input space). Sizes not divisible by 4 start from ceil(H/4)."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int = 256, width: int = 128):
        super().__init__()
        c, h, w = shape
        self.start = (math.ceil(h / 4), math.ceil(w / 4))
        self.middle = (math.ceil(h / 2), math.ceil(w / 2))
        self.size = (h, w)
        self.width = width
        self.fc = nn.Linear(latent_dim, width * self.start[0] * self.start[1])
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width // 2, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, c, 3, 1, 1)
        self.out = nn.BatchNorm2d(c, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(len(z), self.width, *self.start))
        x = F.leaky_relu(self.bn1(self.conv1(F.interpolate(x, size=self.middle))), 0.2)
        return self.out(torch.tanh(self.conv2(F.interpolate(x, size=self.size))))


def swing(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x translated by (dy - 1, dx - 1) pixels, dy, dx in {0, 1, 2}: reflect-padded by 1 and cropped back to its
    size from (dy, dx); (1, 1) is x itself."""
    h, w = x.shape[2:]
    return F.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, dy : dy + h, dx : dx + w]


def _subsampling_shortcuts(model: nn.Module, shape: tuple[int, ...], device) -> list[nn.Module]:
    """Parameter-free leaf modules other than pooling whose output is spatially smaller than their input
    (CIFAR ResNets' option-A shortcuts), found by one probe forward."""
    found, handles = [], []
    for m in model.modules():
        pooling = isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
        if next(m.children(), None) is None and next(m.parameters(), None) is None and not pooling:
            handles.append(m.register_forward_hook(lambda mod, a, out: found.append(mod) if _smaller(a, out) else None))
    try:
        with torch.no_grad(), frozen(model):
            model(torch.zeros(2, *shape[1:], device=device))
    finally:
        for h in handles:
            h.remove()
    return list({id(m): m for m in found}.values())


def _smaller(inputs, out) -> bool:
    a = inputs[0] if inputs else None
    return (
        isinstance(a, torch.Tensor) and isinstance(out, torch.Tensor) and a.dim() == 4 and out.dim() == 4
    ) and out.shape[2:].numel() < a.shape[2:].numel()


def swing_modules(model: nn.Module, shortcuts: bool, shape: tuple[int, ...], device="cpu") -> list[nn.Module]:
    """The modules whose input swings: every Conv2d with a stride other than 1 (the code's rule), plus with
    ``shortcuts`` the strided parameter-free shortcuts."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)]
    return convs + (_subsampling_shortcuts(model, shape, device) if shortcuts else [])


class Swing:
    """Context manager: forward pre-hooks that shift each module's input by ``swing`` with a fresh (dy, dx) per
    call, drawn from ``generator`` (a CPU torch.Generator: the same seed gives the same shifts)."""

    def __init__(self, modules: list[nn.Module], generator: torch.Generator):
        self.modules, self.generator, self.handles = modules, generator, []

    def _hook(self, module, inputs):
        dy, dx = torch.randint(0, 3, (2,), generator=self.generator).tolist()
        return (swing(inputs[0], dy, dx), *inputs[1:])

    def __enter__(self) -> "Swing":
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def batch_stats(stats: BNInputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum C_i,) batch mean and unbiased std over (N, H, W) of every BN input, from the per-sample moments
    ``stats`` recorded (batch variance = mean of the per-sample variances + variance of the per-sample means,
    times n / (n - 1) for n = N H W values): Genie's statistics at the cost of ZeroQ's fused ones."""
    m, s = stats.concatenated()
    n = stats.spatial_counts() * len(m)
    mean = m.mean(0)
    var = (s.square() - STD_EPS).clamp_min(0).mean(0) + (m - mean).square().mean(0)
    return mean, (var * n / (n - 1)).sqrt()


def genie_loss(x: torch.Tensor, stats: BNInputStats, sigma: torch.Tensor) -> torch.Tensor:
    """Genie's loss: sum over BN layers of mean_c (m_c - mu_c)^2 + mean_c (s_c - sigma_c)^2, with m, s the batch
    mean and unbiased std over (N, H, W) of the layer's input (``batch_stats``) and ``sigma`` (sum C_i,) the
    targets (``genie_sigma``), plus the input prior: per image, sum over channels of mean^2 + (std - 1)^2
    (unbiased std over H, W), averaged over images."""
    s, m = torch.std_mean(x, dim=(2, 3))
    prior = m.square().sum(1).mean() + (s - 1).square().sum(1).mean()
    mean, std = batch_stats(stats)
    per_layer = stats.layer_sum()
    squares = (mean - stats.per_channel(stats.running_mean)).square() + (std - sigma).square()
    return prior + (squares @ (per_layer / per_layer.sum(0))).sum()


def genie_sigma(stats: BNInputStats, std_eps: float = 1e-6) -> torch.Tensor:
    """(sum C_i,) Genie's std targets sqrt(running_var + std_eps) (the code's eps, not the BN layers')."""
    mu = stats.running_mean
    return torch.cat([(bn.running_var.detach() + std_eps).sqrt().to(m) for bn, m in zip(stats.layers, mu)])


def seeds_of(seed: int) -> dict[str, int]:
    """The batch seed's derived seeds: generator init, latents (or starting pixels), swing shifts."""
    return {"init": seed ^ 0x9E3779B97F4A7C15 >> 1, "latents": seed, "swing": seed ^ 0x3C6EF372FE94F82B >> 1}


def _inputs(cfg: GenieCore, shape: tuple[int, ...], seed: int, device) -> tuple[nn.Module | None, torch.Tensor]:
    """A fresh generator (seeded init, train mode) and its latents, or (None, starting pixels N(0, 1))."""
    seeds = seeds_of(seed)
    if not cfg.generator:
        return None, torch.randn(shape, generator=torch.Generator().manual_seed(seeds["latents"])).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds["init"])
        gen = Generator(tuple(shape[1:]), cfg.latent_dim, cfg.width)
    z = torch.randn(shape[0], cfg.latent_dim, generator=torch.Generator().manual_seed(seeds["latents"]))
    return gen.to(device).train(), z.to(device)


LossFn = Callable[[torch.Tensor], torch.Tensor]  # images -> loss, the model's forward inside


def genie_loss_fn(
    model: nn.Module, stats: BNInputStats, cfg: GenieConfig | GenieDSGConfig, margins=None, weights=None
) -> LossFn:
    """images -> the batch's loss: genie_dsg's DSG loss, Genie's batch loss, or ZeroQ's per-sample loss.

    Args:
        model: the frozen FP32 model, run inside the returned function.
        stats: the ``BNInputStats`` hooked on ``model`` (entered).
        cfg: ``GenieDSGConfig``: DSG's loss; ``GenieConfig``: ``statistics`` batch (Genie's) or sample (ZeroQ's).
        margins: genie_dsg's SDA margins (``compute_margins``), or None: no slack.
        weights: genie_dsg's LSE weights (``lse_weights``), or None: every sample and layer weighs 1.
    """

    dsg = isinstance(cfg, GenieDSGConfig)
    sigma = None if dsg else genie_sigma(stats, cfg.std_eps)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if dsg:
            return dsg_loss(x, stats, margins, weights)
        return genie_loss(x, stats, sigma) if cfg.statistics == "batch" else zeroq_loss(x, stats, logits)

    return loss_fn


def optimize_latents(gen: nn.Module | None, z: torch.Tensor, loss_fn: LossFn, cfg: GenieCore, desc="genie"):
    """Genie's optimisation: Adam on the latents ``z`` (lr_latent, plateau-decayed) and on the generator
    (lr_generator x gamma every gamma_every iterations). Returns the batch of the last iteration (detached) and
    {"loss_start", "loss_end", "iterations", "seconds", "seconds_per_iter"}; a NaN or infinite loss stops with an
    error naming the iteration.

    Args:
        gen: the generator (train mode), or None: ``z`` is the batch itself (optimising pixels).
        z: the latents (B, latent_dim), or the starting pixels when ``gen`` is None; a copy is optimised.
        loss_fn: images -> scalar loss (runs the model).
        cfg: iterations, the two lrs and their schedules.
        desc: progress-bar label, also named in the error of a non-finite loss.
    """
    z = z.clone().requires_grad_(True)
    fused = True if z.is_cuda else None
    opt_z = torch.optim.Adam([z], lr=cfg.lr_latent, fused=fused)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, mode="min", patience=cfg.patience, min_lr=cfg.min_lr)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator, fused=fused) if gen is not None else None
    decay = torch.optim.lr_scheduler.ExponentialLR(opt_g, cfg.gamma) if opt_g else None
    loss_start, t0 = None, time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc=desc, leave=False)
    for it in bar:
        opt_z.zero_grad(set_to_none=True)
        if opt_g:
            opt_g.zero_grad(set_to_none=True)
        x = gen(z) if gen is not None else z
        loss = loss_fn(x)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at iteration {it}; nothing was saved")
        loss_start = value if loss_start is None else loss_start
        loss.backward()
        opt_z.step()
        plateau.step(value)
        if opt_g:
            opt_g.step()
            if (it + 1) % cfg.gamma_every == 0:
                decay.step()
        if it % 25 == 0:
            bar.set_postfix(loss=f"{value:.4g}", lr=f"{opt_z.param_groups[0]['lr']:.2g}")
    seconds = time.perf_counter() - t0
    info = {"loss_start": loss_start, "loss_end": value, "iterations": cfg.iterations, "seconds": seconds}
    return x.detach(), {**info, "seconds_per_iter": seconds / cfg.iterations}


def genie_batch(
    model: nn.Module,
    shape: tuple[int, ...],
    seed: int,
    cfg: GenieConfig | GenieDSGConfig,
    device: str | torch.device = "cpu",
    desc: str = "genie",
) -> tuple[torch.Tensor, dict, dict | None]:
    """One Genie-D batch (``GenieConfig``) or one genie_dsg batch (``GenieDSGConfig``): (images on the CPU, info,
    the SDA margins or None). The batch kept is the generator's output at the last iteration (the code's).

    Args:
        model: the FP32 model whose BN statistics the images match (frozen; its strided convs swing while
            generating, no hook is left behind).
        shape: (B, C, H, W) of the batch.
        seed: the batch's seed: generator init, latents and swing shifts use seeds derived from it (``seeds_of``),
            genie_dsg's probe and margins the same seeds as dsg.
        cfg: the recipe (see the config classes).
        device: where the optimisation runs.
        desc: progress-bar label.
    """
    gen, z = _inputs(cfg, shape, seed, device)
    shifts = torch.Generator().manual_seed(seeds_of(seed)["swing"])
    moving = swing_modules(model, cfg.swing_shortcuts, shape, device) if cfg.swing else []
    dsg = isinstance(cfg, GenieDSGConfig)
    margins = weights = None
    if dsg and cfg.sda:
        with torch.no_grad():
            x0 = gen(z) if gen is not None else z
        margins = compute_margins(model, shape, seed, cfg.eps, cfg.per_channel, device, cfg.margin_probe, x0)
    if dsg and cfg.lse:
        weights = lse_weights(shape[0], len(bn_layers(model)), cfg.lse_weight, cfg.lse_tied).to(device)
    with frozen(model), Swing(moving, shifts), BNInputStats(model).to(device) as stats:
        x, info = optimize_latents(gen, z, genie_loss_fn(model, stats, cfg, margins, weights), cfg, desc)
    saved = None
    if margins is not None:
        saved = {"mean": [m.cpu() for m in margins[0]], "std": [g.cpu() for g in margins[1]], "eps": cfg.eps}
        saved.update(per_channel=cfg.per_channel, probe=cfg.margin_probe)
    return x.cpu(), {**info, "swing_modules": len(moving)}, saved
