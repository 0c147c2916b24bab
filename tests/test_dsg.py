import numpy as np
import pytest
import torch

from dfq.generation.bn_stats import BNInputStats
from dfq.generation.generators import DSGConfig, compute_margins, dsg_batch, extras_seed, init_images, probe_seed
from dfq.generation.losses import (
    dsg_loss,
    jitter,
    l2_norm_loss,
    label_loss,
    lse_weights,
    sda_loss_matrix,
    sda_margins,
    total_variation_l2,
    unbiased,
    zeroq_loss,
)


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
    x, info, margins = dsg_batch(tiny_bn, (4, 1, 8, 8), 5, DSGConfig(**cfg))
    x2, _, _ = dsg_batch(tiny_bn, (4, 1, 8, 8), 5, DSGConfig(**cfg))
    assert torch.equal(x, x2) and info["loss_end"] < info["loss_start"]
    assert len(margins["mean"]) == 2 and margins["eps"] == 0.9
    assert dsg_batch(tiny_bn, (4, 1, 8, 8), 5, DSGConfig(sda=False, **cfg))[2] is None


def test_eps_outside_unit_interval(tiny_bn):
    with pytest.raises(ValueError, match="eps=1.5"):
        sda_margins(forward_stats(tiny_bn, torch.randn(2, 1, 8, 8)), 1.5)


@pytest.mark.parametrize("probe", ["uniform", "init"])
def test_margin_probes(tiny_bn, probe):
    """uniform: a seeded U[0, 1) probe; init: the batch's own starting pixels."""
    shape = (6, 1, 8, 8)
    x0 = torch.rand(shape) * 3 - 1
    expected = torch.rand(shape, generator=torch.Generator().manual_seed(probe_seed(7))) if probe == "uniform" else x0
    deltas, gammas = compute_margins(tiny_bn, shape, 7, 0.8, False, probe=probe, x0=x0)
    ref_d, ref_g = sda_margins(forward_stats(tiny_bn, expected), 0.8)
    for a, b in zip(deltas + gammas, ref_d + ref_g):
        assert torch.equal(a, b)
    other_d, _ = compute_margins(tiny_bn, shape, 7, 0.8, False, probe="gaussian")
    assert not torch.equal(deltas[0], other_d[0])


def test_lse_tie_rule_of_the_official_code():
    """lse_tied=N: only samples j < N are tied, each to layer j itself; none past the last layer."""
    X = lse_weights(6, 3, 4.0, tied=4)
    assert X.tolist() == [[4, 1, 1], [1, 4, 1], [1, 1, 4], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert lse_weights(6, 3, 4.0, tied=2).tolist() == [[4, 1, 1], [1, 4, 1]] + [[1, 1, 1]] * 4
    assert lse_weights(5, 2, 2.0).tolist() == [[2, 1], [1, 2], [2, 1], [1, 2], [2, 1]]  # paper: j mod L


def test_extra_terms_hand_computed():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 7.0]]]])  # (1, 1, 2, 2)
    # right: 0-1, 3-7; down: 0-3, 1-7; anti-diagonal (1,0)-(0,1): 3-1; diagonal (0,0)-(1,1): 0-7
    tv = (1 + 16) ** 0.5 + (9 + 36) ** 0.5 + 2.0 + 7.0
    assert total_variation_l2(x).item() == pytest.approx(tv, rel=1e-6)
    two = torch.cat([x, 2 * x])
    assert l2_norm_loss(two).item() == pytest.approx(1.5 * (1 + 9 + 49) ** 0.5, rel=1e-6)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ce = (-2 + np.log(np.e**2 + 2) + np.log(3.0)) / 2
    assert label_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(ce, rel=1e-6)


def test_unbiased_std_matches_torch_var(tiny_bn):
    a = torch.randn(3, 4, 5, 5)
    s = torch.sqrt(a.var((2, 3), unbiased=False) + 1e-6)
    assert torch.allclose(unbiased(s, 25), torch.sqrt(a.var((2, 3)) + 1e-6), rtol=1e-5)
    x = torch.randn(4, 1, 8, 8)
    stats = forward_stats(tiny_bn, x)
    got = dsg_loss(x, stats, None, None, unbiased_std=True)
    with torch.no_grad():
        a1 = tiny_bn.conv1(x)
        a2 = tiny_bn.conv2(torch.relu(tiny_bn.bn1(a1)))
    ref = 0
    for a, bn in ((a1, tiny_bn.bn1), (a2, tiny_bn.bn2)):
        ref = ref + ((a.mean((2, 3)) - bn.running_mean) ** 2).sum(1)
        ref = ref + ((torch.sqrt(a.var((2, 3)) + 1e-6) - torch.sqrt(bn.running_var + bn.eps)) ** 2).sum(1)
    ref = ref + (x.mean((2, 3)) ** 2).sum(1) + ((torch.sqrt(x.var((2, 3)) + 1e-6) - 1) ** 2).sum(1)
    assert got.item() == pytest.approx(ref.mean().item(), rel=1e-5)


def test_code_recipe_with_every_extra_off_is_zeroq(tiny_bn):
    x = torch.randn(4, 1, 8, 8)
    stats = forward_stats(tiny_bn, x)
    logits = tiny_bn(x)
    labels = torch.tensor([0, 1, 2, 0])
    off = dsg_loss(
        x,
        stats,
        None,
        None,
        logits,
        labels=labels,
        label_weight=0.0,
        tv_weight=0.0,
        l2_weight=0.0,
        offset=5,
        unbiased_std=False,
    )
    assert off.item() == zeroq_loss(x, stats, logits).item()
    on = dsg_loss(
        x, stats, None, None, logits, labels=labels, label_weight=2.0, tv_weight=0.01, l2_weight=0.01, offset=3
    )
    rolled = torch.roll(x, (3, 3), (2, 3))
    extra = 2 * label_loss(logits, labels) + 0.01 * total_variation_l2(rolled) + 0.01 * l2_norm_loss(rolled)
    assert on.item() == pytest.approx((off + extra).item(), rel=1e-6)


@pytest.mark.parametrize("recipe", ["paper", "code"])
def test_dsg_batch_optimises_the_loss_it_claims(tiny_bn, recipe):
    """The first iteration's loss of dsg_batch equals the DSG loss assembled by hand from its margins, LSE
    weights and (code recipe) labels and jitter offset: DSG never silently runs as ZeroQ."""
    shape, seed = (4, 1, 8, 8), 11
    cfg = (
        dict(init="gaussian", margin_probe="gaussian", lse_weight=2.0)
        if recipe == "paper"
        else dict(
            init="uniform",
            margin_probe="init",
            lse_weight=4.0,
            lse_tied=3,
            label_weight=2.0,
            tv_weight=0.01,
            l2_weight=0.01,
            jitter=3,
            unbiased_std=True,
        )
    )
    _, info, saved = dsg_batch(tiny_bn, shape, seed, DSGConfig(iterations=1, lr=0.1, eps=0.9, **cfg))
    x0 = init_images(cfg["init"], shape, torch.Generator().manual_seed(seed))
    ub = cfg.get("unbiased_std", False)
    margins = compute_margins(tiny_bn, shape, seed, 0.9, False, probe=cfg["margin_probe"], x0=x0, unbiased_std=ub)
    assert all(torch.equal(a, b) for a, b in zip(saved["mean"], margins[0]))
    weights = lse_weights(4, 2, cfg["lse_weight"], cfg.get("lse_tied"))
    kw = dict(unbiased_std=ub)
    if recipe == "code":
        g = torch.Generator().manual_seed(extras_seed(seed))
        labels = torch.randint(3, (4,), generator=g)
        offset = int(torch.randint(-3, 3, (1,), generator=g))
        kw.update(labels=labels, label_weight=2.0, tv_weight=0.01, l2_weight=0.01, offset=offset)
    stats = forward_stats(tiny_bn, x0)
    logits = tiny_bn(x0)
    expected = dsg_loss(x0, stats, margins, weights, logits, **kw).item()
    assert info["loss_start"] == pytest.approx(expected, rel=1e-6)
    for wrong in (
        zeroq_loss(x0, stats).item(),
        dsg_loss(x0, stats, None, weights, logits, **kw).item(),
        dsg_loss(x0, stats, margins, None, logits, **kw).item(),
    ):
        assert info["loss_start"] != pytest.approx(wrong, rel=1e-6)


def test_jitter_rolls_by_the_offset_hand_computed():
    """jitter(x, k) moves pixel (i, j) to (i + k, j + k) mod the size: negative offsets move up and left."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert jitter(x, 1)[0, 0, 1, 1] == x[0, 0, 0, 0] and jitter(x, 1)[0, 0, 0, 0] == x[0, 0, 3, 3]
    assert jitter(x, -1)[0, 0, 0, 0] == x[0, 0, 1, 1] and jitter(x, -1)[0, 0, 3, 3] == x[0, 0, 0, 0]
    assert jitter(x, -2)[0, 0, 0, 1] == x[0, 0, 2, 3]
    assert jitter(x, 0) is x


def test_code_recipe_jitter_offsets_cover_minus_jitter_to_jitter(tiny_bn, monkeypatch):
    """Every iteration of a code-recipe batch draws a new offset, uniform on {-jitter, ..., jitter - 1}: over 300
    iterations with jitter 3, each of -3..2 is used (negatives included), nothing outside. The offsets are
    recorded by wrapping dfq.generation.losses.jitter, which still rolls the batch."""
    import dfq.generation.losses

    used = []
    roll = dfq.generation.losses.jitter

    def observed(x, offset):
        used.append(offset)
        return roll(x, offset)

    monkeypatch.setattr(dfq.generation.losses, "jitter", observed)
    dsg_batch(
        tiny_bn,
        (2, 1, 8, 8),
        4,
        DSGConfig(iterations=300, lr=0.05, sda=False, lse=False, tv_weight=0.01, l2_weight=0.01, jitter=3),
    )
    assert len(used) == 301  # 300 iterations and the final loss
    assert all(isinstance(k, int) for k in used)
    counts = {k: used.count(k) for k in set(used)}
    assert set(counts) == {-3, -2, -1, 0, 1, 2}, counts
    assert min(counts.values()) >= 25, counts  # about 50 each: a new draw per iteration, not a few repeated
