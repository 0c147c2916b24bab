"""Speed and memory measurements for the benchmark (bench/run.py); no params, no argv.

Generation cost is compared with two floors measured in the same process on the same model and batch:
- frozen: forward + backward to the INPUT with the weights frozen (all that generation needs);
- weights: forward + backward with weight gradients too (what the official ZeroQ/DSG code pays).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch
from torch import nn

from dfq.fp32.models import count_bn
from dfq.generation.generators import compute_margins, optimize_images
from dfq.generation.losses import dsg_loss, lse_weights, zeroq_loss


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def dsg_loss_fn(
    model: nn.Module,
    x: torch.Tensor,
    device="cpu",
    eps: float = 0.9,
    per_channel: bool = False,
    lse_weight: float = 2.0,
):
    """The DSG loss (SDA margins from batch 0's seeded probe, LSE weights) for timing batch ``x``."""
    margins = compute_margins(model, x.shape, 0, eps, per_channel, device)
    weights = lse_weights(len(x), count_bn(model), lse_weight).to(device)
    return lambda x_, stats, logits=None: dsg_loss(x_, stats, margins, weights)


def time_it(fn: Callable[[], object], iters: int, warmup: int = 3, device="cpu", repeats: int = 3) -> float:
    """Seconds per call: the mean over ``iters`` consecutive calls, fastest of ``repeats`` such runs
    (the same estimator as ``generation_iter_time``, so that their ratio compares like with like)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def fwd_bwd_floor(
    model: nn.Module, x: torch.Tensor, weight_grads: bool, iters: int, device="cpu", repeats: int = 3
) -> float:
    """Seconds per forward + backward of ``model`` on ``x`` (gradient to the input; weights optional)."""
    x = x.to(device).clone().requires_grad_(True)
    model = model.to(device).eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(weight_grads)

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    try:
        return time_it(step, iters, device=device, repeats=repeats)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def generation_iter_time(
    model: nn.Module, x: torch.Tensor, loss_fn=zeroq_loss, iters: int = 20, device="cpu", repeats: int = 3
) -> float:
    """Seconds per iteration of the real generation loop (hooks, loss, Adam, plateau schedule)."""
    x = x.to(device)
    model = model.to(device)
    optimize_images(model, x, loss_fn, iterations=3, lr=0.5, patience=100, min_lr=1e-4, desc="warm-up")
    best = float("inf")
    for _ in range(repeats):  # fastest of the timed runs
        _sync(device)
        t = time.perf_counter()
        optimize_images(model, x, loss_fn, iterations=iters, lr=0.5, patience=100, min_lr=1e-4, desc="timed")
        _sync(device)
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def paired_generation_ratios(
    model: nn.Module, x: torch.Tensor, loss_fn=zeroq_loss, iters: int = 20, rounds: int = 5, device="cpu"
) -> dict:
    """Generation time per iteration and both floors, measured back to back in each of ``rounds`` rounds,
    so that a slow spell of a shared machine hits all three alike; medians of the per-round ratios."""
    gen, frozen, full = [], [], []
    for _ in range(rounds):
        gen.append(generation_iter_time(model, x, loss_fn, iters, device, repeats=1))
        frozen.append(fwd_bwd_floor(model, x, False, iters, device, repeats=1))
        full.append(fwd_bwd_floor(model, x, True, iters, device, repeats=1))
    r_frozen = sorted(g / f for g, f in zip(gen, frozen))
    r_full = sorted(g / f for g, f in zip(gen, full))
    return {
        "gen": statistics.median(gen),
        "ratio_frozen": statistics.median(r_frozen),
        "ratio_full": statistics.median(r_full),
        "ratio_frozen_range": (r_frozen[0], r_frozen[-1]),
    }


def paired_eval_ratio(
    fp32: nn.Module, quantized: nn.Module, batches: list[torch.Tensor], rounds: int = 7, device="cpu"
) -> dict:
    """FP32 and fake-quant inference passes alternated ``rounds`` times; median of the per-round ratios."""
    t_fp, t_q = [], []
    for _ in range(rounds):
        t_fp.append(eval_time(fp32, batches, device, repeats=1))
        t_q.append(eval_time(quantized, batches, device, repeats=1))
    ratios = sorted(q / f for q, f in zip(t_q, t_fp))
    return {
        "fp32": statistics.median(t_fp),
        "quantized": statistics.median(t_q),
        "ratio": statistics.median(ratios),
        "ratio_range": (ratios[0], ratios[-1]),
    }


@torch.inference_mode()
def eval_time(model: nn.Module, batches: list[torch.Tensor], device="cpu", repeats: int = 7) -> float:
    """Seconds for one inference pass over ``batches`` (fastest of ``repeats``)."""
    model = model.to(device).eval()
    batches = [b.to(device) for b in batches]

    def run():
        for b in batches:
            model(b)

    return time_it(run, 1, warmup=1, device=device, repeats=repeats)


def peak_memory_mb(device="cpu") -> float:
    """Peak CUDA memory allocated (on a GPU) or the process's peak resident set size (on the CPU)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
