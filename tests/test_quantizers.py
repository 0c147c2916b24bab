import pytest
import torch

from dfq.quantizers import QuantConv2d, fake_quantize, parse_bits, qparams_from_range, weight_qparams


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_tensor_round_trip(bits):
    lo, hi = -1.3, 2.1
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits)
    assert torch.isclose(scale, torch.tensor((hi - lo) / (2**bits - 1)))
    x = torch.linspace(lo, hi, 1001)
    err = (fake_quantize(x, scale, zp, bits) - x).abs()
    assert err.max() <= scale / 2 + 1e-6
    # outside the grid's range values clamp to its ends
    grid_lo, grid_hi = (0 - zp) * scale, (2**bits - 1 - zp) * scale
    out = fake_quantize(torch.tensor([lo - 5.0, hi + 5.0]), scale, zp, bits)
    assert torch.allclose(out, torch.stack([grid_lo, grid_hi]).float())
    # zero is exactly representable
    assert fake_quantize(torch.zeros(1), scale, zp, bits).item() == 0.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_channel_weights(bits):
    torch.manual_seed(bits)
    w = torch.randn(5, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0]).view(-1, 1, 1, 1)
    scale, zp = weight_qparams(w, bits)
    assert scale.shape == (5,) and zp.shape == (5,)
    flat = w.flatten(1)
    expected = (flat.max(1).values.clamp(min=0) - flat.min(1).values.clamp(max=0)) / (2**bits - 1)
    assert torch.allclose(scale, expected)
    err = (fake_quantize(w, scale, zp, bits, axis=0) - w).abs().flatten(1)
    assert (err.max(1).values <= scale / 2 + 1e-6).all()
    assert scale[0] < scale[-1] / 100  # each channel gets its own scale


def test_quant_conv_uses_quantized_weight():
    conv = torch.nn.Conv2d(2, 3, 3, bias=True)
    q = QuantConv2d(conv, 4)
    x = torch.randn(1, 2, 5, 5)
    expected = torch.nn.functional.conv2d(x, q.quantized_weight(), conv.bias)
    assert torch.allclose(q(x), expected)
    assert len(torch.unique(q.quantized_weight()[0])) <= 16


@pytest.mark.parametrize("spec,expected", [("w8a8", (8, 8)), ("w4a8", (4, 8)), ("w2a2", (2, 2))])
def test_parse_bits(spec, expected):
    assert parse_bits(spec) == expected


@pytest.mark.parametrize("spec", ["w9a8", "w1a1", "8", "w4", "a4w4"])
def test_parse_bits_rejects(spec):
    with pytest.raises(ValueError, match="2..8"):
        parse_bits(spec)


def test_symmetric_weights_are_signed_integers_with_zero_point_zero():
    from dfq.quantizers import weight_qparams

    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3)
    for bits in (4, 8):
        scale, zp = weight_qparams(w, bits, "symmetric")
        assert torch.all(zp == 2 ** (bits - 1))
        q = torch.round(w.flatten(1) / scale[:, None])
        assert q.abs().max() <= 2 ** (bits - 1) - 1  # no clipping: the extreme weights are exact levels
        wq = fake_quantize(w, scale, zp, bits, axis=0)
        assert torch.allclose(wq.flatten(1).abs().amax(1), w.flatten(1).abs().amax(1), atol=1e-6)
    with pytest.raises(ValueError, match="weight scheme"):
        weight_qparams(w, 4, "power-of-two")


def test_adaround_h_in_unit_interval_starts_at_w_and_regulariser_binarises():
    from dfq.quantizers import AdaRoundWeight, weight_qparams

    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    scale, zp = weight_qparams(w, 4)
    ada = AdaRoundWeight(w, scale, zp, 4)
    h = ada.h()
    assert h.min() >= 0 and h.max() <= 1
    # the soft weight starts at W, clipped to the grid's range
    s4, z4 = scale.view(-1, 1, 1, 1), zp.view(-1, 1, 1, 1).float()
    assert torch.allclose(ada(), s4 * (torch.clamp(w / s4 + z4, 0, 15) - z4), atol=1e-3 * float(scale.max()))
    opt = torch.optim.Adam([ada.v], lr=0.05)
    before = ada.regularizer(2.0).item()
    for _ in range(400):
        opt.zero_grad()
        ada.regularizer(2.0).backward()
        opt.step()
    h = ada.h()
    assert h.min() >= 0 and h.max() <= 1
    assert ada.regularizer(2.0).item() < 1e-3 * before
    assert torch.all((h == 0) | (h == 1)), "the regulariser alone drives every h(V) to exactly 0 or 1"
