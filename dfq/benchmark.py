"""Speed and memory measurements for the benchmark (bench/run.py); no params, no argv.

Generation cost is compared with two floors measured in the same process on the same model and batch:
- frozen: forward + backward to the INPUT with the weights frozen (all that generation needs);
- weights: forward + backward with weight gradients too (what the official ZeroQ/DSG code pays).
"""
from __future__ import annotations

import resource
import time
from typing import Callable

import torch
from torch import nn

from dfq.generators import optimize_images
from dfq.losses import zeroq_loss


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], iters: int, warmup: int = 3, device="cpu") -> float:
    """Fastest seconds per call over ``iters`` calls after ``warmup`` calls (the least noisy estimate
    on a shared machine)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def fwd_bwd_floor(model: nn.Module, x: torch.Tensor, weight_grads: bool, iters: int, device="cpu") -> float:
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
        return time_it(step, iters, device=device)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def generation_iter_time(model: nn.Module, x: torch.Tensor, loss_fn=zeroq_loss, iters: int = 20, device="cpu") -> float:
    """Seconds per iteration of the real generation loop (hooks, loss, Adam, plateau schedule)."""
    x = x.to(device)
    model = model.to(device)
    optimize_images(model, x, loss_fn, iterations=3, lr=0.5, patience=100, min_lr=1e-4, desc="warm-up")
    best = float("inf")
    for _ in range(3):  # fastest of three timed runs
        _sync(device)
        t = time.perf_counter()
        optimize_images(model, x, loss_fn, iterations=iters, lr=0.5, patience=100, min_lr=1e-4, desc="timed")
        _sync(device)
        best = min(best, (time.perf_counter() - t) / iters)
    return best


@torch.inference_mode()
def eval_time(model: nn.Module, batches: list[torch.Tensor], device="cpu") -> float:
    """Seconds for one inference pass over ``batches`` (fastest of 7)."""
    model = model.to(device).eval()
    batches = [b.to(device) for b in batches]

    def run():
        for b in batches:
            model(b)

    return time_it(run, 7, warmup=1, device=device)


def peak_memory_mb(device="cpu") -> float:
    """Peak CUDA memory allocated (on a GPU) or the process's peak resident set size (on the CPU)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


