"""Quantizers and fake-quant modules (torch.ao naming), built on PyTorch's fused fake-quant ops.

Uniform quantization with b bits: q = clamp(round(x / s) + z, 0, 2^b - 1) and x_hat = (q - z) * s.
The range [lo, hi] is widened to contain 0 so that zero is exact.
- weights: one (s, z) per output channel from the channel's min-max; asymmetric, or symmetric with
  z = 2^(b-1) and s = max|w| / (2^(b-1) - 1), i.e. signed b-bit integers with zero point 0 (INT8-exportable);
  range ``minmax`` (the whole channel), or ``mse``: per channel, the clipping range among 80 shrinkings
  alpha * range, alpha = 1, 0.99, ..., 0.21, with the least squared error of the quantized channel
  (BRECQ/Genie search each channel's range before rounding; min-max is a candidate, so never worse);
- activations: one (s, z) per tensor, range from a calibration observer (see observers.py);
- AdaRound (Nagel et al. 2020): weights rounded up or down by a learned h(V) in [0, 1] instead of to
  the nearest grid point (``AdaRoundWeight``; the reconstruction loops are in reconstruction.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the asymmetric grid covering [min(lo, 0), max(hi, 0)]."""
    qmax = 2**bits - 1
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale, zero_point, bits: int, axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` per tensor (axis None) or per channel along ``axis``.

    Args:
        x: the tensor to quantize-dequantize.
        scale: step size: a float (or 0-d tensor) per tensor, a 1-D tensor of x.shape[axis] entries per channel.
        zero_point: integer zero point(s) in [0, 2^bits - 1], shaped as ``scale``.
        bits: bit-width; the integer grid is 0 .. 2^bits - 1.
        axis: the channel axis for per-channel quantization; None: per tensor.
    """
    qmax = 2**bits - 1
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.to(x.dtype), zero_point.to(torch.int32), axis, 0, qmax)


def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """Per-tensor fake quant as ONNX QuantizeLinear computes it: q = clamp(round(x / s) + z, 0, qmax), rounding
    half to even, then (q - z) s. torch's fused op rounds x * (1 / s) instead, which lands on another code at
    some ties (a few in a million random inputs; more often on integer-engine outputs, which sit on a grid), so
    the exported integer model would differ from this one there. On the CPU this form is also ~10x faster
    than torch's fused op. Gradient: straight-through inside the grid, zero where clamped (as torch's op)."""
    q = torch.round(x.detach() / scale)
    out = q.clamp_(-zero_point, qmax - zero_point).mul_(scale)
    if torch.is_grad_enabled() and x.requires_grad:
        inside = (x.detach() / scale).round_().add_(zero_point)
        mask = (inside >= 0) & (inside <= qmax)
        out = out + (x - x.detach()) * mask
    return out


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 float tensor shaped like ``like``, each element 1 with probability ``p`` rounded to a multiple of
    1/256 (0.5 exactly), independently, from torch's global generator (on ``like``'s device).

    Each element takes 8 random bits of 64-bit draws, a quarter of the generator's 32-bit draws of
    ``rand_like < p`` (0.32 instead of 1.48 ms for 0.5 M elements on the 2-core CPU), and the mask stays float:
    ``lerp`` and products apply it at vector speed, where on the CPU ``where`` with a bool mask and the comparison
    making it are not vectorised (docs/benchmark.md, "Reconstruction")."""
    n = like.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    v = bits.view(torch.uint8)[:n].reshape(like.shape).to(like.dtype)  # uniform on 0 .. 255
    threshold = round(p * 256)  # element kept iff v < threshold, i.e. threshold - v >= 1
    return v.sub_(threshold).neg_().clamp_(0, 1)


class _LearnableFakeQuant(torch.autograd.Function):
    """Per-tensor fake quant with a learned step (LSQ, Esser et al. 2020), optionally with QDrop's kept elements,
    in one autograd node. Forward and both gradients are those of torch's
    ``_fake_quantize_learnable_per_tensor_affine``: x_hat = (clamp(round(x / s) + z, 0, qmax) - z) s, computed
    as x * (1 / s) as torch's kernel does; dx_hat/dx = 1 inside the grid, 0 where clamped; dx_hat/ds =
    round(x / s) - x / s inside, clamp bound - z outside; the step's gradient times ``grad_factor``. Where
    ``keep`` is 1 the output is x itself (gradient 1 to x, none to s). Float element-wise ops only: on the CPU
    torch's fused fake-quant kernels and ``where`` are not vectorised (docs/benchmark.md, "Reconstruction").
    zero_point: a 0-d tensor (no host sync on a GPU); qmax: the grid's top integer; keep: a ``keep_mask`` or None."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, grad_factor: float, keep):
        xs = x * (1.0 / scale)
        r = torch.round(xs).add_(zero_point)
        q = r.clamp(0, qmax)
        inside = r.sub_(q).abs_().clamp_(max=1).neg_().add_(1)  # 1 where round(x / s) + z is on the grid
        q.sub_(zero_point)
        dscale = torch.addcmul(q, inside, xs, value=-1)  # inside: round(x / s) - x / s; outside: bound - z
        xq = q.mul_(scale)
        if keep is None:
            out, passed = xq, inside
        else:
            out = torch.lerp(xq, x, keep)  # exact at weights 0 and 1: xq, x
            passed = torch.maximum(keep, inside)
            dscale = torch.addcmul(dscale, dscale, keep, value=-1)  # kept elements do not see s
        ctx.save_for_backward(passed, dscale)
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):
        passed, dscale = ctx.saved_tensors
        grad_scale = (grad * dscale).sum().mul_(ctx.grad_factor).reshape(1)
        return grad * passed, grad_scale, None, None, None, None


WEIGHT_SCHEMES = ("asymmetric", "symmetric")
WEIGHT_RANGES = ("minmax", "mse")
RANGE_SHRINKS = 1.0 - 0.01 * torch.arange(80)  # mse candidates: alpha = 1, 0.99, ..., 0.21


def _channel_grid(flat: torch.Tensor, bits: int, scheme: str, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero point) of the grid covering alpha times each row's min-max range."""
    if scheme == "asymmetric":
        return qparams_from_range(alpha * flat.min(1).values, alpha * flat.max(1).values, bits)
    if scheme != "symmetric":
        raise ValueError(f"weight scheme {scheme!r} is unknown; allowed: {', '.join(WEIGHT_SCHEMES)}")
    half = 2 ** (bits - 1)
    scale = torch.clamp(alpha * flat.abs().max(1).values / (half - 1), min=1e-8)
    return scale, torch.full_like(scale, half, dtype=torch.int32)


def weight_qparams(
    weight: torch.Tensor, bits: int, scheme: str = "asymmetric", method: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel quantization parameters of a conv/linear weight: the channel's min-max range
    (``minmax``), or the shrunk range with the least squared quantization error per channel (``mse``)."""
    if method not in WEIGHT_RANGES:
        raise ValueError(f"quantize.weight_range={method!r} is unknown; allowed: {', '.join(WEIGHT_RANGES)}")
    flat = weight.detach().flatten(1).float()
    scale, zp = _channel_grid(flat, bits, scheme)
    if method == "minmax":
        return scale, zp
    best = (fake_quantize(flat, scale, zp, bits, axis=0) - flat).square().sum(1)
    for alpha in RANGE_SHRINKS[1:].tolist():
        s, z = _channel_grid(flat, bits, scheme, alpha)
        err = (fake_quantize(flat, s, z, bits, axis=0) - flat).square().sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zp = torch.where(better, s, scale), torch.where(better, z, zp)
    return scale, zp


class AdaRoundWeight(nn.Module):
    """AdaRound's learnable rounding of one layer's weight W on its per-channel grid (s, z).

    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) with zeta = 1.1, gamma = -0.1 (rectified
    sigmoid), V initialised so that h(V) equals the fractional part of W / s (the soft weight starts
    at W itself). W_soft = s (clip(floor(W / s) + h(V) + z, 0, 2^b - 1) - z); after ``hard`` is set,
    h is rounded to {0, 1}. ``regularizer(beta)`` = sum(1 - |2 h(V) - 1|^beta) pushes h to 0 or 1.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int):
        super().__init__()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", scale.detach().reshape(shape).to(weight.dtype))
        self.register_buffer("zero_point", zero_point.detach().reshape(shape).to(weight.dtype))
        self.qmax = 2**bits - 1
        w = weight.detach() / self.scale
        self.register_buffer("w_floor", torch.floor(w))
        rest = (w - self.w_floor).clamp(1e-4, 1 - 1e-4)  # sigmoid^-1 of the rectified target
        self.v = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.v >= 0).to(self.v.dtype)
        return torch.clamp(torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self) -> torch.Tensor:
        q = torch.clamp(self.w_floor + self.h() + self.zero_point, 0, self.qmax)
        return (q - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class _WeightFakeQuant:
    """Per-channel weight fake-quant, recomputed only when the weight or its qparams change: the
    quantized weight is cached against the tensors' version counters (in-place updates bump them),
    so inference does not pay for re-quantizing frozen weights on every batch. ``weight_quant`` off
    gives the FP weight (reconstruction targets); an attached ``adaround`` gives its rounding."""

    weight_quant = True

    def quantized_weight(self) -> torch.Tensor:
        if not self.weight_quant:
            return self.weight
        if getattr(self, "adaround", None) is not None:
            return self.adaround()
        key = (
            self.weight._version,
            self.weight_scale._version,
            self.weight_zero_point._version,
            self.weight.data_ptr(),
        )
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, self.weight_bits, axis=0)
        if getattr(self, "_wq_key", None) != key:
            with torch.no_grad():
                self._wq = fake_quantize(
                    self.weight, self.weight_scale, self.weight_zero_point, self.weight_bits, axis=0
                )
            self._wq_key = key
        return self._wq

    def set_weight_bits(self, bits: int) -> None:
        """Re-grid the weight at ``bits`` with the layer's own scheme and range rule (the grid a layer
        prepared at ``bits`` would get)."""
        if getattr(self, "adaround", None) is not None:
            raise RuntimeError("cannot change the bits of a layer with a learned AdaRound rounding")
        scale, zp = weight_qparams(self.weight, bits, self.weight_scheme, self.weight_range)
        with torch.no_grad():
            self.weight_scale.copy_(scale)
            self.weight_zero_point.copy_(zp)
        self.weight_bits = bits
        self._wq_key = None


def weight_integers(layer: nn.Module) -> torch.Tensor:
    """The layer's weight on its own grid as integers q in [0, 2^b - 1] (whatever rounding produced it)."""
    with torch.no_grad():
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        wq = layer.quantized_weight()
        q = torch.round(wq / layer.weight_scale.reshape(shape)) + layer.weight_zero_point.reshape(shape)
    return q.to(torch.int32)


class QuantConv2d(_WeightFakeQuant, nn.Conv2d):
    """A Conv2d whose weight is fake-quantized per output channel (min-max or MSE-searched grid)."""

    def __init__(self, conv: nn.Conv2d, bits: int, scheme: str = "asymmetric", weight_range: str = "minmax"):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        self.load_state_dict(conv.state_dict())
        self.weight_bits, self.weight_scheme, self.weight_range = bits, scheme, weight_range
        scale, zp = weight_qparams(self.weight, bits, scheme, weight_range)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_WeightFakeQuant, nn.Linear):
    """A Linear whose weight is fake-quantized per output channel (min-max or MSE-searched grid)."""

    def __init__(self, linear: nn.Linear, bits: int, scheme: str = "asymmetric", weight_range: str = "minmax"):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.weight_bits, self.weight_scheme, self.weight_range = bits, scheme, weight_range
        scale, zp = weight_qparams(self.weight, bits, scheme, weight_range)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class ActFakeQuantize(nn.Module):
    """Per-tensor activation fake-quant. While ``observing``, it feeds its observer and passes x through;
    after ``freeze()`` it quantizes with the observed range.

    For reconstruction: ``enabled`` off passes x through; ``learn_scale()`` makes the step size an
    nn.Parameter trained LSQ-style (``_LearnableFakeQuant``: the gradients of torch's learnable fake-quant op, scaled by
    1 / sqrt(numel * qmax)) until ``fix_scale()``; ``drop_prob`` p > 0 keeps each element at full
    precision with probability p (QDrop; reconstruction only; ``keep_mask``).
    """

    def __init__(self, bits: int, observer: nn.Module):
        super().__init__()
        self.bits = bits
        self.observer = observer
        self.observing = True
        self.enabled = True
        self.drop_prob = 0.0
        self.scale_param: nn.Parameter | None = None
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observer(x)
            return x
        qmax = 2**self.bits - 1
        keep = keep_mask(x, self.drop_prob) if self.drop_prob > 0 else None
        if self.scale_param is not None:  # the step fix_scale keeps, |s|: a gradient step across 0 is no sign flip
            scale = self.scale_param.abs().clamp_min(1e-8)
            return _LearnableFakeQuant.apply(
                x, scale, self.zero_point.to(x.dtype), qmax, 1.0 / (x.numel() * qmax) ** 0.5, keep
            )
        key = (self.scale._version, self.zero_point._version, self.scale.data_ptr())
        if getattr(self, "_qp_key", None) != key:  # python scalars, read once
            self._qp, self._qp_key = (float(self.scale), int(self.zero_point)), key
        xq = quantize_dequantize(x, self._qp[0], self._qp[1], qmax)
        return xq if keep is None else torch.lerp(xq, x, keep)

    def freeze(self) -> None:
        lo, hi = self.observer.calculate_range(self.bits)
        self.scale, self.zero_point = qparams_from_range(lo, hi, self.bits)
        self.calibrated.fill_(True)
        self.observing = False

    def learn_scale(self) -> nn.Parameter:
        self.scale_param = nn.Parameter(self.scale.detach().clone().reshape(1))
        return self.scale_param

    def fix_scale(self) -> None:
        if self.scale_param is not None:
            with torch.no_grad():
                self.scale.copy_(self.scale_param.detach().abs().clamp_min(1e-8).reshape(()))
            self.scale_param = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
