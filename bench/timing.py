"""Speed and memory measurements for the benchmark (bench/run.py); no params, no argv.

Generation cost is compared with two floors measured in the same process on the same model and batch:
- frozen: forward + backward to the INPUT with the weights frozen (all that generation needs);
- weights: forward + backward with weight gradients too (what the official ZeroQ/DSG code pays).
A reconstruction step is compared with the forward + backward of the same unit in FP32 (weight gradients on) on the
same number of cached rows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
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


def paired_rounds(rounds: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Every measure once per round, back to back, so that a slow spell of a shared machine hits them alike; the
    times of each measure, round by round."""
    times: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for got, measure in zip(times, measures):
            got.append(measure())
    return times


def ratio_summary(num: list[float], den: list[float]) -> tuple[float, tuple[float, float]]:
    """The median of the per-round ratios num / den and their range."""
    ratios = sorted(a / b for a, b in zip(num, den))
    return statistics.median(ratios), (ratios[0], ratios[-1])


def paired_generation_ratios(
    model: nn.Module, x: torch.Tensor, loss_fn=zeroq_loss, iters: int = 20, rounds: int = 5, device="cpu"
) -> dict:
    """Generation time per iteration and both floors, measured back to back in each of ``rounds`` rounds
    (``paired_rounds``); medians of the per-round ratios."""
    gen, frozen, full = paired_rounds(
        rounds,
        lambda: generation_iter_time(model, x, loss_fn, iters, device, repeats=1),
        lambda: fwd_bwd_floor(model, x, False, iters, device, repeats=1),
        lambda: fwd_bwd_floor(model, x, True, iters, device, repeats=1),
    )
    ratio, spread = ratio_summary(gen, frozen)
    return {
        "gen": statistics.median(gen),
        "ratio_frozen": ratio,
        "ratio_full": ratio_summary(gen, full)[0],
        "ratio_frozen_range": spread,
    }


def paired_eval_ratio(
    fp32: nn.Module, quantized: nn.Module, batches: list[torch.Tensor], rounds: int = 7, device="cpu", repeats: int = 3
) -> dict:
    """FP32 and fake-quant inference alternated ``rounds`` times, each time the fastest of ``repeats`` passes over
    ``batches`` (one pass is ~0.5 s on the CPU: a single pass let a moment's load swing the ratio from 0.8 to
    1.6); median of the per-round ratios."""
    t_fp, t_q = paired_rounds(
        rounds,
        lambda: eval_time(fp32, batches, device, repeats=repeats),
        lambda: eval_time(quantized, batches, device, repeats=repeats),
    )
    ratio, spread = ratio_summary(t_q, t_fp)
    return {"fp32": statistics.median(t_fp), "quantized": statistics.median(t_q), "ratio": ratio, "ratio_range": spread}


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


def recon_step_time(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, iters: int, **kw) -> float:
    """Seconds per optimisation step of ``optimize_unit`` (reconstruction.py) on a copy of ``unit``: the run of
    ``iters + 1`` steps minus the run of 1, over ``iters``, so that the fixed costs (the unit's error before and
    after, the rounding modules' set-up) cancel. ``kw``: optimize_unit's learn_weights, learn_acts, drop_prob,
    x_fp, genie. The regulariser is on from the first step (warmup 0), its most expensive setting."""
    from dfq.quant.reconstruction import optimize_unit

    def run(steps: int) -> float:
        u, c = copy.deepcopy(unit), dataclasses.replace(cfg, iterations=steps, act_iterations=steps, warmup=0.0)
        with contextlib.redirect_stdout(io.StringIO()):
            t = time.perf_counter()
            optimize_unit(u, x, y, c, **kw)
            return time.perf_counter() - t

    return (run(iters + 1) - run(1)) / iters


def recon_floor_time(fp_unit: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, iters: int) -> float:
    """Seconds per forward + backward of the FP32 ``fp_unit`` (weight gradients on) on ``batch`` cached rows
    drawn as optimize_unit draws them, with its loss: the floor of one reconstruction step."""
    from dfq.quant.reconstruction import rec_error

    fp_unit = copy.deepcopy(fp_unit)
    for p in fp_unit.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen).to(x.device)
        fp_unit.zero_grad(set_to_none=True)
        rec_error(fp_unit(x.index_select(0, idx)), y.index_select(0, idx)).backward()

    return time_it(step, iters, device=x.device, repeats=1)


def paired_recon_ratios(unit, fp_unit, x, y, cfg, iters: int = 40, rounds: int = 5, **kw) -> dict:
    """One unit's step time and floor measured back to back in each of ``rounds`` rounds (``paired_rounds``), after
    one untimed warm-up of each (first calls pay one-off set-up); medians."""
    recon_step_time(unit, x, y, cfg, 2, **kw)
    recon_floor_time(fp_unit, x, y, cfg.batch_size, 2)
    steps, floors = paired_rounds(
        rounds,
        lambda: recon_step_time(unit, x, y, cfg, iters, **kw),
        lambda: recon_floor_time(fp_unit, x, y, cfg.batch_size, iters),
    )
    ratio, spread = ratio_summary(steps, floors)
    return {"step": statistics.median(steps), "floor": statistics.median(floors), "ratio": ratio, "ratio_range": spread}
