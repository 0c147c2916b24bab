"""Calibration observers (torch.ao naming): they watch activations and choose a clipping range.

- ``minmax``: the smallest and largest value seen over all calibration batches.
- ``ema``: min and max of each batch, smoothed with an exponential moving average whose first batch
  initialises the range: torch.ao's MovingAverageMinMaxObserver (averaging constant 0.01 = momentum
  0.99), the observer of PyTorch's default QAT qconfig. Over a few calibration batches the first one
  dominates (momentum 0.99, 4 batches: 97 %), so the range depends on file order.
- ``dsg``: the official DSG code's rule (its flag is named "ema", but there is no momentum): each
  sample's min and max, averaged over the batch, then the running extreme over batches, starting from 0.
- ``percentile``: the p-th and (100 - p)-th percentile of each batch (default p = 99.999), averaged
  over batches.
- ``mse``: the clipping range, among ``num_candidates`` shrinkings of the min-max range, that
  minimises the squared quantization error summed over all calibration batches.
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass
from torch import nn

from dfq.quant.fake_quant import fake_quantize, qparams_from_range

ACT_METHODS = ("minmax", "ema", "dsg", "percentile", "mse")


class Observer(nn.Module):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def forward(self, x: torch.Tensor) -> None:
        self.batches += 1
        self.observe(x.detach().float())

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def calculate_range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches == 0:
            raise RuntimeError(f"{type(self).__name__} saw no data: this activation was never reached")
        return self.range(bits)

    def range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    def __init__(self):
        super().__init__()
        self.lo, self.hi = torch.tensor(float("inf")), torch.tensor(float("-inf"))

    def observe(self, x):
        self.lo = torch.minimum(self.lo, x.min())
        self.hi = torch.maximum(self.hi, x.max())

    def range(self, bits):
        return self.lo, self.hi


class EMAMinMaxObserver(Observer):
    def __init__(self, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.lo = self.hi = None

    def observe(self, x):
        lo, hi = x.min(), x.max()
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.momentum * self.lo + (1 - self.momentum) * lo
            self.hi = self.momentum * self.hi + (1 - self.momentum) * hi

    def range(self, bits):
        return self.lo, self.hi


class DSGRangeObserver(Observer):
    """lo = min(0, min over batches of mean_b min(x_b)), hi = max(0, max over batches of mean_b max(x_b))."""

    def __init__(self):
        super().__init__()
        self.lo, self.hi = torch.tensor(0.0), torch.tensor(0.0)

    def observe(self, x):
        per_sample = x.flatten(1)
        self.lo = torch.minimum(self.lo, per_sample.amin(1).mean())
        self.hi = torch.maximum(self.hi, per_sample.amax(1).mean())

    def range(self, bits):
        return self.lo, self.hi


def _kth(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0..1) of a 1-D tensor by kthvalue (torch.quantile caps the input size)."""
    k = min(max(int(round(q * (flat.numel() - 1))) + 1, 1), flat.numel())
    return flat.kthvalue(k).values


class PercentileObserver(Observer):
    def __init__(self, percentile: float = 99.999):
        super().__init__()
        self.q = percentile / 100.0
        self.lo_sum = torch.tensor(0.0)
        self.hi_sum = torch.tensor(0.0)

    def observe(self, x):
        flat = x.flatten()
        self.lo_sum = self.lo_sum + _kth(flat, 1.0 - self.q)
        self.hi_sum = self.hi_sum + _kth(flat, self.q)

    def range(self, bits):
        return self.lo_sum / self.batches, self.hi_sum / self.batches


class MSEObserver(Observer):
    """Grid search over ranges alpha * [min, max], alpha in (0, 1]: the overall min-max range of all
    batches fixes the grid, and every candidate is scored on every batch seen (each batch kept, a
    seeded subsample of at most one million values per batch)."""

    def __init__(self, num_candidates: int = 100):
        super().__init__()
        self.num_candidates = num_candidates
        self.samples: list[torch.Tensor] = []
        self.lo, self.hi = torch.tensor(float("inf")), torch.tensor(float("-inf"))

    def observe(self, x):
        self.lo = torch.minimum(self.lo, x.min())
        self.hi = torch.maximum(self.hi, x.max())
        flat = x.flatten()
        if flat.numel() > 1_000_000:  # bounded memory: a seeded subsample of large activations
            g = torch.Generator().manual_seed(self.batches)
            flat = flat[torch.randint(0, flat.numel(), (1_000_000,), generator=g)]
        self.samples.append(flat)

    def range(self, bits):
        best, best_err = None, None
        for alpha in torch.linspace(1.0 / self.num_candidates, 1.0, self.num_candidates):
            lo, hi = self.lo * alpha, self.hi * alpha
            scale, zp = qparams_from_range(lo, hi, bits)
            err = sum((fake_quantize(s, scale, zp, bits) - s).square().sum() for s in self.samples)
            if best_err is None or err < best_err:
                best, best_err = (lo, hi), err
        return best


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class ObserverConfig:
    """The activation range rule of calibration and its two knobs."""

    act_method: str = "minmax"  # minmax | ema | dsg (the DSG code's rule) | percentile | mse
    percentile: float = Field(99.999, gt=50, le=100)
    ema_momentum: float = Field(0.99, ge=0, lt=1)

    @field_validator("act_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in ACT_METHODS:
            raise ValueError(f"unknown act_method {v!r}; allowed: {', '.join(ACT_METHODS)}")
        return v

    def make(self) -> "Observer":
        """A fresh observer (one per activation quantizer)."""
        return make_observer(self.act_method, percentile=self.percentile, ema_momentum=self.ema_momentum)


def make_observer(method: str, *, percentile: float = 99.999, ema_momentum: float = 0.99) -> Observer:
    if method == "minmax":
        return MinMaxObserver()
    if method == "ema":
        return EMAMinMaxObserver(ema_momentum)
    if method == "dsg":
        return DSGRangeObserver()
    if method == "percentile":
        return PercentileObserver(percentile)
    if method == "mse":
        return MSEObserver()
    raise ValueError(f"quantize.act_method={method!r} is unknown; allowed: {', '.join(ACT_METHODS)}")
