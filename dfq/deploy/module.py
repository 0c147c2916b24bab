"""The torch side of the export: a copy of a calibrated fake-quant model that torch.onnx turns into a
QuantizeLinear/DequantizeLinear graph holding exactly the integers and scales calibration chose.

- every ActFakeQuantize becomes a uint8 fake-quantize with its scale and zero point (QuantizeLinear /
  DequantizeLinear), then, below 8 bits, a clamp at the grid's top that ``dfq.deploy.qdq`` turns into an
  integer Clip;
- every QuantConv2d/QuantLinear holds its weight as our integers times per-channel scales, fake-quantized
  in forward so that the exporter writes a QuantizeLinear/DequantizeLinear on it (``dfq.deploy.qdq`` then
  stores the integers): int8 ``q - z`` with zero point 0, or, for a grid that does not fit int8 with zero
  point 0 (8-bit asymmetric: ``q - z`` spans up to [-255, 255]), uint8 ``q`` with per-channel zero points;
- BatchNorm the zeroq protocol keeps unfolded (conv -> BN) is folded AFTER quantization: the layer's
  integers stay ours and its per-channel scale becomes s * |gamma / sqrt(var + eps)| (a negative BN
  factor negates the channel's integers), the bias gamma (b - mean) / sqrt(var + eps) + beta, so the
  exported conv equals fake-quant conv + BN up to float rounding. A BN that cannot be folded this way
  (a -128 integer in a channel to negate; an input shared with another consumer) stays a float op.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.quant.bias import input_quantizer
from dfq.quant.fake_quant import ActFakeQuantize, QuantConv2d, QuantLinear, weight_integers


class _ExportAct(nn.Module):
    """An ActFakeQuantize as the exporter sees it: a uint8 QuantizeLinear/DequantizeLinear pair with
    the calibrated scale and zero point, then (below 8 bits) a clamp at the grid's top, (2^b-1-z) s."""

    def __init__(self, fq: ActFakeQuantize):
        super().__init__()
        self.bits, self.scale, self.zero_point = fq.bits, float(fq.scale), int(fq.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        if self.bits < 8:
            x = torch.clamp(x, max=(2**self.bits - 1 - self.zero_point) * self.scale)
        return x


class _ExportWeight(nn.Module):
    """A conv/linear with its weight held as our integers times per-channel scales, fake-quantized
    in forward so that the exporter writes QuantizeLinear/DequantizeLinear on it (to_onnx then stores
    the integers). ``signed``: int8 with zero point 0; else uint8 with per-channel zero points."""

    def __init__(
        self,
        layer: nn.Module,
        ints: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bias: torch.Tensor | None,
        signed: bool,
    ):
        super().__init__()
        self.conv = layer if isinstance(layer, nn.Conv2d) else None
        shape = (-1,) + (1,) * (ints.dim() - 1)
        self.register_buffer("weight", ((ints - zero_point.reshape(shape)).float() * scale.reshape(shape)))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.signed = signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = (-128, 127) if self.signed else (0, 255)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0, lo, hi)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        c = self.conv
        return F.conv2d(x, w, self.bias, c.stride, c.padding, c.dilation, c.groups)


def _bn_factor(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    g = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return g, bn.bias.detach() - g * bn.running_mean


def graph_modules(gm: nn.Module) -> list[fx.GraphModule]:
    """The fx graphs of a prepared model: the root and each unit traced on its own."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def qualified(prefix: str, target: str) -> str:
    """A graph-local name qualified by its graph's path in the root model."""
    return f"{prefix}.{target}" if prefix else target


def _export_layer(layer: nn.Module, bn: nn.BatchNorm2d | None) -> _ExportWeight | None:
    """The export form of a QuantConv2d/QuantLinear, BN folded after quantization; None if the BN
    cannot be folded into int8 integers exactly."""
    q = weight_integers(layer)
    z = layer.weight_zero_point.to(torch.int32)
    shape = (-1,) + (1,) * (q.dim() - 1)
    ints = q - z.reshape(shape)
    scale = layer.weight_scale.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    signed = int(ints.min()) >= -128 and int(ints.max()) <= 127
    if bn is not None:
        g, b = _bn_factor(bn)
        neg = g < 0
        if not signed or (neg & (ints.flatten(1).min(1).values < -127)).any():
            return None
        ints = torch.where(neg.reshape(shape), -ints, ints)
        scale = scale * g.abs()
        bias = b + g * (bias if bias is not None else 0.0)
    if signed:
        return _ExportWeight(layer, ints, scale, torch.zeros_like(z), bias, True)
    return _ExportWeight(layer, q, scale, z, bias, False)


def _input_quantizer(root: nn.Module, g: fx.GraphModule, src, prefixes: dict) -> str:
    """Name of the activation quantizer whose output ``src`` is; 'FP32' when the tensor is not quantized."""
    found = input_quantizer(root, g, src, prefixes, (ActFakeQuantize, _ExportAct))
    return found[0] if found else "FP32"


def _layer_record(layer: nn.Module, new: _ExportWeight, full: str, bn: str, protocol: str, source: str) -> dict:
    """The quant map's row of one weight layer (``bn``: 'folded', 'kept' or 'none')."""
    return {
        "layer": full,
        "type": type(layer).__name__.replace("Quant", ""),
        "weight_bits": layer.weight_bits,
        "weight_scheme": layer.weight_scheme,
        "weights_stored": "int8, zero point 0" if new.signed else "uint8, per-channel zero points",
        "weight_scale_min": float(new.scale.min()),
        "weight_scale_max": float(new.scale.max()),
        "bn": {"folded": "folded after quantization", "kept": "kept: float BatchNormalization"}.get(
            bn, "folded before quantization" if protocol == "brecq" else "none"
        ),
        "input": source,
    }


def export_module(gm: nn.Module, protocol: str = "zeroq") -> tuple[nn.Module, list[dict]]:
    """A copy of the calibrated fake-quant model that the ONNX exporter turns into our QDQ graph, and
    one record per weight layer (bits, stored integers, scale range, BN, input quantizer)."""
    gm = copy.deepcopy(gm).eval().cpu()
    records: list[dict] = []
    prefixes = {id(m): n for n, m in gm.named_modules()}
    for g in graph_modules(gm):
        mods = dict(g.named_modules())
        for node in list(g.graph.nodes):
            if node.op != "call_module" or not isinstance(mods.get(node.target), (QuantConv2d, QuantLinear)):
                continue
            layer, bn_node = mods[node.target], None
            users = list(node.users)
            if (
                len(users) == 1
                and users[0].op == "call_module"
                and isinstance(mods.get(users[0].target), nn.BatchNorm2d)
            ):
                bn_node = users[0]
            new = _export_layer(layer, mods[bn_node.target] if bn_node is not None else None)
            folded = new is not None and bn_node is not None
            if new is None:  # BN not foldable exactly: keep it as a float op after the conv
                new = _export_layer(layer, None)
            g.add_submodule(node.target, new)
            if folded:
                bn_node.replace_all_uses_with(node)
                g.graph.erase_node(bn_node)
            bn = "folded" if folded else ("kept" if bn_node is not None else "none")
            records.append(
                _layer_record(
                    layer,
                    new,
                    qualified(prefixes[id(g)], node.target),
                    bn,
                    protocol,
                    _input_quantizer(gm, g, node.args[0], prefixes),
                )
            )
        for node in g.graph.nodes:
            if node.op == "call_module" and isinstance(mods.get(node.target), ActFakeQuantize):
                g.add_submodule(node.target, _ExportAct(mods[node.target]))
        g.delete_all_unused_submodules()
        g.graph.lint()
        g.recompile()
    return gm, records
