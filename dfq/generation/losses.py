"""Generation losses: ZeroQ's BN-statistic matching and the image-level prior, DSG's slack margins
and sample weights, and the extra terms of the official DSG code.

All BN losses are built from one (B, L) matrix: entry [b, i] is sample b's loss at BN layer i,
l_i(b) = sum_c (m_i[b, c] - mu_i[c])^2 + sum_c (s_i[b, c] - sigma_i[c])^2.
ZeroQ sums it over layers and averages over samples. DSG (slack margins, per-sample layer weights)
changes only how residuals are clipped and how the matrix is weighted. Every loss takes the model's
output as an optional third argument (``logits``): only the DSG code's label term reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfq.generation.bn_stats import STD_EPS, BNInputStats, per_sample_stats


def unbiased(s: torch.Tensor, n: torch.Tensor | float) -> torch.Tensor:
    """std sqrt(var + 1e-6) with the population variance over n values turned into the unbiased one
    (torch.var's default, which the official DSG code uses); n = 1 keeps the population variance."""
    n = torch.as_tensor(n, dtype=s.dtype, device=s.device)
    factor = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
    return torch.sqrt((s.square() - STD_EPS).clamp_min(0) * factor + STD_EPS)


def bn_stats_of(stats: BNInputStats, unbiased_std: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s), (B, sum C_i): per-sample channel means and stds of every BN input, population
    (default, the estimator BN normalises with) or unbiased variance."""
    m, s = stats.concatenated()
    return (m, unbiased(s, stats.spatial_counts())) if unbiased_std else (m, s)


def layer_loss_matrix(stats: BNInputStats, unbiased_std: bool = False) -> torch.Tensor:
    """(B, L) per-sample, per-layer squared distance of the statistics from the running statistics
    (all layers at once: channels concatenated, summed per layer by one matmul)."""
    m, s = bn_stats_of(stats, unbiased_std)
    mu, sigma = stats.per_channel(stats.running_mean), stats.per_channel(stats.running_std)
    return ((m - mu).square() + (s - sigma).square()) @ stats.layer_sum()


def image_prior_loss(x: torch.Tensor, unbiased_std: bool = False) -> torch.Tensor:
    """(B,) per-sample loss pulling each image channel to mean 0 and std 1 (margin 0)."""
    m, s = per_sample_stats(x)
    if unbiased_std:
        s = unbiased(s, x.shape[2] * x.shape[3])
    return m.square().sum(1) + (s - 1.0).square().sum(1)


def zeroq_loss(x: torch.Tensor, stats: BNInputStats, logits: torch.Tensor | None = None) -> torch.Tensor:
    """ZeroQ: sum_i [||m_i - mu_i||^2 + ||s_i - sigma_i||^2] / B plus the image-level term (no labels)."""
    stats.check_complete()
    return (layer_loss_matrix(stats).sum(1) + image_prior_loss(x)).mean()


# ---------------------------------------------------------------------------------------------
# Terms of the official DSG code that the paper does not state (htqin/DSG distill_data.py)
# ---------------------------------------------------------------------------------------------


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model's output to (uniformly random) labels, averaged over the batch."""
    return F.cross_entropy(logits, labels)


def jitter(x: torch.Tensor, offset: int) -> torch.Tensor:
    """The batch rolled by ``offset`` pixels along both spatial axes (the priors' input, never fed to the network)."""
    return torch.roll(x, shifts=(offset, offset), dims=(2, 3)) if offset else x


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms (over the whole batch) of the four neighbour differences: right, down and
    both diagonals."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def l2_norm_loss(x: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each image's L2 norm."""
    return x.flatten(1).norm(dim=1).mean()


# ---------------------------------------------------------------------------------------------
# DSG (Zhang, Qin et al., CVPR 2021): Slack Distribution Alignment + Layerwise Sample Enhancement
# ---------------------------------------------------------------------------------------------


def sda_margins(stats: BNInputStats, eps: float, per_channel: bool = False, unbiased_std: bool = False):
    """Margins from ONE forward pass of a probe batch (already run through ``stats``' model).

    delta_i = quantile_eps |m_i(x0) - mu_i| and gamma_i = quantile_eps |s_i(x0) - sigma_i|, taken over
    (sample, channel) -> one scalar per layer (default), or over samples only -> one value per channel.
    Returns (mean_margins, std_margins): lists of tensors, shape () or (C_i,).
    """
    stats.check_complete()
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"generate.dsg.eps={eps} must be in [0, 1]")
    deltas, gammas = [], []
    means, stds = (stats.split_layers(t) for t in bn_stats_of(stats, unbiased_std))
    for m, s, mu, sigma in zip(means, stds, stats.running_mean, stats.running_std):
        dm, ds = (m - mu).abs().detach(), (s - sigma).abs().detach()
        if per_channel:
            deltas.append(torch.quantile(dm, eps, dim=0))
            gammas.append(torch.quantile(ds, eps, dim=0))
        else:
            deltas.append(torch.quantile(dm.flatten(), eps))
            gammas.append(torch.quantile(ds.flatten(), eps))
    return deltas, gammas


def sda_loss_matrix(stats: BNInputStats, mean_margins, std_margins, unbiased_std: bool = False) -> torch.Tensor:
    """(B, L) dead-zone L2: ||max(|m_i - mu_i| - delta_i, 0)||^2 + ||max(|s_i - sigma_i| - gamma_i, 0)||^2."""
    m, s = bn_stats_of(stats, unbiased_std)
    mu, sigma = stats.per_channel(stats.running_mean), stats.per_channel(stats.running_std)
    d, g = stats.per_channel(mean_margins), stats.per_channel(std_margins)
    rm = torch.relu((m - mu).abs() - d)
    rs = torch.relu((s - sigma).abs() - g)
    return (rm.square() + rs.square()) @ stats.layer_sum()


def lse_weights(batch: int, layers: int, lse_weight: float, tied: int | None = None) -> torch.Tensor:
    """(B, L) weights: sample j counts ``lse_weight`` times at its tied layer and once elsewhere.

    ``tied`` None (the paper): every sample is tied, j to layer j mod L (w = 2 is X = I + 1 1^T).
    ``tied`` = N (the official code, N = 20 whatever the model): only samples j < N are tied, each to
    layer j itself (none when j >= L); later samples weigh every layer once. The code doubles the
    hinge residual at the tied layer, i.e. w = 4 on the squared loss.
    """
    w = torch.ones(batch, layers)
    j = torch.arange(batch)
    if tied is None:
        w[j, j % layers] = lse_weight
    else:
        j = j[(j < tied) & (j < layers)]
        w[j, j] = lse_weight
    return w


def dsg_loss(
    x: torch.Tensor,
    stats: BNInputStats,
    margins=None,
    weights: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    label_weight: float = 0.0,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    offset: int = 0,
    unbiased_std: bool = False,
) -> torch.Tensor:
    """L_DSG = (1/B) sum_j [ sum_i X[j, i] l_i(j) + image prior(j) ]
             + label_weight CE(logits, labels) + tv_weight TV_L2(x~) + l2_weight mean_j ||x~_j||,
    with x~ the batch rolled by ``offset`` pixels (the official code's extras; 0 weights: the paper).

    ``margins`` None (no SDA) uses the exact ZeroQ layer loss and ``weights`` None (no LSE) weighs every
    layer once, so with both off, no extra term and population stds this is the ZeroQ loss, value for value.

    Args:
        x: the batch being optimised, (B, C, H, W).
        stats: BN input statistics of the forward pass of ``x`` (every BN layer seen).
        margins: (mean margins, std margins) from ``sda_margins``: SDA's dead zone; None: the exact ZeroQ layer loss.
        weights: (B, L) LSE weights from ``lse_weights``; None: every layer counts once.
        logits: the model's output for ``x``; used only when ``label_weight`` > 0.
        labels: (B,) integer labels of the cross-entropy term; used only when ``label_weight`` > 0.
        label_weight: weight of the cross-entropy of ``logits`` to ``labels`` (0: no term).
        tv_weight: weight of the L2 total variation of the rolled batch (0: no term).
        l2_weight: weight of the mean per-image L2 norm of the rolled batch (0: no term).
        offset: pixels the batch is rolled by along both spatial axes for the TV and L2 terms (0: not rolled).
        unbiased_std: per-sample stds from the unbiased variance (the official code's torch.var) instead of the
            population one (BN's).
    """
    stats.check_complete()
    mat = (
        layer_loss_matrix(stats, unbiased_std)
        if margins is None
        else sda_loss_matrix(stats, *margins, unbiased_std=unbiased_std)
    )
    per_sample = mat.sum(1) if weights is None else (mat * weights).sum(1)
    loss = (per_sample + image_prior_loss(x, unbiased_std)).mean()
    if label_weight:
        loss = loss + label_weight * label_loss(logits, labels)
    if tv_weight or l2_weight:
        xj = jitter(x, offset)
        loss = loss + tv_weight * total_variation_l2(xj) + l2_weight * l2_norm_loss(xj)
    return loss
