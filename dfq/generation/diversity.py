"""Diversity diagnostics of a calibration set (the DSG paper's homogenisation argument).

(a) BN-statistic spread: for BN layer i, how far the per-sample channel statistics spread around the
    running statistics, in units of the running std:
        spread_i = mean_c  std_b( m_i[b, c] ) / sigma_i[c]
    ZeroQ pulls every sample onto mu_i, so its spread collapses towards 0; real data has a clear spread.
    Also the mean absolute offset  mean_{b,c} |m_i[b, c] - mu_i[c]| / sigma_i[c].
(b) Feature similarity: mean pairwise cosine similarity of the penultimate-layer features (the input
    of the last Linear layer) over all distinct pairs of the set; lower means more diverse.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dfq.generation.bn_stats import BNInputStats


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear classifier: cannot take penultimate features")
    return linears[-1]


@torch.no_grad()
def diagnose(model: nn.Module, batches: Iterable[torch.Tensor], device="cpu") -> dict:
    """Per-layer spread/offset of per-sample BN statistics and mean pairwise feature cosine."""
    model.eval().to(device)
    means: list[list[torch.Tensor]] = []
    feats: list[torch.Tensor] = []
    handle = _last_linear(model).register_forward_pre_hook(lambda mod, inp: feats.append(inp[0].flatten(1).cpu()))
    try:
        with BNInputStats(model).to(device) as stats:
            for x in batches:
                model(x.to(device))
                means.append([m.cpu() for m in stats.means])
            sigma = [s.cpu() for s in stats.running_std]
            mu = [m.cpu() for m in stats.running_mean]
    finally:
        handle.remove()
    if not means:
        raise ValueError("no calibration batches to diagnose")
    spread, offset = [], []
    for i in range(len(sigma)):
        m = torch.cat([b[i] for b in means])  # (N, C)
        spread.append((m.std(0, unbiased=False) / sigma[i]).mean().item())
        offset.append(((m - mu[i]).abs() / sigma[i]).mean().item())
    f = torch.nn.functional.normalize(torch.cat(feats).double(), dim=1)
    n = len(f)
    cos = ((f @ f.T).sum() - n) / max(n * (n - 1), 1)
    return {
        "bn_spread": spread,
        "bn_offset": offset,
        "bn_spread_mean": sum(spread) / len(spread),
        "feature_cosine": cos.item(),
        "images": n,
    }
