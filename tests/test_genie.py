"""Genie-D (dfq.generation.genie): the generator, swing convolution, Genie's batch-statistics loss, one batch of
genie and genie_dsg as the generate stage makes them. Expected values are hand-computed or come from a second
implementation (torch.std_mean over the hooked BN inputs), never from the code under test."""

import math

import pytest
import torch
from torch import nn

from dfq.fp32.models import build_model
from dfq.generation.bn_stats import BNInputStats
from dfq.generation.genie import (
    Generator,
    GenieConfig,
    GenieDSGConfig,
    Swing,
    batch_stats,
    genie_batch,
    genie_loss,
    genie_sigma,
    swing,
    swing_modules,
)
from dfq.generation.sources import generate_batch, source_config


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 30, 18)])
def test_generator_output_has_the_image_shape_and_unit_batch_statistics(shape):
    torch.manual_seed(0)
    gen = Generator(shape, latent_dim=16, width=8).train()
    x = gen(torch.randn(10, 16))
    assert x.shape == (10, *shape)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(shape[0]), atol=1e-5)
    assert torch.allclose(var, torch.ones(shape[0]), atol=1e-3)  # BN's eps 1e-5 in the denominator


def test_swing_by_one_one_is_the_plain_conv_and_other_shifts_translate_with_reflection():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 8)
    assert torch.equal(conv(swing(x, 1, 1)), conv(x))
    for dy in range(3):
        for dx in range(3):
            assert conv(swing(x, dy, dx)).shape == conv(x).shape == (2, 5, 5, 4)
    # (0, 0): the image moves one pixel down and right; the new first row/column mirror the second ones
    s = swing(x, 0, 0)
    assert torch.equal(s[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert torch.equal(s[:, :, 0, 1:], x[:, :, 1, :-1]) and torch.equal(s[:, :, 1:, 0], x[:, :, :-1, 1])
    # (2, 2): one pixel up and left
    s = swing(x, 2, 2)
    assert torch.equal(s[:, :, :-1, :-1], x[:, :, 1:, 1:])


def _shifts(seed, calls=40):
    conv = nn.Conv2d(1, 1, 3, stride=2)
    seen = []
    conv.register_forward_hook(lambda m, a, out: seen.append(a[0].clone()))  # after the swing pre-hook
    x = torch.arange(36.0).view(1, 1, 6, 6)
    with Swing([conv], torch.Generator().manual_seed(seed)):
        for _ in range(calls):
            conv(x)
    # recover (dy, dx) from where x's pixel (2, 2) landed
    return [tuple(int(v) for v in (s[0, 0] == 14).nonzero()[0]) for s in seen]


def test_swing_draws_its_shifts_from_the_seed():
    a, b, c = _shifts(3), _shifts(3), _shifts(4)
    assert a == b and a != c
    assert set(a) <= {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)}
    assert len(set(a)) > 4  # 40 draws over 9 shifts


def test_swing_modules_are_the_strided_convs_and_optionally_the_strided_shortcuts(narrow_resnet):
    r20 = build_model("cifar_resnet20", 10)
    convs = swing_modules(r20, False, (2, 3, 32, 32))
    assert [type(m).__name__ for m in convs] == ["Conv2d", "Conv2d"]
    assert {m for m in convs} == {r20.layer2[0].conv1, r20.layer3[0].conv1}
    both = swing_modules(r20, True, (2, 3, 32, 32))
    assert {id(m) for m in both} == {id(m) for m in (*convs, r20.layer2[0].shortcut, r20.layer3[0].shortcut)}
    fm = narrow_resnet()  # 1x1-conv shortcuts: stride-2 3x3 and 1x1 convs, nothing else
    strided = [m for m in fm.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 4 and swing_modules(fm, True, (2, 1, 16, 16)) == strided


class _OneBN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x).mean((2, 3))


def test_genie_loss_equals_a_hand_computed_value():
    """BN input = the image: batch [[0, 2]], [[4, 6]] (2 images, 1 channel, 1 x 2 pixels). Batch mean 3,
    unbiased std sqrt(20 / 3); targets mu 1, sigma sqrt(running_var + 1e-6) = 2. Prior: image means 1 and 5,
    unbiased stds sqrt(2) each."""
    model = _OneBN(1).double().eval()
    model.bn.running_mean.fill_(1.0)
    model.bn.running_var.fill_(4.0 - 1e-6)
    x = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 6.0]]]], dtype=torch.float64)
    with BNInputStats(model) as stats:
        model(x)
        loss = genie_loss(x, stats, genie_sigma(stats)).item()
    expected = (3 - 1) ** 2 + (math.sqrt(20 / 3) - 2) ** 2 + (1 + 25) / 2 + (math.sqrt(2) - 1) ** 2
    assert loss == pytest.approx(expected, rel=1e-12)


def _hooked_inputs(model):
    got = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, a: got.append(a[0]))
    return got


def test_batch_statistics_equal_std_mean_over_the_bn_inputs_and_the_loss_is_zero_when_they_match(narrow_resnet):
    model = narrow_resnet().double()
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)  # the input prior is 0 too
    inputs = _hooked_inputs(model)
    with BNInputStats(model) as stats:
        model(x)
        mean, std = batch_stats(stats)
        direct = [torch.std_mean(a, dim=(0, 2, 3)) for a in inputs]
        assert torch.allclose(mean, torch.cat([m for _, m in direct]), atol=1e-12)
        assert torch.allclose(std, torch.cat([s for s, _ in direct]), atol=1e-10)
        assert genie_loss(x, stats, genie_sigma(stats)).item() > 0.01
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):  # in order: a layer's running statistics change the later layers' inputs
            inputs.clear()
            model(x)
            s, m = torch.std_mean(inputs[i], dim=(0, 2, 3))
            bn.running_mean.copy_(m)
            bn.running_var.copy_(s.square() - 1e-6)
    with BNInputStats(model) as stats:
        model(x)
        assert genie_loss(x, stats, genie_sigma(stats)).item() < 1e-18


@pytest.mark.parametrize("generator", [True, False])
def test_one_generation_step_lowers_the_loss(narrow_resnet, generator):
    cfg = GenieConfig(iterations=2, generator=generator, latent_dim=8, width=8, swing=False)
    _, info, _ = genie_batch(narrow_resnet(), (8, 1, 16, 16), 5, cfg)
    assert info["loss_end"] < info["loss_start"]


def test_a_batch_depends_on_its_seed_only_and_the_model_is_left_as_found(narrow_resnet):
    model = narrow_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = source_config("genie", {"iterations": 3, "latent_dim": 8, "width": 8})
    a, info, extras = generate_batch("genie", model, (6, 1, 16, 16), 11, cfg)
    b, _, _ = generate_batch("genie", model, (6, 1, 16, 16), 11, cfg)
    c, _, _ = generate_batch("genie", model, (6, 1, 16, 16), 12, cfg)
    assert torch.equal(a, b) and not torch.equal(a, c) and extras is None
    assert info["swing_modules"] == 4 and info["iterations"] == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())  # swing and BN hooks removed


def test_genie_dsg_saves_its_margins_and_differs_from_genie(narrow_resnet):
    model = narrow_resnet()
    kw = {"iterations": 3, "latent_dim": 8, "width": 8}
    cfg = source_config("genie_dsg", kw)
    assert isinstance(cfg, GenieDSGConfig) and cfg.sda and cfg.lse
    x, _, margins = generate_batch("genie_dsg", model, (6, 1, 16, 16), 11, cfg)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # stem, 3 blocks x 2, 2 shortcuts: 9
    assert len(margins["mean"]) == len(margins["std"]) == bns == 9 and margins["probe"] == "gaussian"
    y, _, _ = generate_batch("genie", model, (6, 1, 16, 16), 11, source_config("genie", kw))
    assert not torch.equal(x, y)
    for unused in ("statistics", "std_eps"):  # Genie's batch loss only: genie_dsg refuses them
        with pytest.raises(Exception, match=unused):
            source_config("genie_dsg", {unused: "batch" if unused == "statistics" else 1e-5})
    with pytest.raises(Exception, match="lr_g"):
        source_config("genie", {"lr_g": 0.1})
