import pytest
import torch

from dfq.observers import EMAMinMaxObserver, MinMaxObserver, MSEObserver, PercentileObserver, make_observer


def test_minmax_over_batches():
    o = MinMaxObserver()
    o(torch.tensor([0.0, 1.0]))
    o(torch.tensor([-2.0, 0.5]))
    lo, hi = o.calculate_range(8)
    assert (lo.item(), hi.item()) == (-2.0, 1.0)


def test_ema_first_batch_initialises():
    o = EMAMinMaxObserver(momentum=0.5)
    o(torch.tensor([0.0, 4.0]))
    o(torch.tensor([0.0, 2.0]))
    assert o.calculate_range(8)[1].item() == pytest.approx(3.0)


def test_percentile_clips_outliers():
    x = torch.cat([torch.rand(100_000), torch.tensor([1000.0])])
    o = PercentileObserver(99.9)
    o(x)
    lo, hi = o.calculate_range(8)
    assert 0.99 < hi.item() < 1.0 and lo.item() < 0.01


def test_mse_clips_a_long_tail_at_low_bits():
    torch.manual_seed(0)
    x = torch.randn(200_000).abs() ** 3  # heavy tail
    o = MSEObserver()
    o(x)
    assert o.calculate_range(4)[1] < x.max() * 0.8
    assert o.calculate_range(8)[1] > o.calculate_range(4)[1]


def test_unknown_method_names_the_param():
    with pytest.raises(ValueError, match="quantize.act_method='foo'"):
        make_observer("foo")
