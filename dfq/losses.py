"""Generation losses: ZeroQ's BN-statistic matching and the image-level prior.

All losses are built from one (B, L) matrix: entry [b, i] is sample b's loss at BN layer i,
l_i(b) = sum_c (m_i[b, c] - mu_i[c])^2 + sum_c (s_i[b, c] - sigma_i[c])^2.
ZeroQ sums it over layers and averages over samples. DSG (slack margins, per-sample layer weights)
changes only how residuals are clipped and how the matrix is weighted.
"""
from __future__ import annotations

import torch

from dfq.bn_stats import BNInputStats, per_sample_stats


def layer_loss_matrix(stats: BNInputStats) -> torch.Tensor:
    """(B, L) per-sample, per-layer squared distance of the statistics from the running statistics."""
    cols = []
    for m, s, mu, sigma in zip(stats.means, stats.stds, stats.running_mean, stats.running_std):
        cols.append((m - mu).square().sum(1) + (s - sigma).square().sum(1))
    return torch.stack(cols, dim=1)


def image_prior_loss(x: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample loss pulling each image channel to mean 0 and std 1 (margin 0)."""
    m, s = per_sample_stats(x)
    return m.square().sum(1) + (s - 1.0).square().sum(1)


def zeroq_loss(x: torch.Tensor, stats: BNInputStats) -> torch.Tensor:
    """ZeroQ: sum_i [||m_i - mu_i||^2 + ||s_i - sigma_i||^2] / B plus the image-level term."""
    stats.check_complete()
    return (layer_loss_matrix(stats).sum(1) + image_prior_loss(x)).mean()
