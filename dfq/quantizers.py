"""Quantizers and fake-quant modules (torch.ao naming), built on PyTorch's fused fake-quant ops.

Asymmetric uniform quantization with b bits: q = clamp(round(x / s) + z, 0, 2^b - 1) and
x_hat = (q - z) * s. The range [lo, hi] is widened to contain 0 so that zero is exact.
- weights: one (s, z) per output channel, min-max of the channel (ZeroQ/DSG protocol);
- activations: one (s, z) per tensor, range from a calibration observer (see observers.py).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

BITS_PATTERN = re.compile(r"^w([2-8])a([2-8])$")


def parse_bits(spec: str) -> tuple[int, int]:
    """'w4a8' -> (4, 8); weight and activation bits must each be in 2..8."""
    m = BITS_PATTERN.match(str(spec))
    if not m:
        raise ValueError(f"bits={spec!r} is invalid; expected 'w<B>a<B>' with B in 2..8, e.g. w8a8, w4a4")
    return int(m.group(1)), int(m.group(2))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the asymmetric grid covering [min(lo, 0), max(hi, 0)]."""
    qmax = 2**bits - 1
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale, zero_point, bits: int, axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` per tensor (axis None) or per channel along ``axis``."""
    qmax = 2**bits - 1
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, qmax)
    return torch.fake_quantize_per_channel_affine(
        x, scale.to(x.dtype), zero_point.to(torch.int32), axis, 0, qmax
    )


def weight_qparams(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric min-max quantization parameters of a conv/linear weight."""
    flat = weight.detach().flatten(1)
    return qparams_from_range(flat.min(1).values, flat.max(1).values, bits)


class _WeightFakeQuant:
    """Per-channel weight fake-quant, recomputed only when the weight or its qparams change: the
    quantized weight is cached against the tensors' version counters (in-place updates bump them),
    so inference does not pay for re-quantizing frozen weights on every batch."""

    def quantized_weight(self) -> torch.Tensor:
        key = (self.weight._version, self.weight_scale._version, self.weight_zero_point._version,
               self.weight.data_ptr())
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, self.weight_bits, axis=0)
        if getattr(self, "_wq_key", None) != key:
            with torch.no_grad():
                self._wq = fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, self.weight_bits, axis=0)
            self._wq_key = key
        return self._wq


class QuantConv2d(_WeightFakeQuant, nn.Conv2d):
    """A Conv2d whose weight is fake-quantized per output channel (asymmetric, min-max)."""

    def __init__(self, conv: nn.Conv2d, bits: int):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
        )
        self.load_state_dict(conv.state_dict())
        self.weight_bits = bits
        scale, zp = weight_qparams(self.weight, bits)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_WeightFakeQuant, nn.Linear):
    """A Linear whose weight is fake-quantized per output channel (asymmetric, min-max)."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.weight_bits = bits
        scale, zp = weight_qparams(self.weight, bits)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class ActFakeQuantize(nn.Module):
    """Per-tensor activation fake-quant. While ``observing``, it feeds its observer and passes x through;
    after ``freeze()`` it quantizes with the observed range."""

    def __init__(self, bits: int, observer: nn.Module):
        super().__init__()
        self.bits = bits
        self.observer = observer
        self.observing = True
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observer(x)
            return x
        key = (self.scale._version, self.zero_point._version, self.scale.data_ptr())
        if getattr(self, "_qp_key", None) != key:  # python scalars for the fused op, read once
            self._qp, self._qp_key = (float(self.scale), int(self.zero_point)), key
        return torch.fake_quantize_per_tensor_affine(x, self._qp[0], self._qp[1], 0, 2**self.bits - 1)

    def freeze(self) -> None:
        lo, hi = self.observer.calculate_range(self.bits)
        self.scale, self.zero_point = qparams_from_range(lo, hi, self.bits)
        self.calibrated.fill_(True)
        self.observing = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
