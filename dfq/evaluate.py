"""Evaluation: top-1 / top-5 accuracy over a DataLoader, with a progress bar."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu", desc: str = "evaluate") -> dict:
    """Return {"top1": percent, "top5": percent, "images": n}."""
    model.eval().to(device)
    top1 = top5 = n = 0
    for x, y in tqdm(loader, desc=desc, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        hit = pred == y.view(-1, 1)
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        n += len(y)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": n}


def make_loader(dataset, batch_size: int, workers: int = 0):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, persistent_workers=False
    )
