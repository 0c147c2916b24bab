import torch

from dfq.generation.bn_stats import BNInputStats
from dfq.generation.losses import image_prior_loss, layer_loss_matrix, zeroq_loss


def test_zeroq_loss_hand_computed():
    """One BN layer fed directly: 2 samples, 1 channel, 2x1 pixels, numbers small enough to do by hand."""
    bn = torch.nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0 - bn.eps)  # sigma = 2 exactly
    x = torch.tensor([[[[1.0], [3.0]]], [[[0.0], [0.0]]]])  # (2, 1, 2, 1)
    with BNInputStats(bn) as stats:
        bn(x)
    eps = 1e-6
    # sample 0: mean 2, std sqrt(1 + eps); sample 1: mean 0, std sqrt(eps)
    s0, s1 = (1 + eps) ** 0.5, eps**0.5
    layer = [(2 - 1) ** 2 + (s0 - 2) ** 2, (0 - 1) ** 2 + (s1 - 2) ** 2]
    image = [2**2 + (s0 - 1) ** 2, 0**2 + (s1 - 1) ** 2]  # image term: target mean 0, std 1
    expected = (layer[0] + image[0] + layer[1] + image[1]) / 2
    assert torch.allclose(layer_loss_matrix(stats)[:, 0], torch.tensor(layer), atol=1e-6)
    assert torch.allclose(image_prior_loss(x), torch.tensor(image), atol=1e-6)
    assert abs(zeroq_loss(x, stats).item() - expected) < 1e-5


def test_zeroq_loss_is_zero_at_the_targets(tiny_bn):
    # a BN layer whose running stats equal the per-sample stats of its input has zero layer loss
    bn = torch.nn.BatchNorm2d(2).eval()
    x = torch.tensor([[[[-1.0, 1.0]], [[2.0, 4.0]]]])  # means 0, 3; stds 1, 1
    bn.running_mean.copy_(torch.tensor([0.0, 3.0]))
    bn.running_var.copy_(torch.tensor([1.0 + 1e-6, 1.0 + 1e-6]) - bn.eps)
    with BNInputStats(bn) as stats:
        bn(x)
    assert layer_loss_matrix(stats).abs().max() < 1e-10
