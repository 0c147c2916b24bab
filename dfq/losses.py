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
    """(B, L) per-sample, per-layer squared distance of the statistics from the running statistics
    (all layers at once: channels concatenated, summed per layer by one matmul)."""
    m, s = stats.concatenated()
    mu, sigma = stats.per_channel(stats.running_mean), stats.per_channel(stats.running_std)
    return ((m - mu).square() + (s - sigma).square()) @ stats.layer_sum()


def image_prior_loss(x: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample loss pulling each image channel to mean 0 and std 1 (margin 0)."""
    m, s = per_sample_stats(x)
    return m.square().sum(1) + (s - 1.0).square().sum(1)


def zeroq_loss(x: torch.Tensor, stats: BNInputStats) -> torch.Tensor:
    """ZeroQ: sum_i [||m_i - mu_i||^2 + ||s_i - sigma_i||^2] / B plus the image-level term."""
    stats.check_complete()
    return (layer_loss_matrix(stats).sum(1) + image_prior_loss(x)).mean()


# ---------------------------------------------------------------------------------------------
# DSG (Zhang, Qin et al., CVPR 2021): Slack Distribution Alignment + Layerwise Sample Enhancement
# ---------------------------------------------------------------------------------------------


def sda_margins(stats: BNInputStats, eps: float, per_channel: bool = False):
    """Margins from ONE forward pass of a Gaussian probe (already run through ``stats``' model).

    delta_i = quantile_eps |m_i(x0) - mu_i| and gamma_i = quantile_eps |s_i(x0) - sigma_i|, taken over
    (sample, channel) -> one scalar per layer (default), or over samples only -> one value per channel.
    Returns (mean_margins, std_margins): lists of tensors, shape () or (C_i,).
    """
    stats.check_complete()
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"generate.dsg.eps={eps} must be in [0, 1]")
    deltas, gammas = [], []
    for m, s, mu, sigma in zip(stats.means, stats.stds, stats.running_mean, stats.running_std):
        dm, ds = (m - mu).abs().detach(), (s - sigma).abs().detach()
        if per_channel:
            deltas.append(torch.quantile(dm, eps, dim=0))
            gammas.append(torch.quantile(ds, eps, dim=0))
        else:
            deltas.append(torch.quantile(dm.flatten(), eps))
            gammas.append(torch.quantile(ds.flatten(), eps))
    return deltas, gammas


def sda_loss_matrix(stats: BNInputStats, mean_margins, std_margins) -> torch.Tensor:
    """(B, L) dead-zone L2: ||max(|m_i - mu_i| - delta_i, 0)||^2 + ||max(|s_i - sigma_i| - gamma_i, 0)||^2."""
    m, s = stats.concatenated()
    mu, sigma = stats.per_channel(stats.running_mean), stats.per_channel(stats.running_std)
    d, g = stats.per_channel(mean_margins), stats.per_channel(std_margins)
    rm = torch.relu((m - mu).abs() - d)
    rs = torch.relu((s - sigma).abs() - g)
    return (rm.square() + rs.square()) @ stats.layer_sum()


def lse_weights(batch: int, layers: int, lse_weight: float) -> torch.Tensor:
    """(B, L) weights X = I + (w - 1) at the tied layer: sample j counts ``lse_weight`` times at layer
    j mod L and once elsewhere (w = 2 is the paper's X = I + 1 1^T)."""
    w = torch.ones(batch, layers)
    w[torch.arange(batch), torch.arange(batch) % layers] = lse_weight
    return w


def dsg_loss(x: torch.Tensor, stats: BNInputStats, margins=None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_DSG = (1/B) sum_j [ sum_i X[j, i] l_i(j) + image prior(j) ].

    ``margins`` None (no SDA) uses the exact ZeroQ layer loss and ``weights`` None (no LSE) weighs every
    layer once, so with both off this is the ZeroQ loss, value for value.
    """
    stats.check_complete()
    mat = layer_loss_matrix(stats) if margins is None else sda_loss_matrix(stats, *margins)
    per_sample = mat.sum(1) if weights is None else (mat * weights).sum(1)
    return (per_sample + image_prior_loss(x)).mean()
