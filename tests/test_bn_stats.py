import pytest
import torch

from dfq.generation.bn_stats import STD_EPS, BNInputStats, _BatchNormMoments, per_sample_stats, shifted_moments


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
    """On the CPU every BN layer's forward is BNInputStats' own inside the context (no hook added), on none after it
    (also after an exception); a layer the model already hooked is recorded and its hooks are left alone."""
    model = narrow_resnet()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 9
    own = bns[4].register_forward_pre_hook(lambda m, a: None)
    before = [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns]
    with BNInputStats(model) as stats:
        assert all("forward" in vars(bn) for bn in bns)
        assert [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns] == before
        model(torch.randn(2, 1, 16, 16))
        assert len(stats.means) == 9
    assert not any("forward" in vars(bn) for bn in bns)
    assert [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns] == before
    with pytest.raises(RuntimeError, match="boom"):
        with BNInputStats(model):
            raise RuntimeError("boom")
    assert not any("forward" in vars(bn) for bn in bns)
    assert [(len(bn._forward_pre_hooks), len(bn._forward_hooks)) for bn in bns] == before
    own.remove()
    assert all(not bn._forward_pre_hooks for bn in bns)


def test_a_layer_with_its_own_forward_gets_a_pre_hook(narrow_resnet):
    """A BN layer whose forward is already replaced (here by a plain callable) keeps it and is recorded by a
    forward pre-hook instead, removed on exit."""
    model = narrow_resnet()
    bn = model.stem[1]
    bn.forward = torch.nn.BatchNorm2d.forward.__get__(bn)
    with BNInputStats(model) as stats:
        assert len(bn._forward_pre_hooks) == 1
        x = torch.randn(2, 1, 16, 16)
        model(x)
        assert torch.allclose(stats.means[0], model.stem[0](x).mean((2, 3)), atol=1e-6)
    assert not bn._forward_pre_hooks and "forward" in vars(bn)


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


def _random_bn(channels: int, affine: bool) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(channels, affine=affine).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.05, 3)
    if affine:
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
        bn.requires_grad_(False)
    return bn


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_with_moments_is_bitwise_torchs_batch_norm_and_its_gradient(affine):
    """The fused node (BN forward + the input's moments, one backward) against torch's batch norm and the moments
    Function as two nodes: the BN output and its input gradient bitwise (16 x 28 x 28 runs the vectorised
    kernels), the moments' part against autograd of the plain mean / mean-of-squares in double."""
    torch.manual_seed(0)
    bn = _random_bn(16, affine)
    a = torch.randn(8, 16, 28, 28, requires_grad=True)
    shift, n = torch.randn(16), torch.full((16,), 28.0 * 28)
    invstd = (1 / torch.sqrt(bn.running_var.double() + bn.eps)).float()
    args = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, invstd)
    y, m1, m2 = _BatchNormMoments.apply(a, shift, n, *args)
    assert torch.equal(y, bn(a))
    gy = torch.randn_like(y)
    zero = torch.zeros_like(m1)
    g_bn = torch.autograd.grad((y, m1, m2), a, (gy, zero, zero))[0]
    assert torch.equal(g_bn, torch.autograd.grad(bn(a), a, gy)[0])  # torch's batch-norm backward, bit for bit
    g1, g2 = torch.randn_like(m1), torch.randn_like(m2)
    y, m1, m2 = _BatchNormMoments.apply(a, shift, n, *args)
    g = torch.autograd.grad((y, m1, m2), a, (gy, g1, g2))[0]
    ad = a.detach().double().requires_grad_(True)
    centred = ad - shift.double()[:, None, None]
    grads = (gy.double(), g1.double(), g2.double())
    ref = torch.autograd.grad((bn.double()(ad), centred.mean((2, 3)), centred.square().mean((2, 3))), ad, grads)[0]
    bn.float()
    assert torch.allclose(m1.double(), centred.mean((2, 3)), atol=1e-6)
    assert torch.allclose(m2.double(), centred.square().mean((2, 3)), rtol=1e-5)
    assert torch.allclose(g.double(), ref, rtol=1e-5, atol=1e-6)
    # and bitwise the sum autograd forms from torch's batch norm and the separate moments Function
    y_ref = bn(a)
    n1, n2 = shifted_moments([a], shift, n)
    assert torch.equal(g, torch.autograd.grad((y_ref, n1, n2), a, (gy, g1, g2))[0])


def test_cpu_generation_takes_the_fused_node_and_matches_the_hooks_bit_for_bit(narrow_resnet, monkeypatch):
    """ZeroQ images on the CPU with BN and moments fused equal those of the pre-hook path (torch's batch norm,
    moments as a second node), bit for bit; the fused node is the one that ran."""
    from dfq.generation import bn_stats
    from dfq.generation.generators import gaussian_batch, optimize_images
    from dfq.generation.losses import zeroq_loss

    calls = []
    original = bn_stats._BatchNormMoments.apply
    monkeypatch.setattr(bn_stats._BatchNormMoments, "apply", lambda *a: calls.append(1) or original(*a))
    x0 = gaussian_batch((6, 1, 16, 16), 0)
    kw = dict(iterations=5, lr=0.5, patience=100, min_lr=1e-4)
    fused, _ = optimize_images(narrow_resnet(), x0, zeroq_loss, **kw)
    assert len(calls) == 9 * 6  # 9 layers, 5 steps and the final loss
    monkeypatch.setattr(bn_stats.BNInputStats, "_fusable", staticmethod(lambda bn: False))
    hooked, _ = optimize_images(narrow_resnet(), x0, zeroq_loss, **kw)
    assert len(calls) == 9 * 6
    assert torch.equal(fused, hooked)


def test_layers_in_training_mode_or_with_weight_gradients_take_torchs_batch_norm(tiny_bn, monkeypatch):
    """A BN layer whose weights need gradients, in training mode (batch statistics, running ones updated) or on a
    float64 input runs its own forward: the weights get their gradients, and the recorded moments are its input's."""
    from dfq.generation import bn_stats

    fused = []
    original = bn_stats._BatchNormMoments.apply
    monkeypatch.setattr(bn_stats._BatchNormMoments, "apply", lambda *a: fused.append(a[0].shape[1]) or original(*a))
    x = torch.randn(4, 1, 8, 8)
    tiny_bn.bn2.requires_grad_(False)  # bn2 frozen: the fused node; bn1's weights need gradients: its own forward
    with BNInputStats(tiny_bn) as stats:
        tiny_bn(x).sum().backward()
        assert fused == [6]
        assert tiny_bn.bn1.weight.grad is not None and tiny_bn.bn1.bias.grad is not None
        assert torch.allclose(stats.means[0], tiny_bn.conv1(x).mean((2, 3)), atol=1e-6)
    tiny_bn.train()
    before = tiny_bn.bn2.running_mean.clone()
    with BNInputStats(tiny_bn) as stats, torch.no_grad():
        tiny_bn(x)
        assert fused == [6]
        assert not torch.equal(tiny_bn.bn2.running_mean, before)
        assert stats.means[1].shape == (4, 6)
    tiny_bn.eval().double()  # float64: torch's own batch norm too
    with BNInputStats(tiny_bn) as stats:
        tiny_bn(x.double())
        assert fused == [6]
        assert torch.allclose(stats.means[0], tiny_bn.conv1(x.double()).mean((2, 3)))


def test_the_fused_gradient_follows_a_changed_running_variance(tiny_bn):
    """Running statistics updated inside the context (by a training-mode pass, or edited in place) are those the next
    eval-mode gradient uses: bitwise torch's batch-norm gradient with the new variance."""
    bn = tiny_bn.bn2.requires_grad_(False)
    a = torch.randn(4, 6, 5, 5, requires_grad=True)
    gy = torch.randn(4, 6, 5, 5)
    with BNInputStats(tiny_bn):
        bn(a)
        bn.train()
        with torch.no_grad():
            bn(3 * a)
        bn.eval()
        g, trained = torch.autograd.grad(bn(a), a, gy)[0], bn.running_var.clone()
        bn.running_var.mul_(1.7)  # an in-place edit
        g_edited = torch.autograd.grad(bn(a), a, gy)[0]
    assert torch.equal(g_edited, torch.autograd.grad(bn(a), a, gy)[0])
    bn.running_var.copy_(trained)
    assert torch.equal(g, torch.autograd.grad(bn(a), a, gy)[0])
