import pytest
import torch

from dfq.quant.fake_quant import QuantConv2d, fake_quantize, qparams_from_range, weight_qparams


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


def _independent_fake_quant_weight(w: torch.Tensor, bits: int, scheme: str = "asymmetric") -> torch.Tensor:
    """Per-output-channel min-max fake quantization of a weight, written out from the formulas in the
    quantizers.py docstring (range widened to contain 0; symmetric: signed levels, zero point 2^(b-1)),
    without any dfq function. Multiplying by 1 / s (float32) is what PyTorch's fused op does."""
    flat = w.detach().flatten(1).float()
    qmax = 2**bits - 1
    if scheme == "asymmetric":
        lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
    else:
        s = (flat.abs().max(1).values / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
        z = torch.full_like(s, 2 ** (bits - 1))
    s, z = s[:, None], z[:, None]
    q = torch.clamp(torch.round(flat * (1.0 / s)) + z, 0, qmax)
    return ((q - z) * s).view_as(w)


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_quant_conv_uses_quantized_weight(bits, scheme):
    """The layer's output is the convolution with an independently fake-quantized copy of conv.weight
    (a grid of the wrong width, range or rounding fails), and the weight takes at most 2^b levels."""
    from dfq.quant.fake_quant import QuantLinear

    torch.manual_seed(bits)
    conv = torch.nn.Conv2d(2, 3, 3, bias=True)
    with torch.no_grad():  # channels of very different ranges, one all positive, one all negative
        conv.weight.mul_(torch.tensor([0.1, 1.0, 10.0]).view(-1, 1, 1, 1))
        conv.weight[1].abs_()
        conv.weight[2].neg_().sub_(0.5)
    w_hat = _independent_fake_quant_weight(conv.weight, bits, scheme)
    assert not torch.allclose(w_hat, conv.weight, atol=1e-3)  # the quantization is visible
    q = QuantConv2d(conv, bits, scheme)
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, w_hat, conv.bias)
        assert torch.allclose(q.quantized_weight(), w_hat, rtol=0, atol=1e-6)
        assert torch.allclose(q(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(q.weight, conv.weight)  # the FP weight itself is kept
        for c in range(3):
            assert len(torch.unique(q.quantized_weight()[c])) <= 2**bits
    lin = torch.nn.Linear(6, 4)
    ql = QuantLinear(lin, bits, scheme)
    v = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(
            ql(v), v @ _independent_fake_quant_weight(lin.weight, bits, scheme).T + lin.bias, rtol=1e-5, atol=1e-5
        )


def test_symmetric_weights_are_signed_integers_with_zero_point_zero():
    from dfq.quant.fake_quant import weight_qparams

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
    from dfq.quant.fake_quant import AdaRoundWeight, weight_qparams

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


def _heavy_tailed_weight(seed: int = 0) -> torch.Tensor:
    """(16, 8, 3, 3): Laplace-distributed channels of different widths, as trained conv weights are."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(16, 8, 3, 3, generator=g) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1) by inversion
    return w * torch.logspace(-2, 0, 16).view(-1, 1, 1, 1)


def _levels(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (w.dim() - 1)
    return w / scale.view(shape) + zp.view(shape).float()


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_weight_range_lowers_weight_error_and_stays_on_grid(scheme, bits):
    w = _heavy_tailed_weight(bits)
    errors = {}
    for method in ("minmax", "mse"):
        scale, zp = weight_qparams(w, bits, scheme, method)
        wq = fake_quantize(w, scale, zp, bits, axis=0)
        q = _levels(wq, scale, zp)
        assert (q - q.round()).abs().max() < 1e-3 and q.min() > -1e-3 and q.max() < 2**bits - 1 + 1e-3
        errors[method] = (wq - w).square().flatten(1).sum(1)
    assert torch.all(errors["mse"] <= errors["minmax"])  # min-max is one of the candidates
    if bits <= 4:  # heavy tails on a coarse grid: clipping pays (measured 0.30-0.88 of min-max's error;
        # at 8 bits, 72 weights a channel, 0.92-1.0)
        assert errors["mse"].sum() < 0.95 * errors["minmax"].sum(), errors
    # a layer built with it fake-quantizes onto that grid, at most 2^b levels per channel
    conv = torch.nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = QuantConv2d(conv, bits, scheme, "mse")
    scale, zp = weight_qparams(w, bits, scheme, "mse")
    assert torch.equal(layer.weight_scale, scale) and torch.equal(layer.weight_zero_point, zp)
    with torch.no_grad():
        wq = layer.quantized_weight()
    assert all(len(torch.unique(wq[c])) <= 2**bits for c in range(16))


def test_mse_weight_range_is_the_brute_force_minimiser_per_channel():
    """Each channel's range is the alpha in 1, 0.99, ..., 0.21 (of its min and max) with the smallest
    squared error, computed here from the formulas alone, one channel and one alpha at a time."""
    w, bits = _heavy_tailed_weight(7), 4
    scale, zp = weight_qparams(w, bits, "asymmetric", "mse")
    for c in (0, 5, 15):
        row = w[c].flatten()
        best = None
        for i in range(80):
            alpha = 1.0 - 0.01 * i
            lo, hi = min(alpha * float(row.min()), 0.0), max(alpha * float(row.max()), 0.0)
            s = max((hi - lo) / 15, 1e-8)
            z = min(max(round(-lo / s), 0), 15)
            err = float(((torch.clamp(torch.round(row / s) + z, 0, 15) - z) * s - row).square().sum())
            if best is None or err < best[0] - 1e-9 * best[0]:
                best = (err, s, z)
        assert abs(float(scale[c]) - best[1]) < 1e-6 * best[1] and int(zp[c]) == best[2], (c, best)


def test_unknown_weight_range_names_the_param():
    with pytest.raises(ValueError, match="quantize.weight_range='l3'"):
        weight_qparams(torch.randn(4, 4), 4, "asymmetric", "l3")


@pytest.mark.parametrize("scheme,weight_range", [("asymmetric", "minmax"), ("symmetric", "mse")])
def test_set_weight_bits_regrids_like_a_fresh_layer(scheme, weight_range):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    layer = QuantConv2d(conv, 8, scheme, weight_range)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        layer(x)  # caches the 8-bit weight
        layer.set_weight_bits(3)
        fresh = QuantConv2d(conv, 3, scheme, weight_range)
        assert layer.weight_bits == 3 and torch.equal(layer.weight_scale, fresh.weight_scale)
        assert torch.equal(layer.weight_zero_point, fresh.weight_zero_point)
        assert torch.equal(layer(x), fresh(x))


def test_quantize_dequantize_gradient_is_torchs_straight_through():
    """The straight-through gradient of dfq's x / s fake quant equals torch's fused op's (a second
    implementation): 1 inside the grid, 0 where the value is clamped at either end."""
    from dfq.quant.fake_quant import quantize_dequantize

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(20000, generator=g) * 0.6).requires_grad_()
    quantize_dequantize(x, 0.05, 3, 15).sum().backward()
    ref = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(ref, 0.05, 3, 0, 15).sum().backward()
    assert torch.equal(x.grad, ref.grad)
    assert 0 < x.grad.sum() < len(x)  # both ends clipped somewhere, the middle passes


def test_keep_mask_is_a_seeded_bernoulli_at_its_resolution():
    from dfq.quant.fake_quant import keep_mask

    like = torch.empty(400_000)
    for p, exact in ((0.5, 0.5), (0.3, 77 / 256), (0.9, 230 / 256)):  # p on the 1/256 grid
        m = keep_mask(like, p)
        assert m.dtype == like.dtype and set(m.unique().tolist()) <= {0.0, 1.0}
        assert abs(float(m.mean()) - exact) < 0.003  # binomial std at 400k draws: <= 0.0008
    assert float(keep_mask(like, 0.0).sum()) == 0 and float(keep_mask(like, 1.0).mean()) == 1.0
    torch.manual_seed(3)
    a = keep_mask(torch.empty(5, 7), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask(torch.empty(5, 7), 0.5)) and a.shape == (5, 7)
    # neighbouring elements are independent: P(both kept) = p^2 for pairs within one 64-bit draw and across draws
    m = keep_mask(torch.empty(400_000), 0.5).reshape(-1, 8)
    for i, j in ((0, 1), (2, 3), (3, 4), (0, 7)):
        assert abs(float((m[:, i] * m[:, j]).mean()) - 0.25) < 0.006


@pytest.mark.parametrize("drop", [False, True])
def test_learnable_fake_quant_matches_torchs_op_and_where(drop):
    """Forward, input gradient and step gradient against torch's own learnable fake-quant op (with QDrop's
    kept elements through torch.where), on values inside and outside the grid."""
    from dfq.quant.fake_quant import _LearnableFakeQuant

    torch.manual_seed(0)
    x = (torch.randn(8, 4, 6, 6) * 1.5).requires_grad_(True)
    keep = (torch.rand_like(x) < 0.5).float() if drop else None
    s_ref, s_new = torch.tensor([0.13], requires_grad=True), torch.tensor([0.13], requires_grad=True)
    g, factor = torch.randn_like(x), 1.0 / (x.numel() * 15) ** 0.5
    ref = torch._fake_quantize_learnable_per_tensor_affine(x, s_ref, torch.tensor([6.0]), 0, 15, factor)
    if drop:
        ref = torch.where(keep.bool(), x, ref)
    ref.backward(g)
    gx_ref, x.grad = x.grad.clone(), None
    out = _LearnableFakeQuant.apply(x, s_new, torch.tensor(6.0), 15, factor, keep)
    out.backward(g)
    assert torch.equal(out, ref) and torch.equal(x.grad, gx_ref)
    assert torch.allclose(s_new.grad, s_ref.grad, rtol=1e-5, atol=0) and float(s_ref.grad) != 0
    clamped = ((x.detach() / 0.13).round() + 6 < 0) | ((x.detach() / 0.13).round() + 6 > 15)
    assert clamped.any() and not clamped.all()  # both branches of the gradient were exercised
