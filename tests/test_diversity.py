import torch

from dfq.diversity import diagnose


def test_identical_samples_have_zero_spread_and_unit_cosine(tiny_bn):
    x = torch.randn(1, 1, 8, 8).repeat(6, 1, 1, 1)
    d = diagnose(tiny_bn, [x[:3], x[3:]])
    assert max(d["bn_spread"]) < 1e-5
    assert abs(d["feature_cosine"] - 1.0) < 1e-6 and d["images"] == 6


def test_spread_matches_direct_computation(tiny_bn):
    torch.manual_seed(0)
    x = torch.randn(10, 1, 8, 8) * torch.linspace(0.1, 3, 10).view(-1, 1, 1, 1)
    d = diagnose(tiny_bn, [x])
    m = tiny_bn.conv1(x).mean((2, 3))
    sigma = torch.sqrt(tiny_bn.bn1.running_var + tiny_bn.bn1.eps)
    assert abs(d["bn_spread"][0] - (m.std(0, unbiased=False) / sigma).mean().item()) < 1e-5
    feats = torch.relu(tiny_bn.bn2(tiny_bn.conv2(torch.relu(tiny_bn.bn1(tiny_bn.conv1(x)))))).mean((2, 3))
    f = torch.nn.functional.normalize(feats, dim=1)
    cos = f @ f.T
    expected = (cos.sum() - cos.diagonal().sum()) / (10 * 9)
    assert abs(d["feature_cosine"] - expected.item()) < 1e-5
