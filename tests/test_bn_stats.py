import pytest
import torch

from dfq.generation.bn_stats import STD_EPS, BNInputStats, per_sample_stats, shifted_moments


def test_per_sample_stats_match_direct_computation():
    a = torch.randn(3, 5, 7, 6)
    m, s = per_sample_stats(a)
    for b in range(3):
        for c in range(5):
            v = a[b, c].flatten()
            assert torch.isclose(m[b, c], v.mean(), atol=1e-6)
            assert torch.isclose(s[b, c], torch.sqrt(((v - v.mean()) ** 2).mean() + STD_EPS), atol=1e-6)


def test_hooks_capture_bn_inputs(tiny_bn):
    x = torch.randn(4, 1, 8, 8)
    with BNInputStats(tiny_bn) as stats:
        tiny_bn(x)
    a1 = tiny_bn.conv1(x)
    a2 = tiny_bn.conv2(torch.relu(tiny_bn.bn1(a1)))
    for i, a in enumerate((a1, a2)):
        assert torch.allclose(stats.means[i], a.mean((2, 3)), atol=1e-5)
        assert torch.allclose(stats.stds[i], torch.sqrt(a.var((2, 3), unbiased=False) + STD_EPS), atol=1e-5)
    bn = tiny_bn.bn2
    assert torch.allclose(stats.running_std[1], torch.sqrt(bn.running_var + bn.eps))
    assert torch.equal(stats.running_mean[1], bn.running_mean)


def test_hooks_are_removed(narrow_resnet):
    """One pre-hook on every BN layer inside the context, none on any layer after it (also after an
    exception), and the model's own hooks are left alone."""
    model = narrow_resnet()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 9
    own = bns[4].register_forward_pre_hook(lambda m, a: None)
    before = [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns]
    with BNInputStats(model) as stats:
        assert [len(bn._forward_pre_hooks) for bn in bns] == [n + 1 for n, _ in before]
        model(torch.randn(2, 1, 16, 16))
        assert len(stats.means) == 9
    assert [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns] == before
    with pytest.raises(RuntimeError, match="boom"):
        with BNInputStats(model):
            raise RuntimeError("boom")
    assert [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns] == before
    own.remove()
    assert all(not bn._forward_pre_hooks for bn in bns)


def test_model_without_bn_gets_clear_error():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNInputStats(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU()))


def test_fused_moments_gradients_match_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 5, 6, dtype=torch.double, requires_grad=True)
    shift = torch.randn(4, dtype=torch.double)
    m, s = per_sample_stats(a, shift)
    flat = a.flatten(2)
    m_ref = flat.mean(2)
    s_ref = torch.sqrt(flat.var(2, unbiased=False) + STD_EPS)
    assert torch.allclose(m, m_ref) and torch.allclose(s, s_ref)
    w1, w2 = torch.randn_like(m), torch.randn_like(s)
    g = torch.autograd.grad((w1 * m + w2 * s).sum(), a)[0]
    g_ref = torch.autograd.grad((w1 * m_ref + w2 * s_ref).sum(), a)[0]
    assert torch.allclose(g, g_ref, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: per_sample_stats(t, shift), (a,))


def test_moments_of_several_layers_at_once():
    """One Function call for layers of different widths and sizes: values and gradients (gradcheck)."""
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(5, dtype=torch.float64)
    m1, m2 = shifted_moments([a, b], shift)
    ya, yb = a - shift[:3, None, None], b - shift[3:, None, None]
    assert torch.allclose(m1, torch.cat([ya.mean((2, 3)), yb.mean((2, 3))], 1))
    assert torch.allclose(m2, torch.cat([ya.square().mean((2, 3)), yb.square().mean((2, 3))], 1))
    assert torch.autograd.gradcheck(lambda a, b: shifted_moments([a, b], shift), (a, b))


def test_stats_release_the_recorded_inputs_once_computed(tiny_bn):
    with BNInputStats(tiny_bn) as stats:
        tiny_bn(torch.randn(4, 1, 8, 8))
        assert all(r is not None for r in stats._recorded)
        m = stats.means
        assert all(r is None for r in stats._recorded)  # the autograd graph holds them, not the hooks
        assert [t.shape[1] for t in m] == [4, 6] and stats.concatenated()[0].shape == (4, 10)
