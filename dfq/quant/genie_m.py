"""Genie-M (Jeon, Lee, Kim, CVPR 2023): QDrop-style block reconstruction in which every weight output channel's
step size is learned together with its AdaRound rounding (the loop is reconstruction.py's, ``rounding: genie``).

What Genie-M adds to our ``qdrop``, each a knob of ``GenieMConfig`` (the official code's values as defaults):

- learned weight step: AdaRound cannot learn the step s with the rounding, since s changes floor(W / s) and so the
  whole rounding problem. Genie fixes the base integers B = floor(W / s0) at the initial step s0 (a constant, no
  gradient) and learns s: W_q = (clamp(B + h(V) + z, 0, 2^b - 1) - z) s, so dW_q / ds = q - z (``GenieWeight``).
  We learn s = s0 |r| with r initialised to 1 (a per-channel ratio) rather than s itself: under the brecq
  protocol BN is folded into the conv, which rescales each channel's s0 by its BN gain, so Adam's absolute steps
  on s (the official code keeps BN unfolded) would be a different relative rate on every channel; on r, Adam's
  steps are relative to s0 and the same for a folded and an unfolded model. The default lr on r is the official
  1e-4 on s divided by the median unfolded step (see ``GenieMConfig.weight_lr``). The learned step is written into
  the layer's ``weight_scale`` buffer with the hard-rounded weight, so the checkpoint's state dict carries it
  (``prepare.load_quantized`` loads the buffer over the one prepare derives from the weights);
- a cosine schedule to 0 over the unit's iterations on the weight-step and the activation-step groups (the
  rounding logits V keep a constant lr);
- unit-input mixing: each element of the unit's input is the quantized model's with probability ``input_prob``,
  else the FP32 model's (the official QDrop code's input_prob; our qdrop feeds the quantized input only);
- the rounding regulariser at weight 1.0 (QDrop and BRECQ: 0.01);
- Genie's first/second/last-layer bits (``bit_rule``): first layer W8 with its input (the image) not quantized,
  the second layer's input A8, the last layer W8A8 (``QuantSpec(edges="genie")``; the brecq protocol's own
  rule quantizes the first layer's input at 8 bits and the second layer's at the target bits).

Every knob off (weight_lr 0, input_prob 1, reg_weight 0.01, cosine false, bit_rule false) is exactly ``qdrop``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from dfq.quant.fake_quant import AdaRoundWeight, keep_mask
from dfq.quant.prepare import QuantSpec


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class GenieMConfig:
    """Genie-M's own knobs (quantize.reconstruction.genie; read only when rounding is genie). The shared
    ReconConfig fields (iterations, batch_size, lr, act_lr, beta schedule, warmup, drop_prob, seed) apply too."""

    # Adam on the weight-step ratio r = s / s0 (0: the step stays s0). 3e-3 = the official 1e-4 on s divided by the
    # median initial step of the shared CIFAR-10 ResNet-20, BN unfolded, 4-bit asymmetric per-channel weights
    # (the 18 inner convs, 672 channels): 0.0345 with Genie's L2.4 range search (0.0334 MSE, 0.0393 min-max); folded
    # (brecq) the median is 0.0186, where the official lr would be nearly twice as fast a relative rate
    weight_lr: float = Field(3e-3, ge=0)
    reg_weight: float = Field(1.0, ge=0)  # lambda of the rounding regulariser (QDrop/BRECQ: 0.01)
    input_prob: float = Field(0.5, ge=0, le=1)  # P(unit-input element from the quantized model), else FP32's
    cosine: bool = True  # cosine-anneal the weight- and activation-step lrs to 0 over each unit's iterations
    bit_rule: bool = True  # Genie's first/second/last-layer bits (QuantSpec edges="genie"); false: the protocol's


class GenieWeight(AdaRoundWeight):
    """AdaRound's soft rounding with a learnable per-channel step: W_q = (clamp(B + h(V) + z, 0, 2^b - 1) - z) s.

    B = floor(W / s0) is a buffer fixed at construction (``w_floor``, no gradient, never recomputed), h(V) starts
    at W / s0 - B (AdaRoundWeight), and s = s0 |r| with the parameter ``ratio`` r initialised to 1, so at
    construction the soft weight is W inside the grid's range, and after ``hard`` is set h is 1[V >= 0]: nearest
    rounding of W / s0 until V moves."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int):
        super().__init__(weight, scale, zero_point, bits)
        self.ratio = nn.Parameter(torch.ones_like(self.scale))

    def step(self) -> torch.Tensor:
        """The current per-channel step s = s0 |r| (shaped to broadcast over the weight)."""
        return (self.scale * self.ratio.abs()).clamp_min(1e-8)

    def forward(self) -> torch.Tensor:
        q = torch.clamp(self.w_floor + self.h() + self.zero_point, 0, self.qmax)
        return (q - self.zero_point) * self.step()


def cosine_factor(t: int, total: int) -> float:
    """Multiplier of the base lr at step t of ``total``: 0.5 (1 + cos(pi t / total)), from 1 to 0 (torch's
    CosineAnnealingLR with eta_min 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * t / max(total, 1)))


def mix_inputs(x_q: torch.Tensor, x_fp: torch.Tensor, input_prob: float) -> torch.Tensor:
    """Each element from ``x_q`` with probability ``input_prob`` (rounded to a multiple of 1/256: ``keep_mask``),
    else from ``x_fp`` (torch's global generator); ``input_prob`` 1 returns x_q and draws nothing."""
    if input_prob >= 1.0:
        return x_q
    return torch.lerp(x_fp, x_q, keep_mask(x_q, input_prob))  # exact at the mask's 0 and 1


def genie_spec(spec: QuantSpec, rounding: str, genie: GenieMConfig) -> QuantSpec:
    """The QuantSpec to prepare a model with for ``rounding``: Genie's bit rule (edges "genie") when rounding is
    genie with ``bit_rule`` on (protocol brecq only: a ValueError otherwise), else ``spec`` as it is."""
    if rounding != "genie" or not genie.bit_rule:
        return spec
    if spec.protocol != "brecq":
        raise ValueError(
            "rounding genie with bit_rule true needs protocol brecq (Genie's first/second/last-layer bits); "
            "set quantize.reconstruction.genie.bit_rule false to keep the zeroq protocol's layout"
        )
    return dataclasses.replace(spec, edges="genie")
