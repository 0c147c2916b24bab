"""Each observer against an independent computation over several calibration batches."""

import pytest
import torch

from dfq.quant.observers import EMAMinMaxObserver, MinMaxObserver, MSEObserver, PercentileObserver, make_observer


def _batches(seed=0):
    """Four batches of different location and scale, so that no single batch, no plain min/max and
    no pooled statistic gives the per-batch-averaged answers."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 50, generator=g) * s + m for s, m in ((1.0, 0.0), (3.0, 1.0), (0.5, -2.0), (2.0, 4.0))]


def test_minmax_over_batches():
    o = MinMaxObserver()
    o(torch.tensor([0.0, 1.0]))
    o(torch.tensor([-2.0, 0.5]))
    lo, hi = o.calculate_range(8)
    assert (lo.item(), hi.item()) == (-2.0, 1.0)
    xs = _batches()
    o = MinMaxObserver()
    for x in xs:
        o(x)
    lo, hi = o.calculate_range(4)
    assert lo.item() == min(x.min().item() for x in xs) and hi.item() == max(x.max().item() for x in xs)


def _ema(values, momentum):
    out = values[0]
    for v in values[1:]:
        out = momentum * out + (1 - momentum) * v  # the old value weighted by the momentum
    return out


@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.1])
def test_ema_weighs_the_old_range_by_the_momentum(momentum):
    xs = _batches()
    o = EMAMinMaxObserver(momentum=momentum)
    for x in xs:
        o(x)
    lo, hi = o.calculate_range(8)
    assert lo.item() == pytest.approx(_ema([x.min().item() for x in xs], momentum), rel=1e-5)
    assert hi.item() == pytest.approx(_ema([x.max().item() for x in xs], momentum), rel=1e-5)


def test_ema_first_batch_initialises():
    o = EMAMinMaxObserver(momentum=0.99)
    o(torch.tensor([-1.0, 4.0]))
    assert [t.item() for t in o.calculate_range(8)] == [-1.0, 4.0]
    o(torch.tensor([-3.0, 2.0]))  # 0.99 * old + 0.01 * new
    assert [t.item() for t in o.calculate_range(8)] == pytest.approx([-1.02, 3.98])


def _sorted_quantile(x, q):
    """The q-quantile of x as the element of rank round(q (n - 1)) in ascending order."""
    s = x.flatten().sort().values
    return s[int(round(q * (len(s) - 1)))]


def test_percentile_is_averaged_per_batch_and_clips_outliers():
    xs = []
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 2.0, 4.0):
        x = torch.rand(20_001, generator=g) * scale - 0.25 * scale
        x[:5] = torch.tensor([-1000.0, 1000.0, 500.0, -500.0, 300.0])  # outliers on both sides
        xs.append(x)
    o = PercentileObserver(99.9)
    for x in xs:
        o(x)
    lo, hi = o.calculate_range(8)
    exp_lo = sum(_sorted_quantile(x, 0.001) for x in xs) / len(xs)
    exp_hi = sum(_sorted_quantile(x, 0.999) for x in xs) / len(xs)
    assert lo.item() == pytest.approx(exp_lo.item(), rel=1e-5)
    assert hi.item() == pytest.approx(exp_hi.item(), rel=1e-5)
    # what a plain min/max, one batch or the pooled percentile would give is clearly different
    pooled = torch.cat(xs)
    for wrong_lo, wrong_hi in [
        (pooled.min(), pooled.max()),
        (_sorted_quantile(xs[-1], 0.001), _sorted_quantile(xs[-1], 0.999)),
        (_sorted_quantile(pooled, 0.001), _sorted_quantile(pooled, 0.999)),
    ]:
        assert abs(lo - wrong_lo) > 0.05 or abs(hi - wrong_hi) > 0.05


def _fake_quant_error(x, lo, hi, bits):
    """Squared error of x on the asymmetric grid over [min(lo, 0), max(hi, 0)], written out by hand."""
    qmax = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = max((hi - lo) / qmax, 1e-8)
    z = min(max(round(-lo / s), 0), qmax)
    xq = (torch.clamp(torch.round(x.double() / s) + z, 0, qmax) - z) * s
    return float((xq - x.double()).square().sum())


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_range_minimises_the_error_over_the_candidate_grid(bits):
    """Brute force over the documented candidates alpha * [min, max] of all batches, alpha = k / 100:
    the chosen range is one of them and its error summed over every batch is the smallest."""
    g = torch.Generator().manual_seed(bits)
    xs = [torch.randn(20_000, generator=g).abs() ** 3 * s - 0.1 * s for s in (1.0, 0.3, 2.0)]  # heavy tails
    o = MSEObserver()
    for x in xs:
        o(x)
    lo, hi = (t.item() for t in o.calculate_range(bits))
    mn, mx = min(x.min().item() for x in xs), max(x.max().item() for x in xs)
    errors = {k: sum(_fake_quant_error(x, mn * k / 100, mx * k / 100, bits) for x in xs) for k in range(1, 101)}
    k = round(hi / mx * 100)
    assert lo == pytest.approx(mn * k / 100, rel=1e-4) and hi == pytest.approx(mx * k / 100, rel=1e-4)
    best = min(errors.values())
    assert errors[k] <= best * (1 + 1e-4), (k, min(errors, key=errors.get))
    if bits <= 4:  # the long tail is clipped at low bits, and not at a percentile's place
        assert k < 80
        p999 = _sorted_quantile(torch.cat(xs), 0.999).item()
        assert abs(hi - p999) > 0.02 * mx


def test_make_observer_passes_its_params_through():
    xs = _batches()
    o = make_observer("ema", ema_momentum=0.1)
    for x in xs:
        o(x)
    assert o.calculate_range(8)[1].item() == pytest.approx(_ema([x.max().item() for x in xs], 0.1), rel=1e-5)
    x = torch.linspace(0, 1, 10_001)
    o = make_observer("percentile", percentile=90.0)
    o(x)
    lo, hi = o.calculate_range(8)
    assert lo.item() == pytest.approx(0.1, abs=1e-4) and hi.item() == pytest.approx(0.9, abs=1e-4)
    # the documented defaults: percentile 99.999, momentum 0.99
    o = make_observer("percentile")
    o(x)
    assert o.calculate_range(8)[1].item() == pytest.approx(0.99999, abs=1e-4)
    o = make_observer("ema")
    o(torch.tensor([0.0, 1.0]))
    o(torch.tensor([0.0, 2.0]))
    assert o.calculate_range(8)[1].item() == pytest.approx(1.01)
    assert isinstance(make_observer("minmax"), MinMaxObserver) and isinstance(make_observer("mse"), MSEObserver)


def test_unknown_method_names_the_param():
    with pytest.raises(ValueError, match="quantize.act_method='foo'"):
        make_observer("foo")


def test_dsg_range_rule_hand_made():
    """The official DSG code's rule: per-sample min/max averaged over the batch, running extreme over
    batches, starting from 0."""
    from dfq.quant.observers import make_observer

    obs = make_observer("dsg")
    b1 = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 9.0]])  # mins 1, 3 -> 2; maxs 5, 9 -> 7
    b2 = torch.tensor([[-4.0, 0.0, 1.0], [-2.0, 0.5, 3.0]])  # mins -4, -2 -> -3; maxs 1, 3 -> 2
    obs(b1)
    lo, hi = obs.calculate_range(4)
    assert (lo.item(), hi.item()) == (0.0, 7.0)  # lo starts at 0, not at 2
    obs(b2)
    lo, hi = obs.calculate_range(4)
    assert (lo.item(), hi.item()) == (-3.0, 7.0)
    # order of the batches does not matter (unlike ema), and it differs from plain min-max
    other = make_observer("dsg")
    other(b2), other(b1)
    assert [t.item() for t in other.calculate_range(4)] == [-3.0, 7.0]
    mm = make_observer("minmax")
    mm(b1), mm(b2)
    assert [t.item() for t in mm.calculate_range(4)] == [-4.0, 9.0]
