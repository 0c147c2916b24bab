import numpy as np
import pytest
import torch

from dfq.bn_stats import BNInputStats
from dfq.generators import compute_margins, dsg_batch, plan_batches, probe_seed
from dfq.losses import dsg_loss, lse_weights, sda_loss_matrix, sda_margins, zeroq_loss


def forward_stats(model, x):
    with BNInputStats(model) as stats:
        model(x)
    return stats


@pytest.mark.parametrize("per_channel", [False, True])
def test_margins_are_the_eps_quantile_computed_by_hand(tiny_bn, per_channel):
    probe = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(probe_seed(42)))
    deltas, gammas = compute_margins(tiny_bn, (6, 1, 8, 8), 42, 0.9, per_channel)
    a1 = tiny_bn.conv1(probe)
    a2 = tiny_bn.conv2(torch.relu(tiny_bn.bn1(a1)))
    for i, (a, bn) in enumerate(zip((a1, a2), (tiny_bn.bn1, tiny_bn.bn2))):
        m = a.mean((2, 3)).detach().numpy()
        s = np.sqrt(a.var((2, 3), unbiased=False).detach().numpy() + 1e-6)
        dm = np.abs(m - bn.running_mean.numpy())
        ds = np.abs(s - np.sqrt(bn.running_var.numpy() + bn.eps))
        axis = 0 if per_channel else None
        np.testing.assert_allclose(deltas[i].numpy(), np.quantile(dm, 0.9, axis=axis), rtol=1e-5)
        np.testing.assert_allclose(gammas[i].numpy(), np.quantile(ds, 0.9, axis=axis), rtol=1e-5)


def test_sda_loss_zero_inside_margins_and_hinge_outside(tiny_bn):
    stats = forward_stats(tiny_bn, torch.randn(4, 1, 8, 8))
    big = ([torch.tensor(1e3)] * 2, [torch.tensor(1e3)] * 2)
    assert sda_loss_matrix(stats, *big).abs().max() == 0
    d, g = [torch.tensor(0.05), torch.tensor(0.1)], [torch.tensor(0.02), torch.tensor(0.3)]
    mat = sda_loss_matrix(stats, d, g)
    for i in range(2):
        rm = (stats.means[i] - stats.running_mean[i]).abs() - d[i]
        rs = (stats.stds[i] - stats.running_std[i]).abs() - g[i]
        expected = (rm.clamp(min=0) ** 2).sum(1) + (rs.clamp(min=0) ** 2).sum(1)
        assert torch.allclose(mat[:, i], expected)
        assert (rm > 0).any()  # the hinge is active somewhere


def test_dsg_without_sda_and_lse_is_zeroq_exactly(tiny_bn):
    x = torch.randn(4, 1, 8, 8)
    stats = forward_stats(tiny_bn, x)
    assert dsg_loss(x, stats, None, None).item() == zeroq_loss(x, stats).item()


@pytest.mark.parametrize("w", [2.0, 4.0])
def test_lse_scales_the_gradient_at_the_tied_layer(tiny_bn, w):
    x = torch.randn(4, 1, 8, 8)  # 4 samples, 2 BN layers: samples 0, 2 -> layer 0; 1, 3 -> layer 1
    grads = {}
    for lse in (False, True):
        stats = forward_stats(tiny_bn, x)
        means = stats.concatenated()[0]
        means.retain_grad()
        dsg_loss(x, stats, None, lse_weights(4, 2, w) if lse else None).backward()
        grads[lse] = list(means.grad.split([len(mu) for mu in stats.running_mean], 1))
    for j in range(4):
        for i in range(2):
            ratio = grads[True][i][j].norm() / grads[False][i][j].norm()
            assert ratio.item() == pytest.approx(w if i == j % 2 else 1.0, rel=1e-5)


def test_lse_weights_matrix():
    X = lse_weights(4, 2, 2.0)
    assert X.tolist() == [[2, 1], [1, 2], [2, 1], [1, 2]]


def test_dsg_batch_deterministic_with_margins(tiny_bn):
    cfg = dict(iterations=20, lr=0.1, eps=0.9)
    x, info, margins = dsg_batch(tiny_bn, (4, 1, 8, 8), 5, **cfg)
    x2, _, _ = dsg_batch(tiny_bn, (4, 1, 8, 8), 5, **cfg)
    assert torch.equal(x, x2) and info["loss_end"] < info["loss_start"]
    assert len(margins["mean"]) == 2 and margins["eps"] == 0.9
    assert dsg_batch(tiny_bn, (4, 1, 8, 8), 5, sda=False, **cfg)[2] is None


def test_eps_outside_unit_interval(tiny_bn):
    with pytest.raises(ValueError, match="eps=1.5"):
        sda_margins(forward_stats(tiny_bn, torch.randn(2, 1, 8, 8)), 1.5)


def test_dsg_batches_round_up_to_whole_multiples_of_the_bn_count():
    sizes, note = plan_batches("dsg", 100, 64, {"batch_multiple": 2}, 9)
    assert sizes == [18] * 6 and "rounded up to 108" in note
    assert plan_batches("zeroq", 100, 64, {}, 9) == ([64, 36], "")
