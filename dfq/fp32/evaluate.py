"""Evaluation: top-1 / top-5 accuracy over a DataLoader, with a progress bar."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dfq.fp32.datasets import open_eval_dataset


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many rows of ``logits`` rank their label first (top-1) and among their five highest (top-5; all
    classes when there are fewer than five), as 0-dim tensors on the logits' device: a GPU evaluation adds
    them up without a sync per batch, and the ONNX Runtime evaluation (dfq.deploy.runtime) counts the same way.
    """
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = pred == labels.view(-1, 1)
    return hit[:, 0].sum(), hit.any(dim=1).sum()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu", desc: str = "evaluate") -> dict:
    """Return {"top1": percent, "top5": percent, "images": n}.

    On a GPU the model and images run in channels_last (cuDNN's fast layout: on an H200, ResNet-18 FP32
    inference 21k -> 29k images/s) and the hit counts stay on the device until the end (no sync per batch).
    """
    fmt = torch.channels_last if torch.device(device).type == "cuda" else torch.preserve_format
    model.eval().to(device, memory_format=fmt)
    top1 = top5 = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    for x, y in tqdm(loader, desc=desc, leave=False):
        x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
        c1, c5 = topk_correct(model(x), y)
        top1, top5 = top1 + c1, top5 + c5
        n += len(y)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100.0 * top1.item() / n, "top5": 100.0 * top5.item() / n, "images": n}


def make_loader(dataset, batch_size: int, workers: int = 0):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, persistent_workers=False
    )


def split_accuracy(
    model: nn.Module,
    spec,
    prepared: str | Path,
    batch_size: int,
    device="cpu",
    workers: int = 0,
    desc: str = "evaluate",
) -> dict:
    """Top-1/top-5 % of ``model`` on the test set (``<prepared>/eval``: top1, top5) and on the validation split
    (``<prepared>/val``: val_top1, val_top5; absent when the data stage drew none). FileNotFoundError when the
    prepared folder predates the validation split.

    Args:
        model: the model to evaluate (FP32 or fake quant).
        spec: its input spec (``dfq.fp32.datasets.InputSpec``).
        prepared: the data stage's output folder (eval/ and val/ in it).
        batch_size: evaluation batch.
        device: where the model runs.
        workers: DataLoader worker processes.
        desc: the progress bar's label.
    """
    if not Path(prepared, "val").is_dir():
        raise FileNotFoundError(
            f"{prepared}/val: missing (written by the data stage since data.val_images): rerun "
            "the data stage (dvc repro data)"
        )
    out = {}
    for split, prefix in (("eval", ""), ("val", "val_")):
        data = open_eval_dataset(Path(prepared, split), spec)
        if split == "eval" or len(data):  # an empty test set is an error (evaluate), no validation split is not
            m = evaluate(model, make_loader(data, batch_size, workers), device, desc=f"{desc} ({split})")
            out.update({f"{prefix}top1": m["top1"], f"{prefix}top5": m["top5"]})
    return out
