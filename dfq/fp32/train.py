"""Training the embedded FP32 model (the user normally brings a trained model instead).

SGD with Nesterov momentum and a one-cycle schedule, channels_last on CPU (about 2.5x faster for
small convolutions here), random horizontal flips and 2-pixel random shifts as augmentation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn
from tqdm import tqdm

from dfq.fp32.datasets import InputSpec


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class TrainConfig:
    """Training of the embedded model (train; only when model.weights is null)."""

    epochs: int = Field(5, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.1, gt=0)  # the one-cycle schedule's peak
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = Field(0, ge=0)  # batch order, augmentation and the weight init
    max_images: Optional[int] = Field(None, gt=0)  # train on the first N training images only (None: all)


def _augment(x: torch.Tensor, g: torch.Generator, shift: int = 0) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``shift`` pixels (zero padding), batched."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if shift:
        padded = F.pad(x, (shift,) * 4)
        dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=g).tolist()
        x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: InputSpec,
    cfg: TrainConfig = TrainConfig(),
) -> nn.Module:
    """Train ``model`` on uint8 ``images`` (N, H, W) with integer ``labels`` (the first ``cfg.max_images`` of
    them when set); returns it in eval mode.

    Args:
        model: the classifier, trained in place (channels-last while training).
        images: uint8 training images, (N, H, W) or (N, C, H, W); normalised per batch by ``spec``.
        labels: integer class labels, shape (N,).
        spec: the model's InputSpec: the normalisation from [0, 1] pixels to the model's input.
        cfg: epochs, batch size, peak lr of the one-cycle SGD schedule, weight decay, seed (batch order, augmentation,
            init) and max_images (None: all images).
    """
    epochs, batch_size, lr, seed = cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed
    images, labels = images[: cfg.max_images or len(labels)], labels[: cfg.max_images or len(labels)]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model.to(memory_format=torch.channels_last).train()
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"train epoch {epoch + 1}/{epochs}", leave=False)
        correct = seen = 0
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = _augment(spec.normalize(images[idx]), g).contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}")
        print(f"epoch {epoch + 1}/{epochs}: train top-1 {100 * correct / seen:.2f}%", flush=True)
    return model.to(memory_format=torch.contiguous_format).eval()
