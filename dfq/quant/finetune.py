"""Data-free fine-tuning: distil the FP32 model into its calibrated fake-quant model on synthetic images.

The label-free distillation of GDFQ, Qimera, IntraQ and SynQ, on cached images instead of a generator:
the student is a calibrated fake-quant model (dfq.quant.prepare) and the loss is KL(teacher || student) of
the softmax outputs, over randomly cropped and flipped images.

- Weights (and biases, and BN affine parameters) train through the straight-through estimator of their
  per-channel fake-quant. The grid (s_w, z_w) stays fixed, so the weights the model computes with are
  always on it. At the end every weight is replaced by its quantized value.
- Activation step sizes train LSQ-style (``ActFakeQuantize.learn_scale``) with their own Adam.
- BatchNorm running statistics stay frozen: the model runs in eval mode throughout.
- Resume: after every epoch the whole training state (model, optimizers, schedules, loss history) is written
  atomically to ``checkpoint``. Batch order and augmentation come from a generator seeded by (seed, epoch)
  alone, so a run resumed from epoch k gives the same weights as an uninterrupted one (same thread count).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from dfq.io import load_torch, save_torch
from dfq.quant.bias import round_biases
from dfq.quant.prepare import act_quantizers

SCHEDULES = ("cosine", "constant")


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class FinetuneConfig:
    """Data-free fine-tuning (finetune.train): distil the FP32 model into a calibrated cell."""

    epochs: int = Field(20, gt=0)  # epochs and lr: chosen on the validation split (ResNet-20 W4A4, README)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3e-4, gt=0)  # SGD (momentum 0.9, Nesterov) on weights, biases and BN affine parameters
    act_lr: float = Field(4e-5, gt=0)  # Adam on the activation step sizes (LSQ)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: both learning rates decay to 0 over all steps
    crop_padding: int = Field(4, ge=0)  # random crop after zero-padding each side by this many pixels (0: none)
    flip: bool = True  # random horizontal flip
    seed: int = Field(0, ge=0)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), mean over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1), log_target=True, reduction="batchmean"
    )


def augment(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image (zero is the mean pixel in the normalised input
    space) and a horizontal flip with probability 1/2."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        off = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(off)])
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, images: torch.Tensor, batch_size: int, device="cpu") -> float:
    """KL(teacher || student) over ``images`` (no augmentation), image-weighted mean.

    Args:
        student: the fake-quant model.
        teacher: the FP32 model.
        images: (N, C, H, W) in the model's normalised input space.
        batch_size: images per forward pass (the result does not depend on it beyond float summation order).
        device: where both models run.
    """
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        total += float(kl_divergence(student(x), teacher(x))) * len(x)
    return total / max(len(images), 1)


def _trainable(gm: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases and BN affine parameters; activation step sizes), the step sizes made learnable."""
    for p in gm.parameters():
        p.requires_grad_(False)
    weights = []
    for m in gm.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or hasattr(m, "weight_scale"):
            weights += [p for p in (m.weight, m.bias) if p is not None]
    for p in weights:
        p.requires_grad_(True)
    if not weights:
        raise ValueError("nothing to fine-tune: the model has no fake-quant weight layers")
    return weights, [fq.learn_scale() for fq in act_quantizers(gm)]


def _schedule(cfg: FinetuneConfig, total_steps: int) -> Callable[[int], float]:
    if cfg.schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _optimizers(student: nn.Module, cfg: FinetuneConfig, per_epoch: int):
    """SGD on the weights (Nesterov momentum), Adam on the activation step sizes, both on the same schedule."""
    weights, steps = _trainable(student)
    opt_w = torch.optim.SGD(weights, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    opt_a = torch.optim.Adam(steps, lr=cfg.act_lr) if steps else None
    lam = _schedule(cfg, cfg.epochs * per_epoch)
    return opt_w, opt_a, [torch.optim.lr_scheduler.LambdaLR(o, lam) for o in (opt_w, opt_a) if o is not None]


def _resume(checkpoint, student: nn.Module, opt_w, opt_a, scheds) -> tuple[list[float], int, float]:
    """(loss history, first epoch to run, seconds so far) from the training state file, when it exists."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return [], 0, 0.0
    state = load_torch(checkpoint)
    student.load_state_dict(state["model"])
    opt_w.load_state_dict(state["opt_w"])
    if opt_a is not None:
        opt_a.load_state_dict(state["opt_a"])
    for s, sd in zip(scheds, state["scheds"]):
        s.load_state_dict(sd)
    return state["history"], state["epoch"], state["seconds"]


def _epoch(student, teacher, images, cfg: FinetuneConfig, epoch: int, optimizers, device, progress: bool) -> float:
    """One epoch of distillation on augmented images in a seeded order; the mean KL over the epoch's images."""
    from tqdm import tqdm

    opt_w, opt_a, scheds = optimizers
    per_epoch = math.ceil(len(images) / cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(images), generator=gen)
    total = 0.0
    bar = tqdm(range(per_epoch), desc=f"fine-tune epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for b in bar:
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x = augment(images[idx], cfg.crop_padding, cfg.flip, gen).to(device)
        with torch.no_grad():
            target = teacher(x)
        loss = kl_divergence(student(x), target)
        opt_w.zero_grad(set_to_none=True)
        if opt_a is not None:
            opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        if opt_a is not None:
            opt_a.step()
        for s in scheds:
            s.step()
        total += loss.item() * len(idx)
        bar.set_postfix(kl=f"{loss.item():.4f}")
    return total / len(images)


def _save_state(checkpoint, epochs_done: int, student: nn.Module, optimizers, history, seconds, cfg) -> None:
    """The training state after ``epochs_done`` epochs, written atomically: what ``_resume`` continues from."""
    opt_w, opt_a, scheds = optimizers
    state = {"epoch": epochs_done, "model": student.state_dict(), "opt_w": opt_w.state_dict()}
    state.update(opt_a=opt_a.state_dict() if opt_a is not None else None, scheds=[s.state_dict() for s in scheds])
    save_torch({**state, "history": history, "seconds": seconds, "config": asdict(cfg)}, checkpoint)


def _store(student: nn.Module, int32_biases: bool) -> int:
    """Fix the learnt activation scales, put every weight on its grid as it is stored, freeze the model, and (an
    int32-bias cell) put the biases back on the int32 grid; the number of layers whose biases were re-rounded."""
    for fq in act_quantizers(student):
        fq.fix_scale()
    with torch.no_grad():  # the weights the model computes with, stored as they are: on the grid
        for m in student.modules():
            if hasattr(m, "weight_scale"):
                m.weight.copy_(m.quantized_weight())
    for p in student.parameters():
        p.requires_grad_(False)
    return round_biases(student) if int32_biases else 0


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    cfg: FinetuneConfig,
    device="cpu",
    checkpoint: str | Path | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    progress: bool = True,
    int32_biases: bool = False,
) -> dict:
    """Fine-tune the calibrated fake-quant ``student`` in place towards ``teacher`` on ``images``.

    Returns a summary: KL before and after (no augmentation; after: of the model as stored, biases re-rounded),
    loss per epoch, steps, seconds, the epoch it resumed from and the number of layers whose biases were re-rounded.

    Args:
        student: the calibrated fake-quant model (``dfq.quant.prepare.load_quantized``), trained in place.
        teacher: the FP32 model whose logits are the targets (frozen here).
        images: the fine-tuning images (N, C, H, W) in the model's normalised input space.
        cfg: epochs, batch size, learning rates, schedule, augmentation and seed.
        device: where both models run.
        checkpoint: file of the training state, written after every epoch and resumed from when it exists.
        on_epoch: ``on_epoch(epoch, mean_loss)`` runs after each epoch's checkpoint.
        progress: show a progress bar and print each epoch's KL.
        int32_biases: an int32-bias cell, whose biases go back on the int32 grid
            (``dfq.quant.bias.round_biases``) after training.
    """
    student.eval().to(device)
    teacher.eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if len(images) == 0:
        raise ValueError("no images to fine-tune on")
    kl_start = mean_kl(student, teacher, images, cfg.batch_size, device)
    per_epoch = math.ceil(len(images) / cfg.batch_size)
    optimizers = _optimizers(student, cfg, per_epoch)
    history, start_epoch, seconds = _resume(checkpoint, student, *optimizers)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        history.append(_epoch(student, teacher, images, cfg, epoch, optimizers, device, progress))
        seconds += time.perf_counter() - t0
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: KL {history[-1]:.4f} ({seconds:.0f} s so far)", flush=True)
        if checkpoint is not None:
            _save_state(checkpoint, epoch + 1, student, optimizers, history, seconds, cfg)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    biases = _store(student, int32_biases)  # before kl_end: the KL of the model as stored
    return {
        "kl_start": kl_start,
        "kl_end": mean_kl(student, teacher, images, cfg.batch_size, device),
        "loss_per_epoch": history,
        "steps": cfg.epochs * per_epoch,
        "seconds": seconds,
        "resumed_from_epoch": start_epoch,
        "images": len(images),
        "int32_biases": biases,
    }
