import torch

from dfq.generation.diversity import diagnose


def test_identical_samples_have_zero_spread_and_unit_cosine(tiny_bn):
    x = torch.randn(1, 1, 8, 8).repeat(6, 1, 1, 1)
    d = diagnose(tiny_bn, [x[:3], x[3:]])
    assert max(d["bn_spread"]) < 1e-5
    assert abs(d["feature_cosine"] - 1.0) < 1e-6 and d["images"] == 6


def test_spread_matches_direct_computation(tiny_bn):
    torch.manual_seed(0)
    x = torch.randn(10, 1, 8, 8) * torch.linspace(0.1, 3, 10).view(-1, 1, 1, 1)
    d = diagnose(tiny_bn, [x[:4], x[4:]])  # two batches: statistics over all 10 images
    with torch.no_grad():
        a1 = tiny_bn.conv1(x)
        a2 = tiny_bn.conv2(torch.relu(tiny_bn.bn1(a1)))
    assert len(d["bn_spread"]) == len(d["bn_offset"]) == 2
    for i, (a, bn) in enumerate(((a1, tiny_bn.bn1), (a2, tiny_bn.bn2))):
        m = a.mean((2, 3))  # (N, C) per-sample channel means of the BN input
        sigma = torch.sqrt(bn.running_var + bn.eps)
        spread = (m.std(0, unbiased=False) / sigma).mean().item()
        offset = ((m - bn.running_mean).abs() / sigma).mean().item()
        assert abs(d["bn_spread"][i] - spread) < 1e-5, i
        assert abs(d["bn_offset"][i] - offset) < 1e-5, i
    assert abs(d["bn_spread_mean"] - sum(d["bn_spread"]) / 2) < 1e-9
    assert d["bn_spread"][0] != d["bn_spread"][1]
    with torch.no_grad():
        feats = torch.relu(tiny_bn.bn2(a2)).mean((2, 3))
    f = torch.nn.functional.normalize(feats, dim=1)
    cos = f @ f.T
    expected = (cos.sum() - cos.diagonal().sum()) / (10 * 9)
    assert abs(d["feature_cosine"] - expected.item()) < 1e-5
